"""Decoders without a hand-written simulator: which traced terms a setup needs (`fit_spec`), the
terms this process holds (`register`, `lookup`), and what was asked for and missing (`wanted`).

Estimate stage, pure (no torch, no I/O). The terms come from ``planner.judge.fit`` (the CLI
fits them or reads them from the user's cache, then registers them here); `step.step_items`
turns them into items like any simulator's. Without terms for a setup the group stays
unmodelled and the verdict UNKNOWN: never a guess.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from planner.estimate.fitted import MIN_ANCHOR_SEQ, ActivationTerms, FitSpec
from planner.estimate.ledger import block_bytes
from planner.estimate.ops import flash_backward_workspace
from planner.estimate.states import working_dtype
from planner.estimate.step_memory import StepMemory
from planner.profile.architectures import DECODER_TYPES, Part
from planner.profile.catalog import Group, ModelSpec
from planner.profile.hf_groups import PROJECTOR_KIND, VISION_TOWER_KIND, VLM_CONFIG
from planner.workload.inventory import Origin, Param, Workload
from planner.workload.options import Attention, Engine, OptimizerImpl, Precision, TrainingOptions

_TRACE_OPTIMIZER = {
    OptimizerImpl.TORCH_ADAMW_FORLOOP: "adamw-forloop",
    OptimizerImpl.TORCH_ADAMW_FOREACH: "adamw-foreach",
    OptimizerImpl.TORCH_ADAMW_FUSED: "adamw-fused",
    OptimizerImpl.TORCH_SGD: "sgd",
    OptimizerImpl.HF_ADAFACTOR: "adafactor",
}
"""The optimizers the judge can run, by the implementation HF Trainer picks."""

_LAYER_MARK = (".layers.", ".h.", ".blocks.", ".layer.")


def config_key(cfg: Mapping[str, Any]) -> str:
    """A canonical string of a group's config (its terms' key together with the spec)."""
    return json.dumps(cfg, sort_keys=True, separators=(",", ":"), default=str)


def fit_spec(group: Group, params: Sequence[Param], options: TrainingOptions) -> FitSpec | str:
    """The traced step that stands for ``group`` under ``options``, or why none can.

    DeepSpeed runs the module in its 16-bit (or fp32) dtype without autocast and steps its own
    optimizer (counted in ``states``), so its trace is the bare module with no optimizer; plain
    PyTorch runs HF Trainer's autocast, clipping and optimizer.
    """
    deepspeed = options.engine is Engine.DEEPSPEED
    if options.attn is Attention.FLASH_ATTENTION_2:
        return "flash_attention_2 cannot be traced without a GPU (sdpa can)"
    if deepspeed:
        precision = Precision.PURE_BF16.value if working_dtype(options).itemsize == 2 else Precision.FP32.value
        optimizer, clip = "none", False
    else:
        precision = options.precision.value
        optimizer = _TRACE_OPTIMIZER.get(options.optimizer_impl, "")
        clip = True
        if not optimizer:
            return f"the optimizer {options.optimizer_impl.value} is not traced"
    mine = [p for p in params if p.group == group.name]
    if any(p.origin == Origin.COPY for p in mine):
        return "LoRA with fully trained parts beside it (modules_to_save) is not traced"
    lora = None
    adapters = [p for p in mine if p.origin == Origin.LORA]
    if adapters:
        if options.lora is None or any(p.trainable for p in mine if p.origin == Origin.BASE):
            return "LoRA with trained base weights is not traced"
        lora = {"r": options.lora.rank, "targets": sorted(options.lora.targets), "dropout": options.lora.dropout}
        frozen_parts: tuple[str, ...] = ()
        frozen_layer: tuple[str, ...] = ()
    else:
        frozen = [p for p in mine if not p.trainable]
        frozen_parts, frozen_layer, why = _frozen(mine, frozen)
        if why:
            return why
    return FitSpec(precision, options.attn.value, options.grad_ckpt, optimizer, clip,
                   frozen_parts, frozen_layer, lora)


def _frozen(mine: Sequence[Param], frozen: Sequence[Param]) -> tuple[tuple[str, ...], tuple[str, ...], str]:
    """Frozen whole parts and the frozen names inside every layer, or why the pattern is not one
    the traces can copy (a layer range frozen, a part half frozen)."""
    parts: dict[Part, list[bool]] = {}
    for p in mine:
        if p.tensor.part is not Part.LAYERS:
            parts.setdefault(p.tensor.part, []).append(p.trainable)
    frozen_parts = []
    for part, flags in parts.items():
        if not any(flags):
            frozen_parts.append(part.value)
        elif not all(flags):
            return (), (), f"part {part.value} partly frozen: not traced"
    per_layer: dict[str, set[str]] = {}
    layers: set[str] = set()
    for p in mine:
        if p.tensor.part is Part.LAYERS:
            idx, rel = _layer_rel(p.tensor.name)
            layers.add(idx)
            if not p.trainable:
                per_layer.setdefault(rel, set()).add(idx)
    if any(len(idxs) != len(layers) for idxs in per_layer.values()):
        return (), (), "layers frozen differently from one another (a layer range): not traced"
    return tuple(sorted(frozen_parts)), tuple(sorted(per_layer)), ""


def _layer_rel(name: str) -> tuple[str, str]:
    """(layer index, name inside the layer) of a parameter of the decoder stack."""
    dotted = "." + name
    for mark in _LAYER_MARK:
        if mark in dotted:
            rest = dotted.split(mark, 1)[1]
            idx, _, rel = rest.partition(".")
            return idx, rel
    return "", name


# --------------------------------------------------------------------------------------------
# A vision-language model's step, traced whole (docs/any-architecture.md, "Vision-language models")
# --------------------------------------------------------------------------------------------

VLM_TYPES = frozenset({"llava", "qwen2_vl", "qwen2_5_vl", "gemma3"})
"""The vision-language families whose whole step the judge traces (``planner.judge.vlm`` builds
their processor inputs)."""
UNTRACED_VLM = {
    "idefics3": "Idefics3's tower picks the real tiles and their patch positions by the pixel values and masks "
                "(boolean indexing), which a fake-tensor trace cannot run",
    "qwen3_vl": "Qwen3-VL adds its deepstack features to the LLM's hidden states at positions picked by a boolean "
                "mask of the image tokens, which a fake-tensor trace cannot run",
}
"""Families with an image rule whose step memplan does not trace, and why."""


@dataclass(frozen=True)
class VlmStep:
    """A vision-language model whose step is traced whole: the config the judge builds, the LLM
    group (its bytes go on that row) and every group the trace covers."""

    config: dict[str, Any]
    llm: Group
    groups: tuple[str, ...]


def vlm_step(model: ModelSpec, workload: Workload) -> VlmStep | None:
    """The traced whole step of a transformers vision-language model, or None where the step is
    modelled group by group: with images, and without them where the LLM has no simulator
    (Qwen-VL's ``qwen2_vl_text``, Gemma 3's ``gemma3_text``: the step then runs the text path)."""
    tower = next((g for g in model.groups if g.kind == VISION_TOWER_KIND and VLM_CONFIG in g.config), None)
    llm = next((g for g in model.groups if g.kind == "decoder"), None)
    if tower is None or llm is None:
        return None
    cfg = tower.config[VLM_CONFIG]
    if cfg.get("model_type") not in VLM_TYPES:
        return None
    if not workload.images and llm.config.get("model_type") in DECODER_TYPES:
        return None
    groups = tuple(g.name for g in model.groups if g.kind in ("decoder", VISION_TOWER_KIND, PROJECTOR_KIND))
    return VlmStep(cfg, llm, groups)


def vlm_fit_spec(step: VlmStep, params: Sequence[Param], options: TrainingOptions, workload: Workload,
                 groups: Sequence[Group]) -> FitSpec | str:
    """The traced step of a vision-language model under ``options`` (`fit_spec` for its LLM, each
    tower and projector frozen or trained whole), or why none can be traced."""
    spec = fit_spec(step.llm, params, options)
    if isinstance(spec, str):
        return spec
    frozen = []
    for group in groups:
        if group.name == step.llm.name or group.name not in step.groups:
            continue
        mine = [p for p in params if p.group == group.name]
        if any(p.origin == Origin.LORA for p in mine):
            return f"LoRA inside {group.name} is not traced"
        if any(p.origin == Origin.COPY for p in mine):
            return "LoRA with fully trained parts beside it (modules_to_save) is not traced"
        flags = [p.trainable for p in mine if p.tensor.requires_grad]
        if not any(flags):
            frozen.append(group.name)  # frozen, or not built (--without): it holds nothing trained
        elif not all(flags):
            return f"{group.name} partly frozen: not traced"
    layout = workload.image_layout()
    size = layout.crops[0] if workload.images and layout is not None else (0, 0)
    if workload.images and len(layout.crops) != 1:
        return "images cut into several crops are not traced"
    return replace(spec, frozen_groups=tuple(sorted(frozen)), images=workload.images, image_size=tuple(size))


def vlm_memory(step: VlmStep, params: Sequence[Param], options: TrainingOptions, workload: Workload,
               groups: Sequence[Group]) -> StepMemory | None:
    """The whole vision-language step's memory from its traced terms, or None without terms (the
    request is remembered in `wanted`) or where it cannot be traced."""
    spec = vlm_fit_spec(step, params, options, workload, groups)
    if isinstance(spec, str):
        return None
    terms = lookup(step.config, spec, workload.micro_batch, workload.seq_len)
    if terms is None:
        return None
    # Gemma 3's image tokens attend to each other: a masked attention, no flash route.
    masked = workload.images and step.config.get("model_type") == "gemma3"
    extra = 0 if masked else flash_workspace_bytes(step.llm.config, spec, workload.micro_batch, workload.seq_len)
    return terms.step_memory(workload.micro_batch, workload.seq_len, extra_backward=extra)


def why_vlm_unmodeled(step: VlmStep, params: Sequence[Param], options: TrainingOptions, workload: Workload,
                      groups: Sequence[Group]) -> str:
    """Why a vision-language step traced whole has no step memory: one phrase."""
    spec = vlm_fit_spec(step, params, options, workload, groups)
    if isinstance(spec, str):
        return spec
    failed = _FAILED.get((config_key(step.config), spec.key()))
    if failed:
        return f"its traced step failed: {failed}"
    return "no traced terms for this setup (the CLI traces them; the library alone does not)"


def untraced_vlm_reason(group: Group) -> str | None:
    """Why the step of a tower's family is not traced (``UNTRACED_VLM``), or None."""
    return UNTRACED_VLM.get(str(group.config.get(VLM_CONFIG, {}).get("model_type", "")))


