"""The step's own memory as items: activations and temporaries of every group that runs, placed in
the phases where they are alive, next to the model states.

Pure arithmetic. Decoder LLMs come from `decoder.decoder_step_memory` (checked against traced
steps, docs/activations.md).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from planner.estimate.audio_projection import audio_projection_memory
from planner.estimate.decoder import decoder_step_memory
from planner.estimate.encoder_call import EncoderMemory
from planner.estimate.encoders import resampler_memory, vision_tower_memory
from planner.estimate.generic import fit_spec, flash_workspace_bytes, lookup, vlm_memory, vlm_step
from planner.estimate.result import FROM_BACKWARD, Category, Item, Phase, Place
from planner.estimate.states import working_dtype
from planner.estimate.whisper import whisper_encoder_memory
from planner.profile.architectures import DECODER_TYPES
from planner.profile.catalog import ModelSpec
from planner.workload.inventory import MINICPM_AUDIO_KINDS, MINICPM_VISION_KINDS, Param, StepInput, Workload, step_input
from planner.workload.media import MEL_FRAMES_PER_S, PATCH_SIZE, WHISPER_MAX_S, audio_layout
from planner.workload.options import Engine, OptimizerImpl, Precision, TrainingOptions

_DS_PRECISION = {2: Precision.PURE_BF16.value, 4: Precision.FP32.value}
"""The activation model's precision for a DeepSpeed module of this element size (no autocast)."""

FORWARD = frozenset({Phase.FORWARD})
BACKWARD = frozenset({Phase.BACKWARD})
OPTIMIZER = frozenset({Phase.OPTIMIZER})


def step_items(model: ModelSpec, params: Sequence[Param], options: TrainingOptions, workload: Workload,
               state_items: list[Item]) -> tuple[list[Item], frozenset[str]]:
    """Activation and temporary items for one rank, and the groups whose step memory they model
    (`coverage.unmodeled_parts` names each group that runs without a model: add a group here
    when its model is).

    Under plain PyTorch the gradients build up during backward: the model-state gradient items
    are moved to the optimizer phase and the gradients alive at the backward peak are added for
    the backward phase. Under DeepSpeed the engine's own gradient items stand as they are, and
    the decoder runs as a 16-bit module without autocast.
    """
    items: list[Item] = []
    modeled: set[str] = set()
    built = {p.group for p in params}
    encoders: list[tuple[str, EncoderMemory]] = []
    kinds = {g.name: g.kind for g in model.groups}
    llm_forward = llm_backward = 0
    for group in model.groups:
        if group.name not in built:
            continue
        if group.kind != "decoder":
            enc = _encoder_memory(group, params, options, workload, kinds)
            if enc is not None:
                encoders.append((group.name, enc))
            continue
        mine = [p for p in params if p.group == group.name]
        deepspeed = options.engine is Engine.DEEPSPEED
        vlm = vlm_step(model, workload)
        if vlm is not None:
            # A vision-language model's step traced whole (generic.vlm_memory): the LLM, the tower and
            # the projector in one figure, on the LLM's row; without terms all three stay unmodelled.
            mem = vlm_memory(vlm, params, options, workload, model.groups)
            if mem is None:
                continue
            modeled.update(vlm.groups)
        elif group.config.get("model_type") not in DECODER_TYPES:
            mem = _traced_memory(group, params, options, workload)
            if mem is None:
                continue  # no terms for this setup: coverage names the group, the verdict is UNKNOWN
        else:
            mem = _memo(
                decoder_step_memory,
                group.config,
                params=tuple(mine),
                micro_batch=workload.micro_batch,
                seq_len=workload.seq_len,
                # DeepSpeed runs a 16-bit module without autocast whatever the precision flag says
                # (module_dtype_bytes and autocast below): one key for amp-bf16, amp-fp16, pure-bf16.
                precision=(_DS_PRECISION[working_dtype(options).itemsize] if deepspeed else options.precision.value),
                attn=options.attn.value,
                grad_ckpt=options.grad_ckpt,
                # Under DeepSpeed the optimizer's own temporaries are the engine's (states.py), so the
                # simulator's optimizer phase is not used: one key for every DeepSpeed optimizer.
                optimizer_impl=OptimizerImpl.DS_FUSED_ADAM if deepspeed else options.optimizer_impl,
                module_dtype_bytes=working_dtype(options).itemsize if deepspeed else None,
                autocast=False if deepspeed else None,
                lora_dropout=options.lora.dropout if options.lora else 0.0,
            )
        g = group.name
        modeled.add(g)
        llm_forward += mem.forward_activations + mem.forward_temporaries
        llm_backward += mem.backward_activations + mem.backward_temporaries
        items += [
            Item(g, Category.ACTIVATIONS, Place.GPU, mem.forward_activations + mem.inputs, FORWARD),
            Item(g, Category.TEMPORARIES, Place.GPU, mem.forward_temporaries, FORWARD),
            Item(g, Category.ACTIVATIONS, Place.GPU, mem.backward_activations + mem.inputs, BACKWARD),
            Item(g, Category.TEMPORARIES, Place.GPU, mem.backward_temporaries, BACKWARD),
            Item(g, Category.ACTIVATIONS, Place.GPU, mem.inputs, OPTIMIZER),
        ]
        if not deepspeed:
            items.append(Item(g, Category.TEMPORARIES, Place.GPU, mem.optimizer_temporaries, OPTIMIZER))
            if workload.grad_accum == 1:  # with accumulation every .grad already exists (states.py)
                items.append(Item(g, Category.GRADIENTS, Place.GPU, mem.backward_gradients, BACKWARD))
    for name, enc in encoders:
        items += _encoder_items(name, enc, llm_forward, llm_backward)
    if options.engine is Engine.TORCH and workload.grad_accum == 1:
        # A modeled decoder's .grad tensors: all of them in the optimizer step; at the backward
        # peak only those already produced (added above).
        state_items[:] = [
            Item(it.group, it.category, it.place, it.nbytes, OPTIMIZER)
            if it.group in modeled and it.category is Category.GRADIENTS and it.phases == FROM_BACKWARD else it
            for it in state_items
        ]
    return [it for it in items if it.nbytes], frozenset(modeled | {name for name, _ in encoders})


