"""The estimate next to a traced step: memplan's figures for a plain-PyTorch, one-GPU step of a
model's LLM against what `planner.judge.trace` measures for the same step.

At the edge of the flow, beside `cli`: it runs the estimator and the tracer and pairs their
categories. The tracer imports torch; nothing here does at import time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from planner.errors import ProfileError
from planner.estimate.result import Category, Phase
from planner.profile.catalog import Catalog, ModelSpec

# MemTracker's categories (planner.judge.trace) -> ours. "other" is the step's inputs (input_ids, labels).
TRACE_CATEGORIES = {
    "weights": Category.WEIGHTS,
    "gradients": Category.GRADIENTS,
    "optimizer_states": Category.OPTIMIZER_STATES,
    "activations": Category.ACTIVATIONS,
    "temporaries": Category.TEMPORARIES,
}
PHASES = (Phase.FORWARD, Phase.BACKWARD, Phase.OPTIMIZER)


@dataclass(frozen=True)
class Row:
    """One line of the comparison, bytes."""

    label: str
    estimate: int
    traced: int

    @property
    def error(self) -> float | None:
        """(estimate - traced) / traced, or None when nothing was traced."""
        return None if self.traced == 0 else (self.estimate - self.traced) / self.traced


@dataclass(frozen=True)
class TraceReport:
    """The comparison for one step."""

    model: str
    group: str
    request: dict[str, Any]
    peak: Row
    peak_phase: tuple[str, str]  # (estimate, traced)
    at_peak: tuple[Row, ...]
    phases: tuple[Row, ...]
    modules: dict[str, int]
    seconds: float
    notes: tuple[str, ...] = field(default=())

    def as_json(self) -> dict[str, Any]:
        """The ``memplan trace --json`` document."""

        def row(r: Row) -> dict[str, Any]:
            return {"label": r.label, "estimate_bytes": r.estimate, "traced_bytes": r.traced, "error": r.error}

        return {
            "model": self.model, "group": self.group, "request": self.request, "peak": row(self.peak),
            "peak_phase": {"estimate": self.peak_phase[0], "traced": self.peak_phase[1]},
            "at_peak": [row(r) for r in self.at_peak], "phases": [row(r) for r in self.phases],
            "module_peaks": self.modules, "seconds": self.seconds, "notes": list(self.notes),
        }


def llm_group(spec: ModelSpec) -> tuple[str, dict[str, Any]]:
    """The decoder group the tracer can build with transformers, and its config."""
    for g in spec.groups:
        if g.kind == "decoder" and g.config.get("model_type"):
            return g.name, dict(g.config)
    raise ProfileError(f"{spec.name} has no decoder group with a transformers config to trace")


def compare_trace(spec: ModelSpec, catalog: Catalog, *, precision: str, optimizer: str, grad_ckpt: bool, attn: str,
                  freeze: Sequence[str], micro_batch: int, seq_len: int, timeout_s: float,
                  progress: Callable[[str], None] | None = None) -> TraceReport:
    """Trace the model's LLM and estimate the same step; pair the figures."""
    from planner.estimate import estimate
    from planner.judge.protocol import TraceRequest
    from planner.judge.trace import trace_step
    from planner.profile.catalog import Group
    from planner.profile.hardware import Cluster
    from planner.workload.inventory import Workload
    from planner.workload.options import TrainingOptions

    name, cfg = llm_group(spec)
    group = spec.group(name)
    notes = []
    if len(spec.groups) > 1:
        notes.append(f"{spec.name}'s own model class is not in transformers: traced its {name} "
                     f"({cfg['model_type']}) alone")
    prefixes = []
    for sel in freeze:
        gname, _, part = sel.partition(".")
        if gname != name:
            raise ProfileError(f"--freeze {sel}: only parts of {name} can be frozen in a trace")
        prefixes += sorted({t.name.rsplit(".", 1)[0] for t in group.tensors if not part or t.part.value == part})
    llm_only = ModelSpec(spec.name, spec.source, (Group(name, group.kind, group.tensors, cfg),), spec.hf_id)
    options = TrainingOptions(engine="torch", precision=precision, optimizer=optimizer, grad_ckpt=grad_ckpt, attn=attn,
                              freeze=tuple(freeze))
    gpu = catalog.gpu("h200")
    cluster = Cluster(gpu, 1, 1, gpu.memory_bytes, 2**40)
    est = estimate(llm_only, cluster, options, Workload(micro_batch=micro_batch, seq_len=seq_len)).per_gpu
    request = TraceRequest(model_config=cfg, precision=precision, optimizer=optimizer, grad_ckpt=grad_ckpt, attn=attn,
                           frozen_prefixes=tuple(prefixes), micro_batch=micro_batch, seq_len=seq_len)
    res = trace_step(request, progress, timeout=timeout_s)
    notes += list(res.notes)

    est_peak = est.tensor_bytes
    at_peak = [Row(ours.value, est.by_category[ours], res.at_peak.get(theirs, 0))
               for theirs, ours in TRACE_CATEGORIES.items()]
    # Our activations include the step's inputs (token ids, labels), MemTracker's "other".
    at_peak[3] = Row("activations (+ inputs)", at_peak[3].estimate, at_peak[3].traced + res.at_peak.get("other", 0))
    at_peak.append(Row("module buffers (rotary tables)", 0, res.at_peak.get("buffers", 0)))
    phases = []
    for ph in PHASES:
        cats = est.phase_categories.get(ph, {})
        ours = sum(v for c, v in cats.items() if c is not Category.OVERHEAD)
        phases.append(Row(ph.value, ours, res.phase_peaks.get(ph.value, 0)))
    return TraceReport(
        model=spec.name, group=name,
        request={"precision": precision, "optimizer": optimizer, "grad_ckpt": grad_ckpt, "attn": attn,
                 "frozen_prefixes": prefixes, "micro_batch": micro_batch, "seq_len": seq_len, "device": res.device},
        peak=Row("peak (tensors)", est_peak, res.peak_bytes), peak_phase=(est.peak_phase.value, res.peak_phase),
        at_peak=tuple(at_peak), phases=tuple(phases), modules=dict(res.module_peaks), seconds=res.seconds,
        notes=tuple(notes),
    )
