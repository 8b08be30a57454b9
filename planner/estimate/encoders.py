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
from typing import Any

from planner.estimate.encoder_call import (
    EncoderMemory,
    attention_eager,
    cfg_value,
    check_call,
    encoder_tape,
    finish_call,
    layer_params,
    layer_tail,
    lse_len,
)
from planner.estimate.ledger import BOOL, FP32, Tensor
from planner.estimate.tape import Tape

VISION_BATCH_SIZE = 16
"""Crops per vision-tower call: MiniCPM-V 2.6 / o 2.6 ``get_vllm_embedding`` (``vision_batch_size``)."""

RESAMPLER_MAX_GRID = 70
"""MiniCPM resampler ``max_size=(70, 70)``: its 2-D sin-cos table is [70, 70, D]; a crop's slice
``pos_embed[:h, :w]`` is copied by ``reshape`` whenever ``w < 70``, i.e. always in practice."""


# --------------------------------------------------------------------------------------------
# SigLIP vision tower (transformers SiglipVisionModel without the pooling head)
# --------------------------------------------------------------------------------------------


def _siglip_layer(s: Tape, x: Tensor, p: dict[str, Tensor], dims: tuple[int, ...], attn: str,
                  mask: Tensor | None) -> Tensor:
    c, seq, d, inter, heads = dims
    n = c * seq
    h = s.layer_norm(x, p["ln1.w"], p["ln1.b"], n)
    q = s.linear(h, p["q.w"], p["q.b"], d)
    k = s.linear(h, p["k.w"], p["k.b"], d)
    v = s.linear(h, p["v.w"], p["v.b"], d)
    if attn == "eager":
        o, probs = attention_eager(s, q, k, v, c, heads, seq, mask, clone_qkv=c > 1, explicit_fp32=True)
    else:  # q is a transposed view of q_proj's output, so the kernel's output (empty_like(query))
        # is already [b, L, h, d] in memory and `.transpose(1, 2).contiguous()` is free
        o, probs = s.attention(q, k, v, c * heads * lse_len(s, seq)), None
    s.drop(q, k, v)
    return layer_tail(s, x, o, h, probs, p, d, n, inter, keep_ln2_through_fc2=True)


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
    check_call(attn, module_dtype_bytes, autocast, crops=crops, patches=patches)
    if chunk < 0:
        raise ValueError(f"chunk must be >= 0; got {chunk}")
    if masked and attn != "eager":
        raise ValueError("masked crops are modelled for eager attention only")
    d, inter = cfg_value(cfg, "hidden_size"), cfg_value(cfg, "intermediate_size")
    layers, heads = cfg_value(cfg, "num_hidden_layers"), cfg_value(cfg, "num_attention_heads")
    patch, image = cfg_value(cfg, "patch_size"), cfg_value(cfg, "image_size")
    channels = cfg_value(cfg, "num_channels", 3)
    s = encoder_tape(autocast, module_dtype_bytes)
    conv_w, conv_b = s.param(d * channels * patch * patch, trained), s.param(d, trained)
    pos_w = s.param((image // patch) ** 2 * d, trained)
    blocks = [layer_params(s, trained, d, inter) for _ in range(layers)]
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
    return finish_call(s, outs, trained)


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
    check_call("eager", module_dtype_bytes, autocast, crops=crops, patches=patches)
    q_len, d, heads = cfg_value(cfg, "num_queries"), cfg_value(cfg, "embed_dim"), cfg_value(cfg, "num_heads")
    kv_dim = cfg.get("kv_dim") or d
    s = encoder_tape(autocast, module_dtype_bytes)
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
    res = s.linear(post, proj, None, d)  # x @ self.proj
    s.drop(post, q, pos, padding, out)  # `out = self.attn(...)[0]` is referenced until the return
    return finish_call(s, [res], trained or input_requires_grad)


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
