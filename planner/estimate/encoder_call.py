"""What every encoder call shares: its result by phase (`EncoderMemory`), the tape it runs on
(``Recompute.AT_UNPACK``, ``GradSum.FIRST_IN_PLACE``), the end of the call (outputs concatenated,
autocast ended, backward from the consumer's gradient), argument checks, and the pieces the
SigLIP and Whisper layers have in common (eager attention, the logsumexp length, a
transformer layer's parameters). Part of the estimate stage; pure arithmetic.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from planner.estimate.ledger import FP32, HALF, Tensor
from planner.estimate.ops import EFFICIENT_LSE_ROUND
from planner.estimate.tape import GradSum, Recompute, Tape

ATTENTIONS = ("eager", "sdpa")
PHASES = ("forward", "backward")

# --------------------------------------------------------------------------------------------
# Public result
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncoderMemory:
    """Bytes one encoder call adds beyond the model states (weights, gradients' steady state,
    optimizer states), by phase.

    Attributes:
        forward_activations: tensors born in the forward and alive at the forward peak: what is
            saved for backward so far, the transient at the peak (usually one layer's attention
            scores), the autocast weight cache, and earlier chunks' outputs.
        forward_temporaries: always 0 (the forward allocates only activations); kept so both
            phases read alike.
        held_for_backward: activations alive once the forward is done and the encoder's output
            has gone to its consumer (the consumer's own saved copy is the consumer's): what
            backward starts from. 0 for a frozen encoder whose input needs no gradient.
        backward_activations: forward-born and recomputed tensors alive at the backward peak.
        backward_temporaries: gradients of activations alive at the backward peak, including
            the incoming gradient of the output (allocated by the consumer's backward).
        backward_gradients: this encoder's parameter gradients alive at its backward peak.
        autocast_cache: under amp, bf16 copies of trainable fp32 weights that autocast keeps
            until the *model's* forward ends (MiniCPM: after the LLM's forward and loss) beyond
            those already in ``held_for_backward``; 0 without autocast or without trained
            weights. With checkpointing this is about 2 bytes per trainable parameter.
    """

    forward_activations: int
    forward_temporaries: int
    held_for_backward: int
    backward_activations: int
    backward_temporaries: int
    backward_gradients: int
    autocast_cache: int = 0

    @property
    def forward_peak_bytes(self) -> int:
        """Activations + temporaries at the forward peak."""
        return self.forward_activations + self.forward_temporaries

    @property
    def backward_peak_bytes(self) -> int:
        """Activations + temporaries + parameter gradients at the backward peak."""
        return self.backward_activations + self.backward_temporaries + self.backward_gradients

    @property
    def peak_bytes(self) -> int:
        """The larger of the two phase peaks."""
        return max(self.forward_peak_bytes, self.backward_peak_bytes)


# --------------------------------------------------------------------------------------------
# The tape, and the end of an encoder call
# --------------------------------------------------------------------------------------------


def encoder_tape(autocast: bool, module_dtype_bytes: int) -> Tape:
    return Tape(autocast=autocast, weight_item=module_dtype_bytes, recompute=Recompute.AT_UNPACK,
                grad_sum=GradSum.FIRST_IN_PLACE)


def finish_call(s: Tape, outs: list[Tensor], trained_path: bool) -> EncoderMemory:
    """End of the encoder call: the caller concatenates the outputs (MiniCPM ``torch.cat`` of the
    chunks) and hands them on; autocast ends with the model forward; then backward from a
    gradient of the output's shape and dtype (the consumer's)."""
    out = s.cat(outs) if len(outs) > 1 else s.alias(outs[0])
    s.drop(*outs, out)
    before = s.ledger.now["activations"]
    s.end_autocast()
    held = s.ledger.now["activations"]
    if trained_path and out.rg:
        s.ledger.phase = "backward"
        s.backward(out, s.new(out.numel, out.item))
    fw, bw = s.ledger.peak("forward"), s.ledger.peak("backward")
    return EncoderMemory(
        forward_activations=fw["activations"],
        forward_temporaries=fw["temporaries"],
        held_for_backward=held,
        backward_activations=bw["activations"],
        backward_temporaries=bw["temporaries"],
        backward_gradients=bw["gradients"],
        autocast_cache=before - held,
    )


def check_call(attn: str, module_dtype_bytes: int, autocast: bool, **counts: int) -> None:
    for name, value in counts.items():
        if value < 1:
            raise ValueError(f"{name} must be at least 1; got {value}")
    if attn not in ATTENTIONS:
        raise ValueError(f"attn must be one of {', '.join(ATTENTIONS)}; got {attn!r}")
    if module_dtype_bytes not in (FP32, HALF):
        raise ValueError(f"module_dtype_bytes must be 4 (fp32) or 2 (bf16/fp16); got {module_dtype_bytes}")
    if autocast and module_dtype_bytes != FP32:
        raise ValueError("autocast is modelled over fp32 weights (amp); a bf16 module runs without it")


def cfg_value(cfg: Mapping[str, Any], key: str, default: Any = None) -> Any:
    if key in cfg:
        return cfg[key]
    if default is None:
        raise ValueError(f"config is missing required field {key!r}")
    return default


# --------------------------------------------------------------------------------------------
# Pieces the SigLIP and Whisper layers share
# --------------------------------------------------------------------------------------------


def attention_eager(s: Tape, q: Tensor, k: Tensor, v: Tensor, c: int, heads: int, seq: int, mask: Tensor | None,
                     *, clone_qkv: bool, explicit_fp32: bool) -> tuple[Tensor, Tensor]:
    """``eager_attention_forward``; returns (output [N, D] contiguous, the probabilities the
    caller keeps as the unused second output). ``clone_qkv``: q/k/v are [C, h, L, d] transposed
    views of [C, L, h, d] projections, which ``matmul`` copies to fold (C, h) into one batch
    dimension (SigLIP with C > 1; with C = 1 the fold is a view). ``explicit_fp32``: SigLIP's
    ``softmax(dtype=float32).to(query.dtype)``; otherwise (Whisper) a plain softmax, fp32 under
    CUDA autocast's fp32 op list, cast back by the next matmul."""
    n = q.numel
    scores = c * heads * seq * seq
    if clone_qkv:
        qc, kc = s.clone(q), s.clone(k)
    else:
        qc, kc = s.alias(q), s.alias(k)
    raw = s.matmul(qc, kc, scores)
    s.drop(qc, kc)
    w = s.mul(raw, None)
    s.drop(raw)
    if mask is not None:
        masked = s.add(w, mask)
        s.drop(w)
        w = masked
    if explicit_fp32:
        p32 = s.softmax(w, FP32)
        p = s.cast(p32, q.item)
        s.drop(w, p32)
        vc = s.clone(v) if clone_qkv else s.alias(v)
        keep = p
    else:
        p32 = s.softmax(w, FP32 if s.autocast else w.item)
        s.drop(w)
        p = s.ac(p32)
        vc = s.alias(v)
        keep = p32
    o = s.matmul(p, vc, n)
    if not explicit_fp32:
        s.drop(p)
    s.drop(vc)
    oc = s.clone(o)  # attn_output.transpose(1, 2).contiguous()
    s.drop(o)
    return oc, keep