# --------------------------------------------------------------------------------------------
# The terms this process holds, and what was asked for without them
# --------------------------------------------------------------------------------------------


@dataclass
class Want:
    """Terms asked for and missing: the group's config, the spec and the workloads asked at."""

    config: dict[str, Any]
    spec: FitSpec
    workloads: set[tuple[int, int]] = field(default_factory=set)

    @property
    def anchor(self) -> tuple[int, int]:
        """The workload to fit around: the largest batch and the longest sequence asked for
        (the terms then answer from half that sequence up, and any smaller batch)."""
        return (max(b for b, _ in self.workloads), max(max(s for _, s in self.workloads), MIN_ANCHOR_SEQ))


_TERMS: dict[tuple[str, str], list[ActivationTerms]] = {}
_WANTED: dict[tuple[str, str], Want] = {}
_FAILED: dict[tuple[str, str], str] = {}
_ORIGIN: dict[int, str] = {}
_USED: dict[int, tuple[str, ActivationTerms]] = {}


def fail(cfg: Mapping[str, Any], spec: FitSpec, reason: str) -> None:
    """Remember that the setup cannot be traced (transformers refused it), and why."""
    key = (config_key(cfg), spec.key())
    _FAILED[key] = reason
    _WANTED.pop(key, None)


def why_unmodeled(group: Group, params: Sequence[Param], options: TrainingOptions) -> str:
    """Why a decoder without a simulator has no step memory under ``options``: one phrase."""
    spec = fit_spec(group, params, options)
    if isinstance(spec, str):
        return spec
    failed = _FAILED.get((config_key(group.config), spec.key()))
    if failed:
        return f"its traced step failed: {failed}"
    return "no traced terms for this setup (the CLI traces them; the library alone does not)"