def _traced_memory(group, params: Sequence[Param], options: TrainingOptions, workload: Workload):  # noqa: ANN001, ANN202
    """A decoder without a simulator: its step memory from fitted traces (``generic``), or None
    when this process holds no terms for the setup (the CLI fits or reads them first)."""
    spec = fit_spec(group, params, options)
    if isinstance(spec, str):
        return None
    terms = lookup(group.config, spec, workload.micro_batch, workload.seq_len)
    if terms is None:
        return None
    extra = flash_workspace_bytes(group.config, spec, workload.micro_batch, workload.seq_len)
    return terms.step_memory(workload.micro_batch, workload.seq_len, extra_backward=extra)


def _encoder_items(name: str, enc: EncoderMemory, llm_forward: int, llm_backward: int) -> list[Item]:
    """An encoder runs before the LLM in forward and after it in backward. What it holds for
    backward (and autocast's weight copies) stays alive through the LLM's forward and backward;
    its own peaks come at other moments, so each phase counts the larger of the two moments:
    ``max(LLM peak + held, encoder peak) = LLM peak + held + max(0, encoder peak - LLM peak - held)``.
    """
    held = enc.held_for_backward + enc.autocast_cache
    fwd_extra = max(0, enc.forward_activations + enc.forward_temporaries - llm_forward - held)
    own_backward = enc.backward_activations + enc.backward_temporaries + enc.backward_gradients
    bwd_extra = max(0, own_backward - llm_backward - enc.held_for_backward)
    return [
        Item(name, Category.ACTIVATIONS, Place.GPU, held, FORWARD),
        Item(name, Category.TEMPORARIES, Place.GPU, fwd_extra, FORWARD),
        Item(name, Category.ACTIVATIONS, Place.GPU, enc.held_for_backward, BACKWARD),
        Item(name, Category.TEMPORARIES, Place.GPU, bwd_extra, BACKWARD),
    ]


def _module_dtype(options: TrainingOptions) -> tuple[int, bool]:
    """(parameter element size, autocast) of the modules during the step."""
    if options.engine is Engine.DEEPSPEED:
        return working_dtype(options).itemsize, False
    amp = options.precision in (Precision.AMP_BF16, Precision.AMP_FP16)
    return working_dtype(options).itemsize, amp


DUMMY_IMAGE_SIDE = 224
"""MiniCPM's training forward runs ``torch.zeros((1, 3, 224, 224))`` through ``vpm`` (no patch
mask, so no attention mask) and ``resampler`` (``tgt_sizes`` [[16, 16]]) when no sample of the
micro-batch has an image, once whatever the micro-batch, and adds ``mean() * 0`` of the output to
each sample's embeddings (modeling_minicpmo.py / modeling_minicpmv.py ``get_vllm_embedding``,
``self.training`` branch)."""

DUMMY_MEL_FRAMES = 100
"""... and ``torch.zeros((1, 80, 100))`` (1 s of mel frames: 50 Whisper positions) through
``apm`` (no attention mask), ``audio_projection_layer`` and the pooling when no sample has audio
(``get_audio_embedding``, ``self.training and dummy`` branch; ``get_omni_embedding`` adds its
``mean() * 0``)."""


