"""Activations and step temporaries: what one training step of a decoder LLM holds beyond the model states.

Pure arithmetic (no torch, no I/O). The step is *replayed* on the step tape
(``planner.estimate.tape``: one byte ledger and one autograd replay, shared with the encoders):
the forward of the transformers model is written out op by op (transformers 5.24
``models/<type>/modeling_<type>.py``), each op allocates its outputs and records an autograd node
with the tensors it saves, exactly as the real op does; the backward then runs the nodes in reverse
creation order, as the autograd engine does. Peaks are taken after every op, by phase. This is
more code than a closed formula, but the closed formulas (docs/activations.md) fall out of it, and
it gets the *moment* of each peak right, which a sum of saved tensors does not: the backward
peak is sometimes the loss backward, sometimes a decoder layer's backward, sometimes the last
embedding gradient. Checkpointed layers follow ``Recompute.AT_REGION`` and the tied embedding's
two gradients ``GradSum.AFTER_ALL_USES``.

Docs: docs/activations.md derives every rule and records the comparison with ``planner.judge.trace``
(tests/estimate/test_activations_vs_trace.py; benchmarks/accuracy.py for full-size models).

Conventions:
    * b = micro-batch, s = sequence length, N = b*s tokens, h = hidden, I = intermediate, V = vocab,
      nh / nkv = query / key-value heads, hd = head dim.
    * every tensor is one storage rounded up to 512 bytes (``ALLOC_GRANULE_BYTES``), as the CUDA
      caching allocator rounds each block and as ``MemTracker`` counts them.
    * categories follow MemTracker: ``activations`` (born in forward or in a checkpoint
      recomputation), ``temporaries`` (born in backward or in the optimizer step), ``gradients``
      (parameter ``.grad``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from planner.estimate.tape import (
    ALLOC_GRANULE_BYTES,
    CATEGORIES,
    EFFICIENT_LSE_ROUND,
    FLASH_BWD_HEAD_ROUND,
    FLASH_BWD_SEQ_ROUND,
    FLASH_RNG_TENSORS,
    FP32,
    HALF,
    INT64,
    GradSum,
    Param,
    Recompute,
    Tape,
    Tensor,
    block_bytes,
    flash_backward_workspace,
)
from planner.profile.architectures import ProfileError, decoder_tensors
from planner.workload.options import OptimizerImpl

__all__ = [
    "ALLOC_GRANULE_BYTES", "ATTENTIONS", "CATEGORIES", "EFFICIENT_LSE_ROUND", "FLASH_BWD_HEAD_ROUND",
    "FLASH_BWD_SEQ_ROUND", "FLASH_RNG_TENSORS", "FP32", "HALF", "INT64", "PHASES", "PRECISIONS", "DecoderDims",
    "StepMemory", "autocast_weight_cache_bytes", "clip_grad_norm_temporaries_bytes", "decoder_buffer_bytes",
    "decoder_step_memory", "flash_backward_workspace", "layer_saved_bytes", "logits_loss_bytes",
    "optimizer_step_temporaries_bytes",
]

PRECISIONS = ("fp32", "amp-bf16", "amp-fp16", "pure-bf16")
ATTENTIONS = ("eager", "sdpa", "flash_attention_2")
PHASES = ("forward", "backward", "optimizer")

# --------------------------------------------------------------------------------------------
# Public result
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepMemory:
    """Bytes one GPU holds beyond the model states during one training step, by phase.

    Each phase's figures are what is alive at that phase's own peak (the moment when
    activations + temporaries + gradients is largest within the phase). Weights, optimizer states
    and master weights are constant during a step and are *not* included; add them
    (``planner.estimate.states``) to get the phase totals. Gradients are included where the
    engine holds them as ``.grad`` (plain PyTorch): they build up during backward and are all
    alive in the optimizer step.

    Attributes:
        forward_activations: tensors born in forward and alive at the forward peak (what is saved
            for backward, the autocast weight copies, and the transient at the peak: usually the
            logits and the loss's fp32 copies).
        forward_temporaries: always 0 today (the forward allocates only activations); kept so
            the three phases read alike.
        held_for_backward: activations alive once forward and loss are done and the outputs are
            dropped (``TraceResult.after_forward``): what backward starts from.
        backward_activations: forward-born (and recomputed) tensors alive at the backward peak.
        backward_temporaries: gradients of activations and kernel outputs alive at the backward
            peak.
        backward_gradients: parameter gradients alive at the backward peak.
        optimizer_gradients: parameter gradients during the optimizer step (all of them).
        optimizer_temporaries: gradient clipping and optimizer-step temporaries at their peak.
        inputs: token ids and labels (int64), alive the whole step.
        peak_phase: the phase whose total (these figures + the constant model states) is largest.
    """

    forward_activations: int
    forward_temporaries: int
    held_for_backward: int
    backward_activations: int
    backward_temporaries: int
    backward_gradients: int
    optimizer_gradients: int
    optimizer_temporaries: int
    inputs: int
    peak_phase: str

    def phase_bytes(self, phase: str) -> int:
        """Bytes beyond the model states at ``phase``'s peak (inputs included)."""
        if phase == "forward":
            return self.forward_activations + self.forward_temporaries + self.inputs
        if phase == "backward":
            return self.backward_activations + self.backward_temporaries + self.backward_gradients + self.inputs
        if phase == "optimizer":
            return self.optimizer_gradients + self.optimizer_temporaries + self.inputs
        raise ValueError(f"phase must be one of {PHASES}; got {phase!r}")

    @property
    def peak_bytes(self) -> int:
        """Bytes beyond the model states at the step's peak."""
        return self.phase_bytes(self.peak_phase)


# --------------------------------------------------------------------------------------------
# The decoder
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecoderDims:
    """The config fields that size a decoder's activations (HF ``config.json`` names)."""

    model_type: str
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    hidden_act: str
    sliding_window: int | None

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> DecoderDims:
        """Read the fields (defaults as the transformers config classes set them)."""
        names = {t.name for t in decoder_tensors(cfg)}  # validates model_type and required fields
        heads = cfg["num_attention_heads"]
        mtype = cfg["model_type"]
        act_default = "gelu_pytorch_tanh" if mtype == "gemma" else "silu"
        act = cfg.get("hidden_act", act_default)
        if mtype == "gemma" and act == "gelu":  # GemmaConfig.__post_init__ maps legacy "gelu"
            act = "gelu_pytorch_tanh"
        if act not in ("silu", "gelu_pytorch_tanh", "gelu"):
            raise ProfileError(f"hidden_act {act!r} is not modeled (silu, gelu_pytorch_tanh, gelu)")
        # Sliding-window attention (a mask once s >= window): Qwen2/Qwen3 only with
        # use_sliding_window (Qwen2Config.__post_init__); Mistral defaults to 4096 when the field
        # is absent (MistralConfig); Phi-3 reads it as given; Llama and Gemma have none.
        window = cfg.get("sliding_window")
        if mtype in ("qwen2", "qwen3") and not cfg.get("use_sliding_window", False):
            window = None
        elif mtype in ("llama", "gemma"):
            window = None
        elif mtype == "mistral" and "sliding_window" not in cfg:
            window = 4096
        return cls(
            model_type=mtype,
            vocab=cfg["vocab_size"],
            hidden=cfg["hidden_size"],
            intermediate=cfg["intermediate_size"],
            layers=cfg["num_hidden_layers"],
            heads=heads,
            kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            tied="lm_head.weight" not in names,
            hidden_act=act,
            sliding_window=window,
        )


def _lora_ranks(params: Sequence[Any] | None) -> dict[str, int]:
    """``{linear stem: rank}`` from LoRA entries of a ``planner.workload.inventory`` inventory."""
    out: dict[str, int] = {}
    for p in params or ():
        name = p.tensor.name
        if name.endswith(".lora_A.weight"):
            out[name.removesuffix(".lora_A.weight")] = p.tensor.shape[0]
    return out


class _Decoder:
    """One training step of a ``*ForCausalLM`` decoder, replayed on a ``Tape``."""

    def __init__(
        self,
        cfg: Mapping[str, Any],
        dims: DecoderDims,
        *,
        micro_batch: int,
        seq_len: int,
        weight_item: int,
        autocast: bool,
        attn: str,
        grad_ckpt: bool,
        use_cache: bool,
        trainable: Mapping[str, bool],
        lora: Mapping[str, int],
        workspaces: bool,
        input_requires_grad: bool,
    ) -> None:
        self.d = dims
        self.b, self.s = micro_batch, seq_len
        self.N = micro_batch * seq_len
        self.w_item = weight_item
        self.autocast = autocast
        self.attn = attn
        self.ckpt = grad_ckpt
        self.use_cache = use_cache and not grad_ckpt
        self.workspaces = workspaces
        self.input_requires_grad = input_requires_grad
        self.lora = lora
        self.sim = Tape(autocast=autocast, weight_item=weight_item, recompute=Recompute.AT_REGION,
                        grad_sum=GradSum.AFTER_ALL_USES)
        self.params: dict[str, Tensor] = {}
        for t in decoder_tensors(cfg):
            p = Param(t.name, t.numel, weight_item, trainable.get(t.name, True))
            self.params[t.name] = Tensor(t.numel, weight_item, p.trainable, None, p)
        if dims.tied:
            self.params["lm_head.weight"] = self.params["model.embed_tokens.weight"]
        for stem, r in lora.items():
            w = self.params[stem + ".weight"]
            out_f = w.numel // self._in_features(stem)
            for suffix, numel in ((".lora_A.weight", r * self._in_features(stem)), (".lora_B.weight", out_f * r)):
                p = Param(stem + suffix, numel, weight_item, True)
                self.params[stem + suffix] = Tensor(numel, weight_item, True, None, p)
        self.a = FP32 if weight_item == FP32 else HALF  # residual stream: the embedding's dtype

    # ---- shapes -----------------------------------------------------------------------------
    def _in_features(self, stem: str) -> int:
        d = self.d
        leaf = stem.rsplit(".", 1)[-1]
        return {"o_proj": d.heads * d.head_dim, "down_proj": d.intermediate}.get(leaf, d.hidden)

    @property
    def q_dim(self) -> int:
        return self.d.heads * self.d.head_dim

    @property
    def kv_dim(self) -> int:
        return self.d.kv_heads * self.d.head_dim

    def mask_needed(self) -> bool:
        """Whether transformers materialises an attention mask: always for eager; for sdpa only
        when a sliding window does not cover the sequence (masking_utils
        ``_ignore_causal_mask_sdpa``: ``kv_length >= local_attention_size`` keeps the mask)."""
        if self.attn == "eager":
            return True
        w = self.d.sliding_window
        return self.attn == "sdpa" and w is not None and self.s >= w

    # ---- building blocks -------------------------------------------------------------------
    def linear(self, x: Tensor, stem: str, out_f: int) -> Tensor:
        """``nn.Linear`` (+ a peft LoRA adapter): under autocast the input is cast at every call,
        the weight through the cache; mm saves the input only for a trainable weight and the weight
        only when the input requires grad."""
        sim = self.sim
        w = self.params[stem + ".weight"]
        bias = self.params.get(stem + ".bias")
        # Casts left to right (input, weight, bias), unlike Tape.linear: the order of their
        # ToCopy nodes decides which of two equal backward peaks is recorded (docs/activations.md).
        xc = sim.ac(x)
        wc = sim.cast_weight(w)
        bc = sim.cast_weight(bias)
        out = sim.matmul(xc, wc, self.N * out_f, bc)
        sim.drop(xc, wc, bc)
        if stem in self.lora:
            r = self.lora[stem]
            a = self.params[stem + ".lora_A.weight"]
            bb = self.params[stem + ".lora_B.weight"]
            # peft lora.Linear.forward: x = self._cast_input_dtype(x, lora_A.weight.dtype), then
            # lora_B(lora_A(dropout(x))) * scaling with dropout p=0 an Identity. Under amp a bf16
            # input (o_proj's, down_proj's) goes to fp32 and back to bf16 for lora_A.
            x_l = sim.cast(x, a.item)
            xa = sim.ac(x_l)
            sim.drop(x_l)
            ac = sim.cast_weight(a)
            mid = sim.matmul(xa, ac, self.N * r)
            sim.drop(xa, ac)
            bc = sim.cast_weight(bb)
            low = sim.matmul(mid, bc, self.N * out_f)
            sim.drop(mid, bc)
            scaled = sim.mul(low, None)  # * scaling
            sim.drop(low)
            res = sim.add(out, scaled)
            sim.drop(out, scaled)
            out = res
        return out

    def rmsnorm(self, x: Tensor, name: str, rows: int) -> Tensor:
        """Llama-style RMSNorm (Qwen2/Qwen3/Llama/Mistral/Phi-3 ``*RMSNorm.forward``):
        ``x32 = x.to(fp32); x32 * rsqrt(x32.pow(2).mean(-1) + eps)``, cast back to the input dtype,
        then ``weight * that`` (the weight's dtype wins the promotion). Gemma's variant multiplies
        by ``1 + weight`` in fp32 before casting back (``GemmaRMSNorm``)."""
        sim = self.sim
        w = self.params[name]
        x32 = sim.cast(x, FP32)
        sq = sim.new(x.numel, FP32, rg=x32.rg)  # pow(2): saves its input
        sim.node([sq], [x32], [x32], lambda s, g, x32=x32: _pow_bw(s, x32))
        mean = sim.new(rows, FP32, rg=sq.rg)  # variance = pow(2).mean(-1): bound until return
        sim.node([mean], [sq], [], lambda s, g, sq=sq: [s.grad(sq)])
        sim.drop(sq)
        var = sim.new(rows, FP32, rg=mean.rg)  # + eps
        sim.node([var], [mean], [], lambda s, g: [s.alias(g[0])])
        r = sim.new(rows, FP32, rg=var.rg)  # rsqrt: saves its result
        sim.node([r], [var], [r], lambda s, g, var=var: _rsqrt_bw(s, var))
        sim.drop(var)
        y = sim.mul(x32, r)  # rebinds hidden_states: the fp32 copy is only kept if saved
        sim.drop(r, x32)
        if self.d.model_type == "gemma":
            wf = sim.cast(w, FP32)
            one_plus = sim.new(w.numel, FP32, rg=w.rg)  # 1.0 + weight.float()
            sim.node([one_plus], [wf], [], lambda s, g: [s.alias(g[0])])
            sim.drop(wf)
            out32 = sim.mul(y, one_plus)
            sim.drop(y, one_plus)
            out = sim.cast(out32, x.item)  # .type_as(x)
            sim.drop(out32, mean)
            return out
        yd = sim.cast(y, x.item)
        out = sim.mul(w, yd)
        sim.drop(yd, y, mean)  # y and variance stay bound until the function returns
        return out

    def rope(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """``apply_rotary_pos_emb``: ``x * cos + rotate_half(x) * sin`` with
        ``rotate_half = cat(-x2, x1)``. cos/sin have the embedding's dtype, so under amp the
        product of a bf16 projection and fp32 cos is fp32. Phi-3 slices the rotary part and
        concatenates the rest back (an extra copy)."""
        sim = self.sim
        phi3 = self.d.model_type == "phi3"
        if phi3:  # q_rot, q_pass = q[..., :rotary_dim], q[..., rotary_dim:] (rotary_dim = hd)
            base = x
            x = sim.slice(base, base.numel)
            x_pass = Tensor(base.numel, base.item, base.rg, None)  # empty slice: a zero-byte gradient
            sim.node([x_pass], [base], [], lambda s, g, b=base: [Tensor(b.numel, b.item, False, None)])
        half = x.numel // 2
        t1 = sim.mul(x, cos, x.numel)
        x1, x2 = sim.slice(x, half), sim.slice(x, half)  # rotate_half: x[..., :d/2], x[..., d/2:]
        neg = sim.new(half, x.item, rg=x.rg)  # -x2
        sim.node([neg], [x2], [], lambda s, g, x2=x2: [s.grad(x2)])
        rot = sim.new(x.numel, x.item, rg=x.rg)  # cat((-x2, x1)): CatBackward hands out views

        def cat_bw(s: Tape, g: list[Tensor | None], neg=neg, x1=x1) -> list[Tensor | None]:
            return [s.view(g[0], neg.numel), s.view(g[0], x1.numel)]

        sim.node([rot], [neg, x1], [], cat_bw)
        sim.drop(neg, x1, x2)
        t2 = sim.mul(rot, sin, x.numel)
        sim.drop(rot)
        out = sim.add(t1, t2)
        sim.drop(t1, t2)
        if phi3:  # cat([rotated, x_pass]): a copy; CatBackward hands out views
            full = sim.new(out.numel, out.item, rg=out.rg)
            sim.node([full], [out, x_pass], [], lambda s, g, o=out: [s.alias(g[0]), s.view(g[0], 0)])
            sim.drop(out, x)
            out = full
        return out

    def heads(self, proj: Tensor) -> Tensor:
        """``proj.view(b, s, heads, hd).transpose(1, 2)``: a view; its backward reshapes the
        transposed gradient, which copies (``ViewBackward`` of a non-contiguous gradient)."""
        sim = self.sim
        out = Tensor(proj.numel, proj.item, proj.rg, sim.alias(proj).st)
        sim.node([out], [proj], [], lambda s, g, p=proj: [s.grad(p)])
        return out

    def attention_core(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """The attention kernel; returns the [b, s, nh*hd] input of o_proj and the attention
        weights the module returns (eager only)."""
        d, sim = self.d, self.sim
        gqa = d.kv_heads != d.heads
        if self.attn == "eager":
            return self._eager(q, k, v, mask)
        if self.attn == "sdpa" and mask is not None and gqa:
            k, v = self._repeat_kv(k), self._repeat_kv(v)  # use_gqa_in_sdpa is False with a mask
            gqa = False
        else:
            k, v = sim.alias(k), sim.alias(v)
        # CUDA autocast lists sdpa as lower precision; transformers' FA2 path casts fp32 inputs too.
        qc, kc, vc = sim.ac(q), sim.ac(k), sim.ac(v)
        sim.drop(k, v)
        if self.attn == "flash_attention_2" or (qc.item == HALF and mask is None and d.head_dim <= 256):
            out = self._flash(qc, kc, vc)
            if d.model_type == "phi3":
                # The flash output copies the query's layout (mha_fwd: empty_like(q)); Phi-3's
                # query comes out of a cat, laid out [b, nh, s, hd], so transpose(1, 2).contiguous()
                # copies it for o_proj. Other models' queries keep q_proj's [b, s, nh, hd] layout.
                copy = sim.clone(out)
                sim.drop(out)
                out = copy
        elif not gqa:
            out = self._efficient(qc, kc, vc, mask)
        else:
            out = self._math(qc, kc, vc, mask)
        sim.drop(qc, kc, vc)
        return out, None

    def _flash(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Flash attention (sdpa's ``_scaled_dot_product_flash_attention`` or FA2): saves q, k, v,
        the output and an fp32 logsumexp [b, nh, s]; its output is laid out [b, s, nh, hd], so
        o_proj reads it without a copy. Backward: dq, dk, dv, plus the kernel's fp32 dq
        accumulator and softmax_d and, under GQA, full-head dk/dv before the reduction (real GPU
        allocations a meta kernel cannot show; counted when ``workspaces``)."""
        d = self.d
        ws = flash_backward_workspace(self.b, self.s, d.heads, d.kv_heads, d.head_dim, q.item)
        return self.sim.attention(q, k, v, self.b * d.heads * self.s, workspace=ws if self.workspaces else ())

    def _efficient(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """Memory-efficient attention (``_scaled_dot_product_efficient_attention``; fp32 without
        GQA, or with a mask): saves q, k, v, the output, a [b, nh, ceil(s/32)*32] fp32 logsumexp,
        the philox seed/offset and the bias (the mask, converted to the query dtype, padded to a
        multiple of 16 and expanded: ``preprocess_mask`` in torch's sdpa; in the traced router too)."""
        d, sim = self.d, self.sim
        bias = None
        if mask is not None:
            padded = -(-self.s // 16) * 16
            bias = sim.new(self.b * self.s * padded, q.item)  # where(mask, 0, -inf) then pad
        lse_len = -(-self.s // EFFICIENT_LSE_ROUND) * EFFICIENT_LSE_ROUND
        out = sim.attention(q, k, v, self.b * d.heads * lse_len, bias=bias)
        sim.drop(bias)
        return out

    def _repeat_kv(self, x: Tensor) -> Tensor:
        """``repeat_kv``: expand + reshape copies the kv heads up to nh heads; backward sums them."""
        return self.sim.repeat(x, x.numel * (self.d.heads // self.d.kv_heads))

    def _math(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """sdpa's math fallback (``_scaled_dot_product_attention_math``; fp32 with GQA): q and k
        scaled by sqrt(scale), k/v repeated to nh heads (``repeat_interleave``), an fp32 causal
        mask [s, s] built from ``ones.tril``, scores, ``scores + mask``, ``_safe_softmax`` (saved),
        ``probs @ v``; the [b, nh, s, hd] result is copied into [b, s, nh*hd] for o_proj."""
        d, sim = self.d, self.sim
        S = self.b * d.heads * self.s * self.s
        qs = sim.mul(q, None)
        tri = sim.new(self.s * self.s, 1) if mask is None else None  # ones(L, S).tril()
        fmask = sim.new(self.s * self.s, q.item) if mask is None else sim.alias(mask)
        sim.drop(tri)
        kr = self._repeat_kv(k) if d.kv_heads != d.heads else sim.alias(k)
        vr = self._repeat_kv(v) if d.kv_heads != d.heads else sim.alias(v)
        ks = sim.mul(kr, None)
        scores = sim.matmul(qs, ks, S)
        sim.drop(ks)  # the scaled key is a temporary; the scaled query stays bound (q_) until return
        masked = sim.add(scores, Tensor(fmask.numel, fmask.item, False, None))
        sim.drop(scores)
        probs = sim.softmax(masked, masked.item)
        sim.drop(masked)
        o = sim.matmul(probs, vr, self.N * self.q_dim)
        sim.drop(probs, vr, kr, fmask, qs)
        out = sim.clone(o)  # transpose(1, 2).contiguous()
        sim.drop(o)
        return out

    def _eager(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """``eager_attention_forward``: repeat_kv, ``q @ k^T`` (autocast casts both), ``* scaling``,
        ``+ mask`` (an fp32 mask promotes bf16 scores to fp32), ``softmax(dtype=fp32)`` (saved;
        a 16-bit input is converted first), ``.to(query.dtype)`` (a no-op under amp, where the
        query is fp32 after RoPE), ``probs @ v`` (autocast casts the probabilities; saved) and a
        contiguous copy of the output. Returns the output and ``attn_weights``, which the decoder
        layer keeps bound (``hidden_states, _ = self.self_attn(...)``) until it returns."""
        d, sim = self.d, self.sim
        S = self.b * d.heads * self.s * self.s
        kr = self._repeat_kv(k) if d.kv_heads != d.heads else sim.alias(k)
        vr = self._repeat_kv(v) if d.kv_heads != d.heads else sim.alias(v)
        kc, qc = sim.ac(kr), sim.ac(q)
        raw = sim.matmul(qc, kc, S)
        sim.drop(kc, qc)
        scores = sim.mul(raw, None)
        sim.drop(raw)
        if mask is not None:
            masked = sim.add(scores, Tensor(mask.numel, mask.item, False, None))
            sim.drop(scores)
            scores = masked
        probs = sim.softmax(scores, FP32)
        weights = sim.cast(probs, q.item)
        sim.drop(probs, scores)  # attn_weights rebinds: the masked scores go
        pc, vc = sim.ac(weights), sim.ac(vr)
        o = sim.matmul(pc, vc, self.N * self.q_dim)
        sim.drop(pc, vc, vr, kr)
        out = sim.clone(o)  # attn_output.transpose(1, 2).contiguous()
        sim.drop(o)
        return out, weights

    def attention(self, x: Tensor, i: int, cos: Tensor, sin: Tensor,
                  mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """``*Attention.forward``: projections, (Qwen3) q/k norms, RoPE, the KV cache's copies,
        the kernel and o_proj."""
        d, sim = self.d, self.sim
        p = f"model.layers.{i}.self_attn"
        if d.model_type == "phi3":
            qkv = self.linear(x, f"{p}.qkv_proj", self.q_dim + 2 * self.kv_dim)
            parts = [sim.slice(qkv, self.N * n) for n in (self.q_dim, self.kv_dim, self.kv_dim)]
            sim.drop(qkv)
            q, k, v = (self.heads(t) for t in parts)
            sim.drop(*parts)
        else:
            q0 = self.linear(x, f"{p}.q_proj", self.q_dim)
            k0 = self.linear(x, f"{p}.k_proj", self.kv_dim)
            v0 = self.linear(x, f"{p}.v_proj", self.kv_dim)
            if d.model_type == "qwen3":  # q_norm / k_norm over head_dim, before the transpose
                qn = self.rmsnorm(q0, f"{p}.q_norm.weight", self.N * d.heads)
                kn = self.rmsnorm(k0, f"{p}.k_norm.weight", self.N * d.kv_heads)
                sim.drop(q0, k0)
                q0, k0 = qn, kn
            q, k, v = self.heads(q0), self.heads(k0), self.heads(v0)
            sim.drop(q0, k0, v0)
        qe = self.rope(q, cos, sin)
        sim.drop(q)
        ke = self.rope(k, cos, sin)
        sim.drop(k)
        if self.use_cache:  # DynamicLayer.update: cat([empty, new]) copies keys and values
            kk, vv = sim.clone(ke), sim.clone(v)
            sim.drop(ke, v)
            ke, v = kk, vv
            self.cache_keep += [sim.alias(ke), sim.alias(v)]
        o_in, weights = self.attention_core(qe, ke, v, mask)
        sim.drop(qe, ke, v)
        out = self.linear(o_in, f"{p}.o_proj", d.hidden)
        sim.drop(o_in)
        return out, weights

    def mlp(self, x: Tensor, i: int) -> Tensor:
        """Gated MLP: ``down(act(gate(x)) * up(x))``; Phi-3 computes gate and up in one matmul and
        ``chunk``s it (SplitBackward concatenates the two gradients into one full-size tensor)."""
        d, sim = self.d, self.sim
        p = f"model.layers.{i}.mlp"
        if d.model_type == "phi3":
            gu = self.linear(x, f"{p}.gate_up_proj", 2 * d.intermediate)
            gate, up = sim.split(gu, 2)
            sim.drop(gu)
            act = sim.unary_saving_input(gate)
            prod = sim.mul(up, act)
            sim.drop(gate, up, act)
        else:
            gate = self.linear(x, f"{p}.gate_proj", d.intermediate)
            act = sim.unary_saving_input(gate)
            sim.drop(gate)
            up = self.linear(x, f"{p}.up_proj", d.intermediate)
            prod = sim.mul(act, up)
            sim.drop(act, up)
        out = self.linear(prod, f"{p}.down_proj", d.hidden)
        sim.drop(prod)
        return out

    def layer(self, x: Tensor, i: int, cos: Tensor, sin: Tensor, mask: Tensor | None) -> Tensor:
        """``*DecoderLayer.forward`` (pre-norm residual blocks). A checkpoint recomputation stops
        after the last op that saves a tensor (torch.utils.checkpoint ``_checkpoint_early_stop``),
        so its final residual add never allocates."""
        sim = self.sim
        p = f"model.layers.{i}"
        h = self.rmsnorm(x, f"{p}.input_layernorm.weight", self.N)
        a, weights = self.attention(h, i, cos, sin, mask)
        sim.drop(h)
        mid = sim.add(x, a)
        sim.drop(a)
        h2 = self.rmsnorm(mid, f"{p}.post_attention_layernorm.weight", self.N)
        m = self.mlp(h2, i)
        sim.drop(h2)
        sim.early_stop()
        out = sim.add(mid, m)
        sim.drop(mid, m, weights)
        return out

    # ---- the step ----------------------------------------------------------------------------
    def forward(self) -> tuple[Tensor, int]:
        """Forward with labels under the precision's autocast, then what HF Trainer does with the
        outputs (accelerate's fp32 upcast under amp, then drop). Returns the loss and the bytes
        held for backward."""
        d, sim = self.d, self.sim
        emb = sim.embedding(self.params["model.embed_tokens.weight"], self.N * d.hidden)
        if d.model_type == "gemma":  # GemmaTextScaledWordEmbedding: * embed_scale
            scaled = sim.mul(emb, None)
            sim.drop(emb)
            emb = scaled
        if self.input_requires_grad and not emb.rg:
            # PreTrainedModel.enable_input_require_grads: a forward hook on the input embeddings
            # calls output.requires_grad_(True) (peft and TRL do it for LoRA with checkpointing)
            sim.make_leaf(emb)
        inputs_embeds = emb
        self.cache_keep: list[Tensor] = []
        mask = None
        if self.mask_needed():
            # masking_utils: a bool [b, 1, s, s] (expanded), turned into a float mask of the
            # embeddings' dtype by eager_mask (torch.where), or kept bool for sdpa.
            boolean = sim.new(self.s * self.s, 1)
            if self.attn == "eager":
                mask = sim.new(self.b * self.s * self.s, self.a)
                sim.drop(boolean)
            else:
                mask = boolean
        pos = sim.new(self.s, INT64)  # position_ids = arange(s): [1, s]
        cos = sim.new(self.s * d.head_dim, self.a)  # rotary_emb: [1, s, hd] in the embeddings' dtype
        sin = sim.new(self.s * d.head_dim, self.a)
        x = sim.alias(inputs_embeds)
        for i in range(d.layers):
            # a checkpointed layer keeps its inputs: hidden states, cos/sin, the mask (and position ids)
            out = sim.checkpoint(lambda t, i=i: self.layer(t, i, cos, sin, mask), x, (cos, sin, mask, pos), self.ckpt)
            sim.drop(x)
            x = out
        hn = self.rmsnorm(x, "model.norm.weight", self.N)
        sim.drop(x)
        sim.drop(inputs_embeds, pos, cos, sin, mask)  # the base model returns
        logits = self.linear(hn, "lm_head", d.vocab)
        loss = self.loss(logits)
        sim.drop(hn)  # *ForCausalLM.forward returns
        sim.end_autocast()
        if self.autocast and logits.item != FP32:  # accelerate convert_outputs_to_fp32
            up = sim.new(logits.numel, FP32)
            sim.drop(up)
        sim.drop(logits, *self.cache_keep)  # HF Trainer drops the outputs
        held = sim.ledger.now["activations"] + sim.ledger.now["temporaries"]
        return loss, held

    def loss(self, logits: Tensor) -> Tensor:
        """``ForCausalLMLoss`` (transformers/loss/loss_utils.py): ``logits.float()``, labels padded
        and shifted, ``cross_entropy`` = ``log_softmax`` (saved) + ``nll_loss``."""
        sim = self.sim
        lf = sim.cast(logits, FP32)
        labels = sim.new(self.b * (self.s + 1), INT64)  # nn.functional.pad(labels, (0, 1))
        target = sim.new(self.N, INT64) if self.b > 1 else sim.alias(labels)  # [..., 1:].contiguous()
        lsm = sim.softmax(lf, FP32)  # log_softmax saves its output too (_log_softmax_backward_data)
        loss = sim.new(1, FP32, rg=lsm.rg)
        weight = sim.new(1, FP32)  # nll_loss total_weight
        sim.node([loss], [lsm], [lsm, target, weight], lambda s, g, lsm=lsm: [s.grad(lsm)])  # nll_loss_backward
        sim.drop(target, weight, lsm, labels, lf)  # labels and the fp32 logits stay bound until it returns
        return loss



def _pow_bw(s: Tape, x: Tensor) -> list[Tensor | None]:
    """``pow_backward``: ``grad * 2 * x.pow(1)``: two full-size intermediates and the result."""
    a, b = s.new(x.numel, x.item), s.new(x.numel, x.item)
    out = s.new(x.numel, x.item)
    s.drop(a, b)
    return [out]


def _rsqrt_bw(s: Tape, v: Tensor) -> list[Tensor | None]:
    """``rsqrt`` backward: ``-0.5 * result.pow(3) * grad``."""
    a, b = s.new(v.numel, v.item), s.new(v.numel, v.item)
    out = s.new(v.numel, v.item)
    s.drop(a, b)
    return [out]



def logits_loss_bytes(vocab: int, tokens: int, precision: str) -> tuple[int, int]:
    """(forward, backward) bytes of the logits and the loss at their peaks.

    Forward, at the loss (``ForCausalLMLoss``): the lm_head output in the compute dtype, its
    ``.float()`` copy and the fp32 ``log_softmax`` output (saved): 2 + 4 + 4 = 10 B per token x
    vocab entry under amp or pure bf16; in fp32 ``.float()`` is the logits themselves: 8 B.
    Backward, in the loss: the saved ``log_softmax``, ``nll_loss_backward``'s gradient and
    ``_log_softmax_backward_data``'s: 12 B (trace-notes, measured)."""
    c = FP32 if precision == "fp32" else HALF
    n = tokens * vocab
    fwd = block_bytes(n * c) + (block_bytes(n * FP32) if c != FP32 else 0) + block_bytes(n * FP32)
    return fwd, 3 * block_bytes(n * FP32)


def autocast_weight_cache_bytes(params: Sequence[Any]) -> int:
    """The 16-bit copies autocast keeps of trainable fp32 linear weights and biases until the
    forward ends (``cached_cast``: leaf tensors that require grad): 2 B per parameter of every
    trainable ``nn.Linear`` (embeddings and norms are not autocast ops). Frozen weights are cast at
    each use instead, and kept only where a matmul saves them."""
    from planner.profile.architectures import TensorKind

    total = 0
    for p in params:
        if p.trainable and p.tensor.kind in (TensorKind.LINEAR, TensorKind.BIAS):
            total += block_bytes(p.tensor.numel * HALF)
    return total


def layer_saved_bytes(
    cfg: Mapping[str, Any],
    *,
    micro_batch: int,
    seq_len: int,
    precision: str,
    attn: str = "sdpa",
    grad_ckpt: bool = False,
) -> int:
    """What one fully trained decoder layer leaves for backward (its share of
    ``held_for_backward``), from the replay: the difference between the model with one more
    layer and the model as configured. Closed forms for the common cases are in
    docs/activations.md."""
    more = dict(cfg, num_hidden_layers=cfg["num_hidden_layers"] + 1)
    kw = dict(micro_batch=micro_batch, seq_len=seq_len, precision=precision, attn=attn, grad_ckpt=grad_ckpt)
    return decoder_step_memory(more, **kw).held_for_backward - decoder_step_memory(cfg, **kw).held_for_backward


def decoder_buffer_bytes(cfg: Mapping[str, Any], weight_item: int = FP32) -> int:
    """Bytes of a decoder's buffers on the GPU: the rotary embedding's ``inv_freq`` and
    ``original_inv_freq`` ([hd/2] fp32, converted with the module), and Gemma's ``embed_scale``
    (0-dim). Non-persistent, so they are not in the parameter inventory; constant all step."""
    dims = DecoderDims.from_config(cfg)
    rotary = 2 * block_bytes((dims.head_dim // 2) * weight_item)
    return rotary + (block_bytes(weight_item) if dims.model_type == "gemma" else 0)


# --------------------------------------------------------------------------------------------
# Optimizer-phase temporaries
# --------------------------------------------------------------------------------------------


def clip_grad_norm_temporaries_bytes(n_grads: int) -> int:
    """``torch.nn.utils.clip_grad_norm_`` (HF Trainer, max_grad_norm=1.0): one 0-dim norm per
    gradient (``_foreach_norm``), their ``stack`` and the total norm alive together; the clip
    coefficient then multiplies in place."""
    if n_grads == 0:
        return 0
    return n_grads * block_bytes(FP32) + block_bytes(n_grads * FP32) + block_bytes(FP32)


def optimizer_step_temporaries_bytes(
    impl: OptimizerImpl | str, trainable_numels: Sequence[int], param_item: int
) -> int:
    """Temporaries of one optimizer step at its peak (torch 2.13 torch/optim/adamw.py; transformers
    5.24 optimization.py ``Adafactor.step``).

    Args:
        impl: the optimizer implementation.
        trainable_numels: element counts of the trainable tensors, in ``model.parameters()`` order
            (the order the optimizer walks them).
        param_item: bytes per element of the parameters (and of torch optimizers' states).
    """
    impl = OptimizerImpl(impl)
    if not trainable_numels:
        return 0
    if impl is OptimizerImpl.TORCH_ADAMW_FOREACH:
        # _multi_tensor_adamw: exp_avg_sq_sqrt = torch._foreach_sqrt(exp_avg_sqs), a full copy of
        # the second moments, alive until _foreach_addcdiv_ has used it.
        return sum(block_bytes(n * param_item) for n in trainable_numels)
    if impl is OptimizerImpl.TORCH_ADAMW_FORLOOP:
        # _single_tensor_adamw: denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps): the
        # sqrt and the quotient of tensor i, while ``denom`` still holds tensor i-1's (measured).
        return _consecutive_peak([block_bytes(n * param_item) for n in trainable_numels], 2)
    if impl is OptimizerImpl.HF_ADAFACTOR:
        # update = grad**2 + eps (pow and sum alive together) while ``update`` still holds the
        # previous tensor's; a 16-bit parameter adds its fp32 grad and fp32 data copies.
        per = 2 if param_item == FP32 else 4
        return _consecutive_peak([block_bytes(n * FP32) for n in trainable_numels], per)
    # fused AdamW (torch._fused_adamw_), DeepSpeed FusedAdam / CPU Adam, bitsandbytes 8-bit and
    # SGD with momentum update in place.
    return 0


def _consecutive_peak(sizes: Sequence[int], per_current: int) -> int:
    """``max_i(sizes[i-1] + per_current * sizes[i])``: a per-tensor loop whose result variable
    keeps the previous tensor's temporary until it is rebound."""
    best, prev = 0, 0
    for b in sizes:
        best = max(best, prev + per_current * b)
        prev = b
    return best


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def _precision(precision: str, module_dtype_bytes: int | None, autocast: bool | None) -> tuple[int, bool]:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    w = FP32 if precision in ("fp32", "amp-bf16", "amp-fp16") else HALF
    ac = precision.startswith("amp")
    if module_dtype_bytes is not None:
        if module_dtype_bytes not in (FP32, HALF):
            raise ValueError("module_dtype_bytes must be 4 or 2")
        w = module_dtype_bytes
        ac = precision.startswith("amp") and w == FP32  # DeepSpeed casts the module, no autocast
    if autocast is not None:
        ac = autocast
    return w, ac


def _trainable_map(dims: DecoderDims, params: Sequence[Any] | None) -> dict[str, bool]:
    """Which base tensors train: a name maps to True if any inventory entry of it trains (a peft
    ``modules_to_save`` copy trains in the original's place)."""
    if params is None:
        return {}
    out: dict[str, bool] = {}
    for p in params:
        if ".lora_" in p.tensor.name:
            continue
        out[p.tensor.name] = out.get(p.tensor.name, False) or bool(p.trainable)
    return out


def decoder_step_memory(
    cfg: Mapping[str, Any],
    *,
    micro_batch: int,
    seq_len: int,
    precision: str,
    attn: str = "sdpa",
    grad_ckpt: bool = False,
    optimizer_impl: OptimizerImpl | str = OptimizerImpl.TORCH_ADAMW_FUSED,
    params: Sequence[Any] | None = None,
    module_dtype_bytes: int | None = None,
    autocast: bool | None = None,
    use_cache: bool | None = None,
    max_grad_norm: bool = True,
    workspaces: bool = True,
    input_requires_grad: bool | None = None,
) -> StepMemory:
    """What one training step of a ``*ForCausalLM`` decoder holds beyond its model states.

    Args:
        cfg: the HF config fields of the decoder (``model_type`` among qwen2, qwen3, llama,
            mistral, gemma, phi3).
        micro_batch, seq_len: tokens of one micro-step (no padding: a packed or unpadded batch).
        precision: ``fp32``; ``amp-bf16`` / ``amp-fp16`` (fp32 weights, autocast over forward and
            loss, as HF Trainer); ``pure-bf16`` (bf16 module, no autocast).
        attn: ``eager``, ``sdpa`` (routed as a GPU does: flash for 16-bit without a mask, else
            memory-efficient without GQA, else math) or ``flash_attention_2`` (saves like flash;
            not traceable on a CPU-only machine).
        grad_ckpt: HF's non-reentrant ``gradient_checkpointing_enable``: each decoder layer keeps
            its input, and its forward is replayed during its backward.
        optimizer_impl: the optimizer implementation (its step temporaries).
        params: the run's parameter inventory (``planner.workload.inventory.trainable_inventory``): which
            tensors train, and LoRA adapters (``*.lora_A.weight`` / ``*.lora_B.weight``).
            None: everything trains.
        module_dtype_bytes: the module's parameter dtype when it differs from what ``precision``
            implies. DeepSpeed casts the module to 16 bit and runs no autocast: pass 2 with
            ``amp-bf16``; activation-wise that is ``pure-bf16``.
        autocast: override whether forward runs under autocast.
        use_cache: whether the forward fills a ``DynamicCache`` (HF Trainer leaves the config's
            ``use_cache``, True by default; gradient checkpointing turns it off). None: from cfg.
        max_grad_norm: gradient clipping runs (HF Trainer default 1.0).
        workspaces: count kernel workspaces that meta kernels do not show (FlashAttention
            backward's dq accumulator, softmax_d and GQA-expanded dk/dv). The tracer cannot see
            them; tests comparing with it pass False.
        input_requires_grad: the embeddings' output requires grad
            (``enable_input_require_grads``), so frozen leading layers save for backward. None:
            True for LoRA with gradient checkpointing (peft ``PeftModel`` and TRL call it then).
    """
    if attn not in ATTENTIONS:
        raise ValueError(f"attn must be one of {', '.join(ATTENTIONS)}; got {attn!r}")
    if micro_batch < 1 or seq_len < 2:
        raise ValueError("micro_batch >= 1 and seq_len >= 2 are required")
    dims = DecoderDims.from_config(cfg)
    w_item, ac = _precision(precision, module_dtype_bytes, autocast)
    cache = cfg.get("use_cache", True) if use_cache is None else use_cache
    lora = _lora_ranks(params)
    if input_requires_grad is None:
        input_requires_grad = bool(lora) and grad_ckpt
    dec = _Decoder(
        cfg,
        dims,
        micro_batch=micro_batch,
        seq_len=seq_len,
        weight_item=w_item,
        autocast=ac,
        attn=attn,
        grad_ckpt=grad_ckpt,
        use_cache=bool(cache),
        trainable=_trainable_map(dims, params),
        lora=lora,
        workspaces=workspaces,
        input_requires_grad=input_requires_grad,
    )
    sim = dec.sim
    loss, held = dec.forward()
    sim.ledger.phase = "backward"
    root = sim.new(1, FP32)  # torch.ones_like(loss): held by backward() until it returns
    sim.backward(loss, sim.alias(root))
    sim.drop(root, loss)
    fwd, bwd = sim.ledger.peak("forward"), sim.ledger.peak("backward")

    trained = {id(t.param): t for t in dec.params.values() if t.param is not None and t.param.trainable}
    sizes = [block_bytes(t.nbytes) for t in trained.values()]
    opt_grads = sum(sizes)
    clip = clip_grad_norm_temporaries_bytes(len(sizes)) if max_grad_norm else 0
    step = optimizer_step_temporaries_bytes(optimizer_impl, [t.numel for t in trained.values()], w_item)
    opt_tmp = max(clip, step)
    inputs = 2 * block_bytes(micro_batch * seq_len * INT64)
    mem = {
        "forward": fwd["activations"] + fwd["temporaries"] + fwd["gradients"],
        "backward": bwd["activations"] + bwd["temporaries"] + bwd["gradients"],
        "optimizer": opt_grads + opt_tmp,
    }
    phase = max(PHASES, key=lambda p: (mem[p], -PHASES.index(p)))
    return StepMemory(
        forward_activations=fwd["activations"],
        forward_temporaries=fwd["temporaries"] + fwd["gradients"],
        held_for_backward=held,
        backward_activations=bwd["activations"],
        backward_temporaries=bwd["temporaries"],
        backward_gradients=bwd["gradients"],
        optimizer_gradients=opt_grads,
        optimizer_temporaries=opt_tmp,
        inputs=inputs,
        peak_phase=phase,
    )