def register(cfg: Mapping[str, Any], spec: FitSpec, terms: ActivationTerms, origin: str = "traced") -> None:
    """Hold ``terms`` for the group config ``cfg`` under ``spec``; ``origin`` says where they came
    from (``traced`` now, or ``cache``) for the notes."""
    key = (config_key(cfg), spec.key())
    _TERMS.setdefault(key, []).append(terms)
    _ORIGIN[id(terms)] = origin
    _WANTED.pop(key, None)


def used() -> list[tuple[str, ActivationTerms, str]]:
    """(model type, terms, origin) of every set of terms estimates used since `forget_used`."""
    return [(mtype, t, _ORIGIN.get(id(t), "traced")) for mtype, t in _USED.values()]


def forget_used() -> None:
    """Clear the record of terms used (before a command's last round of estimates)."""
    _USED.clear()


def lookup(cfg: Mapping[str, Any], spec: FitSpec, micro_batch: int, seq_len: int) -> ActivationTerms | None:
    """Terms that answer at (B, S), or None (and the request is remembered in `wanted`)."""
    key = (config_key(cfg), spec.key())
    for terms in _TERMS.get(key, ()):
        if terms.covers(micro_batch, seq_len):
            _USED[id(terms)] = (str(cfg.get("model_type", "?")), terms)
            return terms
    if key in _FAILED:
        return None
    want = _WANTED.setdefault(key, Want(dict(cfg), spec))
    want.workloads.add((micro_batch, seq_len))
    return None


def wanted() -> list[Want]:
    """What estimates asked for and found no terms for, in the order first asked."""
    return list(_WANTED.values())


def forget_wanted() -> None:
    """Clear the record of missing terms (before a new round of estimates)."""
    _WANTED.clear()


def forget_all() -> None:
    """Drop every term, failure and want this process holds (tests start from nothing)."""
    _TERMS.clear()
    _WANTED.clear()
    _FAILED.clear()
    _ORIGIN.clear()
    _USED.clear()


def flash_workspace_bytes(cfg: Mapping[str, Any], spec: FitSpec, micro_batch: int, seq_len: int) -> int:
    """FlashAttention-2's backward scratch for one layer (alive at the backward peak), which a meta
    kernel does not show: added where the traced step routed sdpa to flash (16-bit, no mask), as
    the simulators add it (``planner.estimate.ops.flash_backward_workspace``)."""
    if spec.attn != Attention.SDPA.value or spec.precision == Precision.FP32.value:
        return 0
    heads = cfg.get("num_attention_heads") or cfg.get("n_head")
    hidden = cfg.get("hidden_size") or cfg.get("n_embd")
    if not heads or not hidden:
        return 0
    kv = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or hidden // heads
    return sum(block_bytes(n * item) for n, item in
               flash_backward_workspace(micro_batch, seq_len, heads, kv, head_dim, 2))
