"""What the ledger leaves out: the parts of a step that hold memory and have no model here.

Estimate stage, pure. `step.step_items` says which groups' step memory it modelled; this module
names every group that runs in the step without one (`workload.inventory.step_input`), the
settings of a modelled group that its model ignores, and the engine settings whose bytes nothing
counts. Each becomes one `result.Unmodeled` phrase; with any, the verdict is UNKNOWN
(docs/cli.md, "FITS, DOES NOT FIT, UNKNOWN").
"""

from __future__ import annotations

from collections.abc import Sequence, Set

from planner.estimate.generic import untraced_vlm_reason, vlm_step, why_unmodeled, why_vlm_unmodeled
from planner.estimate.result import Place, Unmodeled
from planner.profile.architectures import DECODER_TYPES
from planner.profile.catalog import Group, ModelSpec
from planner.workload.inventory import Origin, Param, StepInput, Workload, step_input
from planner.workload.options import Engine, Offload, TrainingOptions

DROPOUT_KEYS = ("attention_dropout", "resid_pdrop", "embd_pdrop")
"""Dropout fields the modelled decoders read (Qwen2/3, Llama, Mistral, Gemma: ``attention_dropout``;
Phi-3 adds ``resid_pdrop`` and ``embd_pdrop``). Above 0 each adds a mask and a copy per use; the
decoder model assumes 0 (docs/activations.md, "What is not modeled")."""

NVME_GAP = "host buffers of NVMe offload: ZeRO-Infinity's pinned swap buffers are not modelled"
NO_STEP_MODEL = "activations and temporaries of every group: not estimated (a lower bound for the search)"


def unmodeled_parts(model: ModelSpec, params: Sequence[Param], options: TrainingOptions, workload: Workload,
                    modeled: Set[str] | None) -> list[Unmodeled]:
    """Everything one step holds that the ledger does not count, one phrase each.

    Args:
        model: the model.
        params: the run's parameter inventory (only its groups are built).
        options: how the step runs.
        workload: what the step processes (which encoders run, on what).
        modeled: the groups whose activations and temporaries `step.step_items` modelled; None
            when the step's own memory was left out on purpose (`estimate(activations=False)`).
    """
    out = [Unmodeled(NO_STEP_MODEL)] if modeled is None else _activation_gaps(model, params, workload, modeled,
                                                                               options)
    out += _engine_gaps(options)
    return out


def _activation_gaps(model: ModelSpec, params: Sequence[Param], workload: Workload,
                     modeled: Set[str], options: TrainingOptions) -> list[Unmodeled]:
    """Groups that run with no activation model, and modelled groups run in a way their model
    ignores (a dropout above 0, partial rotary, LoRA inside an encoder)."""
    built = {p.group for p in params}
    lora = {p.group for p in params if p.origin == Origin.LORA}
    vlm = vlm_step(model, workload)
    whole = set(vlm.groups) if vlm is not None else set()
    out = []
    for group in model.groups:
        runs_on = step_input(group.kind, workload) if group.name in built else None
        if runs_on is None:
            continue
        traced = group.name in whole or (group.kind == "decoder" and
                                         group.config.get("model_type") not in DECODER_TYPES)
        if group.name not in modeled:
            on = "" if runs_on is StepInput.TEXT else f", on {runs_on}"
            if vlm is not None and group.name in whole:
                why = why_vlm_unmodeled(vlm, params, options, workload, model.groups)
            else:
                why = why_unmodeled(group, params, options) if traced else (untraced_vlm_reason(group) or
                                                                             "no activation model")
            out.append(Unmodeled(f"activations of {group.name} ({_what(group)}{on}): {why}"))
            continue
        if not traced:  # a traced step runs the real module: its dropout and rotary are in the trace
            out += [Unmodeled(f"{gap} of {group.name}: not modelled") for gap in _config_gaps(group)]
        if group.name in lora and group.kind != "decoder":
            out.append(Unmodeled(f"LoRA adapters inside {group.name} ({group.kind}): not modelled (estimated as "
                                 "the whole encoder trained)"))
    return out


def _what(group: Group) -> str:
    if group.kind == "decoder":
        return f"model_type {group.config.get('model_type')!r}"
    if group.kind == "module":
        return "a module of a local config.json"
    return group.kind


def _config_gaps(group: Group) -> list[str]:
    """Config fields of a modelled group that change its memory and that its model ignores."""
    if group.kind != "decoder":
        return []
    cfg = group.config
    out = [f"dropout ({key} {cfg[key]:g})" for key in DROPOUT_KEYS
           if isinstance(cfg.get(key), int | float) and cfg[key] > 0]
    factor = cfg.get("partial_rotary_factor")
    if isinstance(factor, int | float) and factor < 1:
        out.append(f"partial rotary (partial_rotary_factor {factor:g})")
    return out


def _engine_gaps(options: TrainingOptions) -> list[Unmodeled]:
    """Engine settings whose bytes the ledger does not count.

    NVMe offload (ZeRO-Infinity): DeepSpeed stages the swapped tensors through pinned host
    buffers (``offload_param.buffer_count`` x ``buffer_size``; the optimizer swapper's buffers of
    the largest sub-group), which the ledger counts nowhere. (The gradient partitions it keeps on
    the host for any optimizer offload are counted there: `states._zero3_items`.) NVMe was never
    measured (docs/zero-internals.md, "Not tried: NVMe offload")."""
    nvme = Offload.NVME in (options.offload_optimizer, options.offload_param)
    if options.engine is not Engine.DEEPSPEED or not nvme:
        return []
    return [Unmodeled(NVME_GAP, Place.HOST)]

