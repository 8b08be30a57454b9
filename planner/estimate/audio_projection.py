"""Activation memory of MiniCPM-o's audio projection (``audio_projection_layer``, a
``MultiModalProjector``: linear1, ReLU, linear2) and the average pooling after it
(``audio_avg_pooler``), op by op on the step tape. Part of the estimate stage; pure arithmetic.

Source: MiniCPM-o 2.6 ``modeling_minicpmo.py`` (the copy cited in profiles/models/minicpm.toml):
``MultiModalProjector.forward`` and ``get_audio_embedding``, which runs

    audio_embeds = self.audio_projection_layer(audio_states)     # [P, L, in] -> [P, L, out]
    audio_embeds = audio_embeds.transpose(1, 2)
    audio_embeds = self.audio_avg_pooler(audio_embeds)           # AvgPool1d(2, stride=2)
    audio_embeds = audio_embeds.transpose(1, 2)                  # [P, L // 2, out]

on the Whisper encoder's last hidden state, with audio and on the training dummy alike.
Conventions and the tape: `planner.estimate.encoders` and docs/encoders.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from planner.estimate.encoder_call import EncoderMemory, cfg_value, check_call, encoder_tape, finish_call
from planner.estimate.ledger import Tensor
from planner.estimate.tape import Tape
from planner.workload.media import AUDIO_POOL_STEP


def _relu(s: Tape, x: Tensor) -> Tensor:
    """``nn.ReLU``: saves its result (derivatives.yaml ``relu``: ``threshold_backward(grad,
    result, 0)``); backward allocates one gradient of the input's shape."""
    out = s.new(x.numel, x.item, x.rg)
    s.node([out], [x], [out], lambda t, g, x=x: [t.grad(x)])
    return out


def _avg_pool(s: Tape, x: Tensor, out_numel: int) -> Tensor:
    """``AvgPool1d`` on the transposed [P, C, L] view: ``avg_pool1d`` is ``avg_pool2d`` of the
    unsqueezed view, which saves its input (derivatives.yaml ``avg_pool2d``: ``self``) and runs
    in the input's dtype (on no autocast list). The view is channels-last, so neither the CUDA
    kernel nor its backward copies it; backward allocates a gradient of the input's shape."""
    out = s.new(out_numel, x.item, x.rg)
    s.node([out], [x], [x], lambda t, g, x=x: [t.grad(x)])
    return out


def pooled_positions(positions: int, pool_step: int = AUDIO_POOL_STEP) -> int:
    """Embeddings per piece after ``AvgPool1d(pool_step, stride=pool_step)`` (no padding, floor).

    Raises:
        ValueError: fewer positions than one pooling window (torch refuses an empty output).
    """
    if positions < pool_step:
        raise ValueError(f"the audio pooling needs at least {pool_step} encoder positions; got {positions}")
    return (positions - pool_step) // pool_step + 1


def audio_projection_memory(cfg: Mapping[str, Any], *, pieces: int, positions: int, trained: bool,
                            module_dtype_bytes: int, autocast: bool, input_requires_grad: bool = False,
                            pool_step: int = AUDIO_POOL_STEP) -> EncoderMemory:
    """MiniCPM-o's audio projection and pooling over ``pieces`` pieces of ``positions`` Whisper
    positions each.

    Args:
        cfg: ``in_dim`` (the Whisper width), ``hidden_dim``, ``out_dim`` (the LLM width) and
            ``bias`` (profiles/models/minicpm.toml, group ``audio_projection_layer``).
        pieces: audio pieces of the micro-batch (one for the training dummy).
        positions: Whisper encoder positions per piece (50 a second; 50 for the dummy).
        trained: the projection's parameters require grad.
        module_dtype_bytes: parameter element size (4 fp32, 2 bf16).
        autocast: CUDA autocast to bf16/fp16 over fp32 weights (HF Trainer amp).
        input_requires_grad: the Whisper encoder is trained, so linear1 also computes the
            gradient of its input (the encoder's output, which the caller owns).
        pool_step: ``audio_pool_step`` (2).

    Returns:
        Bytes per GPU for one micro-batch's audio projection; the encoder's output it reads is
        the encoder's, not counted here.
    """
    check_call("eager", module_dtype_bytes, autocast, pieces=pieces, positions=positions)
    in_dim, hidden, out_dim = cfg_value(cfg, "in_dim"), cfg_value(cfg, "hidden_dim"), cfg_value(cfg, "out_dim")
    bias = bool(cfg.get("bias", True))
    pooled = pooled_positions(positions, pool_step)
    s = encoder_tape(autocast, module_dtype_bytes)
    w1, b1 = s.param(in_dim * hidden, trained), s.param(hidden, trained) if bias else None
    w2, b2 = s.param(hidden * out_dim, trained), s.param(out_dim, trained) if bias else None
    n = pieces * positions
    x_in = Tensor(n * in_dim, module_dtype_bytes, input_requires_grad)  # the encoder's output
    h = s.linear(x_in, w1, b1, hidden)
    r = _relu(s, h)  # self.relu(self.linear1(x)): linear1's output dies with the call
    s.drop(h)
    y = s.linear(r, w2, b2, out_dim)
    s.drop(r)
    out = _avg_pool(s, y, pieces * pooled * out_dim)  # the transposes are views
    s.drop(y)
    return finish_call(s, [out], trained or input_requires_grad)