def _encoder_memory(group, params: Sequence[Param], options: TrainingOptions, workload: Workload,  # noqa: ANN001
                    kinds: Mapping[str, str]) -> EncoderMemory | None:
    """The vision tower, resampler, audio encoder or audio projection of a MiniCPM-style model, on
    the sample's media or on MiniCPM's training dummy (`inventory.step_input`); None for others.

    Args:
        group: the encoder's group.
        params: the run's parameter inventory (what is trained).
        options: how the step runs (precision, engine, checkpointing).
        workload: what the step processes.
        kinds: every group's kind by name (which groups feed a resampler or a projection).
    """
    runs_on = step_input(group.kind, workload)
    item, autocast = _module_dtype(options)
    common = dict(trained=any(p.trainable for p in params if p.group == group.name), module_dtype_bytes=item,
                  autocast=autocast)
    if group.kind in MINICPM_VISION_KINDS:
        crops, patches, masked = _vision_call(workload, runs_on)
        if group.kind == "siglip_vision":
            # MiniCPM's fine-tuning runs the tower's attention eager and checkpoints its layers
            # with the LLM's (finetune.py); crops of different lengths are padded and masked.
            return _memo(vision_tower_memory, group.config, crops=crops, patches=patches, attn="eager",
                         grad_ckpt=options.grad_ckpt, masked=masked, **common)
        return _memo(resampler_memory, group.config, crops=crops, patches=patches,
                     input_requires_grad=_fed_by_trained(params, kinds, "siglip_vision"), **common)
    if group.kind in MINICPM_AUDIO_KINDS:
        pieces, positions = _audio_call(workload, runs_on)
        if group.kind == "whisper_encoder":
            return _memo(whisper_encoder_memory, group.config, pieces=pieces, positions=positions, attn="eager",
                         grad_ckpt=options.grad_ckpt, minicpm_o=True, masked=runs_on is StepInput.AUDIO, **common)
        return _memo(audio_projection_memory, group.config, pieces=pieces, positions=positions,
                     input_requires_grad=_fed_by_trained(params, kinds, "whisper_encoder"), **common)
    return None


def _vision_call(workload: Workload, runs_on: StepInput | None) -> tuple[int, int, bool]:
    """(crops, patches per crop, padded and masked) of the micro-batch's vision call: every crop
    of every image, or the one 224 x 224 dummy crop ((224 / 14)^2 = 256 patches)."""
    if runs_on is StepInput.DUMMY_IMAGE:
        return 1, (DUMMY_IMAGE_SIDE // PATCH_SIZE) ** 2, False
    layout = workload.image_layout()
    crops = workload.micro_batch * workload.images * len(layout.crops)
    sizes = {(w // PATCH_SIZE) * (h // PATCH_SIZE) for w, h in layout.crops}
    return crops, layout.max_crop_patches, len(sizes) > 1 or workload.micro_batch * workload.images > 1


def _audio_call(workload: Workload, runs_on: StepInput | None) -> tuple[int, int]:
    """(pieces, Whisper positions per piece) of the micro-batch's audio call: every sample's
    30-second pieces, or the one 100-frame dummy."""
    if runs_on is StepInput.DUMMY_AUDIO:
        return 1, audio_layout(DUMMY_MEL_FRAMES / MEL_FRAMES_PER_S).encoder_positions
    audio = workload.audio()
    full = audio_layout(WHISPER_MAX_S).encoder_positions  # 1500: longer audio is cut into pieces
    return workload.micro_batch * audio.pieces, min(audio.encoder_positions, full)


def _fed_by_trained(params: Sequence[Param], kinds: Mapping[str, str], feeder_kind: str) -> bool:
    """Whether a group of ``feeder_kind`` (the encoder before a resampler or projection) trains,
    so the consumer's input needs a gradient."""
    return any(p.trainable for p in params if kinds.get(p.group) == feeder_kind)


_MEMO: dict[tuple, Any] = {}
_MEMO_LIMIT = 4096


def _memo(fn: Callable[..., Any], cfg: Mapping[str, Any], **kwargs: Any) -> Any:
    """``fn(cfg, **kwargs)``, remembered: the simulators are pure and cost milliseconds, and the
    search asks the same activation question for many ZeRO/offload settings. A ``params``
    argument is keyed by what the simulators read of it (name, shape, trained)."""
    key_args = []
    for name, value in sorted(kwargs.items()):
        if name == "params":
            value = tuple((p.tensor.name, p.tensor.shape, p.trainable) for p in value)
        key_args.append((name, value))
    key = (fn.__name__, json.dumps(cfg, sort_keys=True, default=str), tuple(key_args))
    if key not in _MEMO:
        if len(_MEMO) >= _MEMO_LIMIT:
            _MEMO.clear()
        _MEMO[key] = fn(cfg, **kwargs)
    return _MEMO[key]
