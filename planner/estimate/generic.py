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
from dataclasses import dataclass, field
from typing import Any

from planner.estimate.fitted import MIN_ANCHOR_SEQ, ActivationTerms, FitSpec
from planner.estimate.ledger import block_bytes
from planner.estimate.ops import flash_backward_workspace
from planner.estimate.states import working_dtype
from planner.profile.architectures import Part
from planner.profile.catalog import Group
from planner.workload.inventory import Origin, Param
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
        lora = {"r": options.lora.rank, "targets": sorted(options.lora.targets)}
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
