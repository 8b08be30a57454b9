"""Activation memory of MiniCPM-o's Whisper audio encoder (transformers 5.24
``models/whisper/modeling_whisper.py``), op by op on the step tape. Part of the estimate stage;
pure arithmetic. Conventions and sources: `planner.estimate.encoders` and docs/encoders.md.
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
from planner.estimate.ledger import BOOL, INT64, Tensor
from planner.estimate.tape import Tape

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
        o, probs = attention_eager(s, q, k, v, c, heads, seq, mask, clone_qkv=False, explicit_fp32=False)
    else:
        # the kernel's output takes the layout of the contiguous [b, h, L, d] query (meta and CUDA:
        # empty_like(query)), so `attn_output.transpose(1, 2).contiguous()` copies it
        flash = s.attention(q, k, v, c * heads * lse_len(s, seq))
        o, probs = s.clone(flash), None
        s.drop(flash)
    s.drop(q, k, v)
    return layer_tail(s, x, o, h, probs, p, d, n, inter, keep_ln2_through_fc2=False)


def whisper_encoder_memory(cfg: Mapping[str, Any], *, pieces: int, positions: int, attn: str, trained: bool,
                           grad_ckpt: bool, module_dtype_bytes: int, autocast: bool,
                           minicpm_o: bool = False, masked: bool = True) -> EncoderMemory:
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
            returns). Eager only with the mask (sdpa would then take the memory-efficient kernel,
            which is not modelled).
        masked: with ``minicpm_o``, the real audio's padding + chunk mask (``get_audio_embedding``
            with audio). False: the training dummy for a sample without audio,
            ``self.apm(dummy_wavs, output_hidden_states=True)`` on a [1, 80, 100] mel input, which
            builds no mask (modeling_minicpmo.py ``get_audio_embedding``, ``self.training and
            dummy`` branch).

    Returns:
        Bytes per GPU for one micro-batch's audio encoder.
    """
    check_call(attn, module_dtype_bytes, autocast, pieces=pieces, positions=positions)
    masked = minicpm_o and masked
    if masked and attn != "eager":
        raise ValueError("the MiniCPM-o audio path (an attention mask) is modelled for eager attention only")
    d, inter = cfg_value(cfg, "d_model"), cfg_value(cfg, "encoder_ffn_dim")
    layers, heads = cfg_value(cfg, "encoder_layers"), cfg_value(cfg, "encoder_attention_heads")
    mels = cfg_value(cfg, "num_mel_bins")
    s = encoder_tape(autocast, module_dtype_bytes)
    c1w, c1b = s.param(d * mels * 3, trained), s.param(d, trained)
    c2w, c2b = s.param(d * d * 3, trained), s.param(d, trained)
    table = s.param(positions * d, False)  # WhisperEncoder.__init__: embed_positions.requires_grad_(False)
    blocks = [layer_params(s, trained, d, inter, k_bias=False) for _ in range(layers)]
    ln_w, ln_b = s.param(d, trained), s.param(d, trained)
    n, square = pieces * positions, pieces * positions * positions
    held: list[Tensor] = []
    mask = None
    if masked:  # built by the caller before the encoder runs
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
    return finish_call(s, [out], trained)

