"""Activation memory of MiniCPM's encoders: SigLIP vision tower, perceiver resampler, Whisper encoder.

Part of the estimate stage; pure arithmetic (no torch, no I/O). Each encoder's forward is written
out op by op as the real code runs it (transformers 5.24 ``models/siglip/modeling_siglip.py``,
``models/whisper/modeling_whisper.py``; MiniCPM-V 2.6 / o 2.6 ``resampler.py`` with torch 2.13
``F.multi_head_attention_forward``) on the step tape (``planner.estimate.tape``: the autograd
replay and checkpoint recomputation, on ``planner.estimate.ledger``, with the ops of
``planner.estimate.ops`` and autocast's weight cache; shared with the decoder), and Python
references die where the real code drops them. Checkpoint regions follow ``Recompute.AT_UNPACK``
and a weight used by several chunks ``GradSum.FIRST_IN_PLACE``.

The closed forms these replays reduce to, their sources and the comparison with a traced step
(``planner.judge.trace``, tests/estimate/test_encoders_vs_trace.py) are in docs/encoders.md.

Conventions: C = crops (or audio pieces) in one encoder call, L = patches per crop (or encoder
positions per piece), N = C*L, D = hidden, I = MLP width, h = heads, S = C*h*L*L attention scores.
Every storage is rounded up to 512 bytes (``ALLOC_GRANULE_BYTES``) as the CUDA caching allocator
and ``MemTracker`` do.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from planner.estimate.ledger import ALLOC_GRANULE_BYTES, BOOL, FP32, HALF, INT64, Tensor
from planner.estimate.ops import EFFICIENT_LSE_ROUND
from planner.estimate.tape import GradSum, Recompute, Tape

__all__ = [
    "ALLOC_GRANULE_BYTES", "ATTENTIONS", "BOOL", "EFFICIENT_LSE_ROUND", "FP32", "HALF", "INT64", "PHASES",
    "RESAMPLER_MAX_GRID", "VISION_BATCH_SIZE", "EncoderMemory", "resampler_memory", "vision_tower_memory",
    "whisper_encoder_memory",
]

VISION_BATCH_SIZE = 16
"""Crops per vision-tower call: MiniCPM-V 2.6 / o 2.6 ``get_vllm_embedding`` (``vision_batch_size``)."""

RESAMPLER_MAX_GRID = 70
"""MiniCPM resampler ``max_size=(70, 70)``: its 2-D sin-cos table is [70, 70, D]; a crop's slice
``pos_embed[:h, :w]`` is copied by ``reshape`` whenever ``w < 70``, i.e. always in practice."""

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


def _tape(autocast: bool, module_dtype_bytes: int) -> Tape:
    return Tape(autocast=autocast, weight_item=module_dtype_bytes, recompute=Recompute.AT_UNPACK,
                grad_sum=GradSum.FIRST_IN_PLACE)


def _finish(s: Tape, outs: list[Tensor], trained_path: bool) -> EncoderMemory:
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


def _check(attn: str, module_dtype_bytes: int, autocast: bool, **counts: int) -> None:
    for name, value in counts.items():
        if value < 1:
            raise ValueError(f"{name} must be at least 1; got {value}")
    if attn not in ATTENTIONS:
        raise ValueError(f"attn must be one of {', '.join(ATTENTIONS)}; got {attn!r}")
    if module_dtype_bytes not in (FP32, HALF):
        raise ValueError(f"module_dtype_bytes must be 4 (fp32) or 2 (bf16/fp16); got {module_dtype_bytes}")
    if autocast and module_dtype_bytes != FP32:
        raise ValueError("autocast is modelled over fp32 weights (amp); a bf16 module runs without it")


def _get(cfg: Mapping[str, Any], key: str, default: Any = None) -> Any:
    if key in cfg:
        return cfg[key]
    if default is None:
        raise ValueError(f"config is missing required field {key!r}")
    return default


# --------------------------------------------------------------------------------------------
# SigLIP vision tower (transformers SiglipVisionModel without the pooling head)
# --------------------------------------------------------------------------------------------


def _attention_eager(s: Tape, q: Tensor, k: Tensor, v: Tensor, c: int, heads: int, seq: int, mask: Tensor | None,
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


def _siglip_layer(s: Tape, x: Tensor, p: dict[str, Tensor], dims: tuple[int, ...], attn: str,
                  mask: Tensor | None) -> Tensor:
    c, seq, d, inter, heads = dims
    n = c * seq
    h = s.layer_norm(x, p["ln1.w"], p["ln1.b"], n)
    q = s.linear(h, p["q.w"], p["q.b"], d)
    k = s.linear(h, p["k.w"], p["k.b"], d)
    v = s.linear(h, p["v.w"], p["v.b"], d)
    if attn == "eager":
        o, probs = _attention_eager(s, q, k, v, c, heads, seq, mask, clone_qkv=c > 1, explicit_fp32=True)
    else:  # q is a transposed view of q_proj's output, so the kernel's output (empty_like(query))
        # is already [b, L, h, d] in memory and `.transpose(1, 2).contiguous()` is free
        o, probs = s.attention(q, k, v, c * heads * _lse_len(s, seq)), None
    s.drop(q, k, v)
    a = s.linear(o, p["o.w"], p["o.b"], d)
    s.drop(o, h)
    x2 = s.add(x, a)
    s.drop(a)
    h2 = s.layer_norm(x2, p["ln2.w"], p["ln2.b"], n)
    f = s.linear(h2, p["fc1.w"], p["fc1.b"], inter)
    g = s.unary_saving_input(f)
    s.drop(f)
    y = s.linear(g, p["fc2.w"], p["fc2.b"], d)
    s.drop(g, h2)
    out = s.add(x2, y)
    s.drop(x2, y, probs)  # `hidden_states, _ = self.self_attn(...)`: `_` lives to the layer's end
    return out


def _lse_len(s: Tape, seq: int) -> int:
    """Logsumexp length per (batch, head): flash keeps L; memory-efficient (fp32) rounds to 32."""
    return seq if s.compute_item == HALF else -(-seq // EFFICIENT_LSE_ROUND) * EFFICIENT_LSE_ROUND


def _layer_params(s: Tape, trained: bool, d: int, inter: int, k_bias: bool = True) -> dict[str, Tensor]:
    shapes = {"ln1.w": d, "ln1.b": d, "q.w": d * d, "q.b": d, "k.w": d * d, "k.b": d if k_bias else 0,
              "v.w": d * d, "v.b": d, "o.w": d * d, "o.b": d, "ln2.w": d, "ln2.b": d,
              "fc1.w": d * inter, "fc1.b": inter, "fc2.w": inter * d, "fc2.b": d}
    return {k: s.param(v, trained) for k, v in shapes.items() if v}


def vision_tower_memory(cfg: Mapping[str, Any], *, crops: int, patches: int, chunk: int = VISION_BATCH_SIZE,
                        attn: str = "eager", trained: bool, grad_ckpt: bool, module_dtype_bytes: int,
                        autocast: bool, masked: bool = False) -> EncoderMemory:
    """SigLIP vision tower (``vpm``) over ``crops`` crops of ``patches`` patches each, run in
    chunks of ``chunk`` crops whose outputs are concatenated (MiniCPM ``get_vllm_embedding``).

    Args:
        cfg: SigLIP vision config (``hidden_size``, ``intermediate_size``, ``num_hidden_layers``,
            ``num_attention_heads``, ``patch_size``, ``image_size``, ``num_channels``).
        crops: crops of the micro-batch (all images); patches: the longest crop's patch count
            (every crop is padded to it).
        chunk: crops per tower call (0: all at once).
        attn: ``eager`` (MiniCPM's default for the tower) or ``sdpa``.
        trained: the tower's parameters require grad; False also means its input needs none, so
            autograd saves nothing (``--tune_vision false``).
        grad_ckpt: non-reentrant checkpointing of each encoder layer.
        module_dtype_bytes: parameter element size (4 fp32, 2 bf16).
        autocast: CUDA autocast to bf16/fp16 over fp32 weights (HF Trainer amp).
        masked: some crops are shorter than ``patches``; MiniCPM's navit tower then adds a
            [C, 1, L, L] mask to eager scores (``_prepare_4d_attention_mask``). Eager only.

    Returns:
        Bytes per GPU for one micro-batch's vision tower.
    """
    _check(attn, module_dtype_bytes, autocast, crops=crops, patches=patches)
    if chunk < 0:
        raise ValueError(f"chunk must be >= 0; got {chunk}")
    if masked and attn != "eager":
        raise ValueError("masked crops are modelled for eager attention only")
    d, inter = _get(cfg, "hidden_size"), _get(cfg, "intermediate_size")
    layers, heads = _get(cfg, "num_hidden_layers"), _get(cfg, "num_attention_heads")
    patch, image = _get(cfg, "patch_size"), _get(cfg, "image_size")
    channels = _get(cfg, "num_channels", 3)
    s = _tape(autocast, module_dtype_bytes)
    conv_w, conv_b = s.param(d * channels * patch * patch, trained), s.param(d, trained)
    pos_w = s.param((image // patch) ** 2 * d, trained)
    blocks = [_layer_params(s, trained, d, inter) for _ in range(layers)]
    post_w, post_b = s.param(d, trained), s.param(d, trained)
    chunk = chunk or crops
    outs: list[Tensor] = []
    for start in range(0, crops, chunk):
        c = min(chunk, crops - start)
        n = c * patches
        pixels = Tensor(c * channels * patches * patch * patch, module_dtype_bytes, False)  # the caller's
        emb = s.conv(pixels, conv_w, conv_b, n * d)
        pos = s.embedding(pos_w, patches * d)
        x = s.add(emb, pos)
        s.drop(emb, pos)
        mask = _navit_mask(s, c, patches, x.item) if masked else None
        embeds = s.alias(x)  # SiglipEncoder.forward(inputs_embeds): referenced until the tower returns
        for p in blocks:
            y = s.checkpoint(lambda t, p=p, c=c, mask=mask: _siglip_layer(s, t, p, (c, patches, d, inter, heads),
                                                                           attn, mask), x, (mask,), grad_ckpt)
            s.drop(x)
            x = y
        out = s.layer_norm(x, post_w, post_b, n)
        s.drop(x, mask, embeds)
        outs.append(out)
    return _finish(s, outs, trained)


def _navit_mask(s: Tape, c: int, seq: int, item: int) -> Tensor:
    """``_prepare_4d_attention_mask(mask, dtype)``: expand().to(dtype), ``1.0 - mask``, a bool
    copy for ``masked_fill`` and its result, all [C, 1, L, L]; the last one is kept."""
    numel = c * seq * seq
    expanded = s.new(numel, item)
    inverted = s.new(numel, item)
    s.drop(expanded)
    as_bool = s.new(numel, BOOL)
    mask = s.new(numel, item)
    s.drop(inverted, as_bool)
    return mask


# --------------------------------------------------------------------------------------------
# Whisper encoder (transformers WhisperEncoder)
# --------------------------------------------------------------------------------------------


def _whisper_layer(s: Tape, x: Tensor, p: dict[str, Tensor], dims: tuple[int, ...], attn: str,
                   mask: Tensor | None) -> Tensor:
    c, seq, d, inter, heads = dims
    n = c * seq
    h = s.layer_norm(x, p["ln1.w"], p["ln1.b"], n)
    q0 = s.linear(h, p["q.w"], p["q.b"], d)
    q1 = s.mul(q0, None)  # q_proj(x) * self.scaling
    s.drop(q0)
    q = s.clone(q1)  # .view().transpose(1, 2).contiguous()
    s.drop(q1)
    k0 = s.linear(h, p["k.w"], None, d)
    k = s.clone(k0)
    s.drop(k0)
    v0 = s.linear(h, p["v.w"], p["v.b"], d)
    v = s.clone(v0)
    s.drop(v0)
    if attn == "eager":
        o, probs = _attention_eager(s, q, k, v, c, heads, seq, mask, clone_qkv=False, explicit_fp32=False)
    else:
        # the kernel's output takes the layout of the contiguous [b, h, L, d] query (meta and CUDA:
        # empty_like(query)), so `attn_output.transpose(1, 2).contiguous()` copies it
        flash = s.attention(q, k, v, c * heads * _lse_len(s, seq))
        o, probs = s.clone(flash), None
        s.drop(flash)
    s.drop(q, k, v)
    a = s.linear(o, p["o.w"], p["o.b"], d)
    s.drop(o, h)
    x2 = s.add(x, a)
    s.drop(a)
    h2 = s.layer_norm(x2, p["ln2.w"], p["ln2.b"], n)
    f = s.linear(h2, p["fc1.w"], p["fc1.b"], inter)
    g = s.unary_saving_input(f)  # hidden_states = self.activation_fn(self.fc1(hidden_states))
    s.drop(f, h2)
    y = s.linear(g, p["fc2.w"], p["fc2.b"], d)
    s.drop(g)
    out = s.add(x2, y)
    s.drop(x2, y, probs)
    return out


def whisper_encoder_memory(cfg: Mapping[str, Any], *, pieces: int, positions: int, attn: str, trained: bool,
                           grad_ckpt: bool, module_dtype_bytes: int, autocast: bool,
                           minicpm_o: bool = False) -> EncoderMemory:
    """Whisper encoder (``apm``) over ``pieces`` audio pieces of ``positions`` encoder positions
    each (1500 for 30 s; the mel input has twice as many frames).

    Args:
        cfg: Whisper config (``d_model``, ``encoder_layers``, ``encoder_attention_heads``,
            ``encoder_ffn_dim``, ``num_mel_bins``).
        attn, trained, grad_ckpt, module_dtype_bytes, autocast: as ``vision_tower_memory``.
        minicpm_o: run it as MiniCPM-o 2.6's ``get_audio_hidden_states`` runs its
            ``MiniCPMWhisperEncoder``: an additive [P, 1, L, L] padding + per-second chunk mask
            in the weights' dtype (with its bool [P, 1, L, L] and [L, L] helpers alive
            alongside), the position table sliced instead of looked up, and
            ``output_hidden_states=True`` (every layer's input referenced until the encoder
            returns). Eager only (with a mask, sdpa would take the memory-efficient kernel,
            which is not modelled).

    Returns:
        Bytes per GPU for one micro-batch's audio encoder.
    """
    _check(attn, module_dtype_bytes, autocast, pieces=pieces, positions=positions)
    if minicpm_o and attn != "eager":
        raise ValueError("the MiniCPM-o audio path (an attention mask) is modelled for eager attention only")
    d, inter = _get(cfg, "d_model"), _get(cfg, "encoder_ffn_dim")
    layers, heads, mels = _get(cfg, "encoder_layers"), _get(cfg, "encoder_attention_heads"), _get(cfg, "num_mel_bins")
    s = _tape(autocast, module_dtype_bytes)
    c1w, c1b = s.param(d * mels * 3, trained), s.param(d, trained)
    c2w, c2b = s.param(d * d * 3, trained), s.param(d, trained)
    table = s.param(positions * d, False)  # WhisperEncoder.__init__: embed_positions.requires_grad_(False)
    blocks = [_layer_params(s, trained, d, inter, k_bias=False) for _ in range(layers)]
    ln_w, ln_b = s.param(d, trained), s.param(d, trained)
    n, square = pieces * positions, pieces * positions * positions
    held: list[Tensor] = []
    mask = None
    if minicpm_o:  # built by the caller before the encoder runs
        mask = s.new(square, module_dtype_bytes)  # padding_mask.view().expand().to(conv1.weight.dtype)
        chunk = s.new(positions * positions, BOOL)  # subsequent_chunk_mask
        not_chunk = s.new(positions * positions, BOOL)
        merged = s.new(square, BOOL)  # torch.logical_or(...), then mask[merged] = -inf in place
        s.drop(not_chunk)
        held += [mask, chunk, merged]
    feats = Tensor(pieces * mels * 2 * positions, module_dtype_bytes, False)  # the caller's
    c1 = s.conv(feats, c1w, c1b, pieces * d * 2 * positions)
    g1 = s.unary_saving_input(c1)
    s.drop(c1)
    c2 = s.conv(g1, c2w, c2b, n * d)
    s.drop(g1)
    g2 = s.unary_saving_input(c2)
    s.drop(c2)
    if minicpm_o:  # hidden_states = inputs_embeds + self.embed_positions.weight[:L]
        x = s.add(g2, table)
    else:
        arange = s.new(positions, INT64)  # all_positions
        pos = s.embedding(table, positions * d)
        x = s.add(g2, pos)
        s.drop(pos)
        held.append(arange)
    held.append(g2)  # `inputs_embeds` stays referenced until the encoder's forward returns
    for p in blocks:
        if minicpm_o:
            held.append(s.alias(x))  # encoder_states += (hidden_states,)
        y = s.checkpoint(lambda t, p=p: _whisper_layer(s, t, p, (pieces, positions, d, inter, heads), attn, mask),
                         x, (mask,), grad_ckpt)
        s.drop(x)
        x = y
    out = s.layer_norm(x, ln_w, ln_b, n)
    s.drop(x, *held)
    return _finish(s, [out], trained)


# --------------------------------------------------------------------------------------------
# MiniCPM resampler (resampler.py ``Resampler.forward`` with torch's multi_head_attention_forward)
# --------------------------------------------------------------------------------------------


def resampler_memory(cfg: Mapping[str, Any], *, crops: int, patches: int, trained: bool, module_dtype_bytes: int,
                     autocast: bool, input_requires_grad: bool = False) -> EncoderMemory:
    """MiniCPM's perceiver resampler over ``crops`` crops of ``patches`` patches (all the same
    size: no key padding).

    Args:
        cfg: ``num_queries``, ``embed_dim``, ``num_heads``, ``kv_dim`` (the vision width).
        trained: its parameters require grad (MiniCPM's fine-tuning script always trains it).
        module_dtype_bytes, autocast: as ``vision_tower_memory``.
        input_requires_grad: the vision tower is trained, so ``kv_proj`` also returns the gradient
            of its input.

    Returns:
        Bytes per GPU for one micro-batch's resampler call.
    """
    _check("eager", module_dtype_bytes, autocast, crops=crops, patches=patches)
    q_len, d, heads = _get(cfg, "num_queries"), _get(cfg, "embed_dim"), _get(cfg, "num_heads")
    kv_dim = cfg.get("kv_dim") or d
    s = _tape(autocast, module_dtype_bytes)
    query = s.param(q_len * d, trained)
    kv_w = s.param(d * kv_dim, trained) if kv_dim != d else None
    in_w, in_b = s.param(3 * d * d, trained), s.param(3 * d, trained)
    out_w, out_b = s.param(d * d, trained), s.param(d, trained)
    lns = {k: (s.param(d, trained), s.param(d, trained)) for k in ("q", "kv", "post")}
    proj = s.param(d * d, trained)
    md, c, n = module_dtype_bytes, crops, crops * patches
    x_in = Tensor(n * kv_dim, md, input_requires_grad)  # the tower's output, owned by the caller

    padding = s.new(n, BOOL)  # key_padding_mask = torch.zeros((bs, max_patch_len), dtype=bool)
    per_crop = [s.new(patches * d, md) for _ in range(c)]  # pos_embed[:h, :w].reshape(): copies
    pos = s.new(n * d, md)  # pad_sequence
    s.drop(*per_crop)
    kv = s.linear(x_in, kv_w, None, d) if kv_w is not None else s.alias(x_in)
    xk = s.layer_norm(kv, *lns["kv"], n)  # permuted [L, C, D] view of [C, L, D]
    s.drop(kv)
    q = s.layer_norm(query, *lns["q"], q_len)
    qr = s.repeat(q, q.numel * c)
    key = s.add(xk, pos)
    out = _mha(s, qr, key, xk, in_w, in_b, out_w, out_b, c, q_len, patches, d, heads)
    s.drop(qr, key, xk)  # x = out.permute(1, 0, 2) releases ln_kv's output
    post = s.layer_norm(out, *lns["post"], c * q_len)
    s.drop(out)
    res = s.linear(post, proj, None, d)  # x @ self.proj
    s.drop(post, q, pos, padding)
    return _finish(s, [res], trained or input_requires_grad)


def _mha(s: Tape, query: Tensor, key: Tensor, value: Tensor, in_w: Tensor, in_b: Tensor, out_w: Tensor,
         out_b: Tensor, c: int, q_len: int, seq: int, d: int, heads: int) -> Tensor:
    """torch 2.13 ``F.multi_head_attention_forward``, training, ``need_weights=True`` (MiniCPM's
    call), a bool ``key_padding_mask`` and query, key, value three different tensors."""
    kpm = s.new(c * seq, query.item)  # _canonical_mask: zeros_like(float).masked_fill_
    wq, wk, wv = s.split(in_w, 3)
    bq, bk, bv = s.split(in_b, 3)
    # key and value are [L, C, D] views of [C, L, D] tensors: contiguous only for one crop
    qp = s.linear(query, wq, bq, d, cacheable=False)
    kp = s.linear(key, wk, bk, d, contiguous=c == 1, cacheable=False)
    vp = s.linear(value, wv, bv, d, contiguous=c == 1, cacheable=False)
    # .view(C, 1, 1, L).expand(-1, heads, -1, -1).reshape(C * heads, 1, L): a copy unless C == 1
    mask = s.new(c * heads * seq, kpm.item) if c > 1 else s.alias(kpm)
    s.drop(kpm)
    qs = s.mul(qp, None)  # q * sqrt(1 / E); `q` itself stays referenced until the function returns
    # baddbmm is autocast lower precision: the cast materialises the expanded [C*h, 1, L] mask
    m = s.new(c * heads * seq, s.compute_item) if s.autocast and mask.item != s.compute_item else s.alias(mask)
    scores = s.matmul(qs, kp, c * heads * q_len * seq)
    s.drop(qs, m)
    probs = s.softmax(scores, FP32 if s.autocast else scores.item)
    s.drop(scores)
    pc = s.ac(probs)
    o = s.matmul(pc, vp, c * q_len * d)
    s.drop(pc)
    oc = s.clone(o)  # transpose(0, 1).reshape(tgt_len * bsz, E)
    s.drop(o)
    out = s.linear(oc, out_w, out_b, d)
    s.drop(oc)
    averaged = s.new(c * q_len * seq, probs.item)  # attn_output_weights.mean(dim=1), discarded
    s.drop(averaged, probs, qp, kp, vp, mask)
    return out