def lse_len(s: Tape, seq: int) -> int:
    """Logsumexp length per (batch, head): flash keeps L; memory-efficient (fp32) rounds to 32."""
    return seq if s.compute_item == HALF else -(-seq // EFFICIENT_LSE_ROUND) * EFFICIENT_LSE_ROUND


def layer_params(s: Tape, trained: bool, d: int, inter: int, k_bias: bool = True) -> dict[str, Tensor]:
    shapes = {"ln1.w": d, "ln1.b": d, "q.w": d * d, "q.b": d, "k.w": d * d, "k.b": d if k_bias else 0,
              "v.w": d * d, "v.b": d, "o.w": d * d, "o.b": d, "ln2.w": d, "ln2.b": d,
              "fc1.w": d * inter, "fc1.b": inter, "fc2.w": inter * d, "fc2.b": d}
    return {k: s.param(v, trained) for k, v in shapes.items() if v}


def layer_tail(s: Tape, x: Tensor, o: Tensor, h: Tensor, probs: Tensor | None, p: dict[str, Tensor], d: int,
               n: int, inter: int, keep_ln2_through_fc2: bool) -> Tensor:
    """The pre-norm encoder layer after its attention, as SigLIP and Whisper write it: output
    projection, residual, ``layer_norm2``, ``fc1``, activation, ``fc2``, residual. ``h`` (the
    first norm's output) and ``o`` (attention's) are freed after the projection; ``probs`` (eager
    attention's weights, returned as ``_``) lives to the layer's end. ``keep_ln2_through_fc2``:
    SigLIP's MLP is a submodule called with the norm's output, which stays bound until it
    returns; Whisper rebinds ``hidden_states`` so the norm's output dies after ``fc1``."""
    a = s.linear(o, p["o.w"], p["o.b"], d)
    s.drop(o, h)
    x2 = s.add(x, a)
    s.drop(a)
    h2 = s.layer_norm(x2, p["ln2.w"], p["ln2.b"], n)
    f = s.linear(h2, p["fc1.w"], p["fc1.b"], inter)
    g = s.unary_saving_input(f)  # hidden_states = self.activation_fn(self.fc1(hidden_states))
    early, late = ((), (h2,)) if keep_ln2_through_fc2 else ((h2,), ())
    s.drop(f, *early)
    y = s.linear(g, p["fc2.w"], p["fc2.b"], d)
    s.drop(g, *late)
    out = s.add(x2, y)
    s.drop(x2, y, probs)
    return out
