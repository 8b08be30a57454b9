"""Diagnosis of a setup the user already has: its estimate, the budget that binds and where, the
smallest changes that make it fit (found by `planner.search.search` with the setup as the request, and
on the bigger clusters of `planner.search.fixes`' ladders), and
the known traps that apply to it, each with its numbers.

After the search in the flow (profile -> workload -> estimate -> search -> **diagnose**), fed by the
readers; `memplan explain` renders it. Fixes are ranked cheapest first (docs/explain.md): what the
training gives up (the search's severities: nothing, numerics, data, weights), then whether it needs
new hardware, then how many settings change, then speed.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field, replace

from planner.estimate import Estimate, RuntimeModel, Verdict, estimate
from planner.explain.from_files import FileSetup
from planner.explain.traps import Trap, find_traps
from planner.plan import group_plans
from planner.profile.catalog import ModelSpec
from planner.profile.hardware import Cluster
from planner.search.fixes import more_gpus, more_host_ram
from planner.search.search import search
from planner.search.space import DEFAULT_MARGIN, Candidate, Constraints, GiveUp, Request, SearchSpace
from planner.speed.step_time import step_time
from planner.units import GIB
from planner.workload.inventory import Workload, trainable_inventory
from planner.workload.options import Engine, Offload, Optimizer, Precision, TrainingOptions
from planner.workload.reference import MINICPM_BUILDS


@dataclass(frozen=True)
class Remedy:
    """One way to make the setup fit: what changes, and the estimate after the change."""

    changes: tuple[str, ...]
    options: TrainingOptions
    workload: Workload
    cluster: Cluster
    estimate: Estimate
    gives_up: tuple[GiveUp, ...]
    tokens_per_s: float
    hardware: bool
    """It needs more host RAM or more GPUs."""
    edits: tuple[str, ...] = ()
    """The same change as edits of the user's own files (their trainer's keys, then DeepSpeed's)."""

    @property
    def margin(self) -> float:
        """Free share of the binding budget after the change, at the high end of its band."""
        b = self.estimate.per_gpu if self.estimate.binding == "gpu" else self.estimate.host
        return (b.capacity_bytes - b.band.high) / b.capacity_bytes

    @property
    def rank_key(self) -> tuple:
        worst = max((g.severity for g in self.gives_up), default=0)
        total = sum(g.severity for g in self.gives_up)
        return (worst, self.hardware, total, len(self.changes), -self.tokens_per_s, self.changes)


@dataclass
class Diagnosis:
    """Everything `memplan explain` reports beyond the settings read."""

    estimate: Estimate
    fixes: list[Remedy]
    traps: list[Trap]
    evaluated: int = 0
    notes: list[str] = field(default_factory=list)


def _dedupe(*items):
    return tuple(dict.fromkeys(items))


def _how(o: TrainingOptions) -> str:
    return "plain PyTorch (DDP)" if o.engine is Engine.TORCH else f"DeepSpeed ZeRO-{int(o.zero)}"


def describe_changes(model: ModelSpec, user: tuple[TrainingOptions, Workload, Cluster],
                     new: tuple[TrainingOptions, Workload, Cluster]) -> tuple[str, ...]:
    """The settings that differ between the user's setup and another, in the user's words."""
    (uo, uw, uc), (o, w, c) = user, new
    out = []
    if c.host_ram_bytes != uc.host_ram_bytes:
        more = (c.host_ram_bytes - uc.host_ram_bytes) / GIB
        out.append(f"host RAM {uc.host_ram_bytes / GIB:.0f} -> {c.host_ram_bytes / GIB:.0f} GiB per node "
                   f"({more:+.0f} GiB)")
    if c.label != uc.label:
        out.append(f"GPUs {uc.label} -> {c.label}")
    if (o.engine, o.zero) != (uo.engine, uo.zero):
        out.append(f"{_how(uo)} -> {_how(o)}")
    for name in ("offload_optimizer", "offload_param"):
        a, b = getattr(uo, name), getattr(o, name)
        if a is not b and (a is not Offload.NONE or b is not Offload.NONE):
            out.append(f"{name} {a.value} -> {b.value}")
    if o.precision is not uo.precision:
        out.append(f"precision {uo.precision.value} -> {o.precision.value}")
    if o.optimizer is not uo.optimizer:
        out.append(f"optimizer {uo.optimizer.value} -> {o.optimizer.value}")
    if o.lora != uo.lora:
        if o.lora is None:
            out.append("no LoRA")
        else:
            where = ", ".join(o.lora.groups) or "the LLM"
            was = f" (was r={uo.lora.rank})" if uo.lora else ""
            out.append(f"LoRA r={o.lora.rank} on {where}{was}")
    before = {g.name: g.training for g in group_plans(model, uo)}
    for g in group_plans(model, o):
        old = before.get(g.name)
        if old is not None and old != g.training and not (g.training == "lora" and o.lora != uo.lora):
            out.append(f"{g.name} {old} -> {g.training}")
    if o.grad_ckpt != uo.grad_ckpt:
        out.append(f"gradient checkpointing {'on' if uo.grad_ckpt else 'off'} -> {'on' if o.grad_ckpt else 'off'}")
    if o.attn is not uo.attn:
        out.append(f"attention {uo.attn.value} -> {o.attn.value}")
    if (w.micro_batch, w.grad_accum) != (uw.micro_batch, uw.grad_accum):
        out.append(f"micro-batch x accumulation {uw.micro_batch}x{uw.grad_accum} -> {w.micro_batch}x{w.grad_accum}")
    if w.seq_len != uw.seq_len:
        out.append(f"context {uw.seq_len} -> {w.seq_len}")
    if w.images and w.max_slice_nums != uw.max_slice_nums:
        out.append(f"max_slice_nums {uw.max_slice_nums} -> {w.max_slice_nums}")
    return tuple(out)


def _request(setup: FileSetup, cluster: Cluster) -> Request:
    o, w = setup.options, setup.workload
    return Request(seq_len=w.seq_len, images=w.images, image_size=w.image_size, max_slice_nums=w.max_slice_nums,
                   audio_seconds=w.audio_seconds, train=o.train, freeze=o.freeze, without=o.without, lora=o.lora,
                   precision=Precision.PURE_BF16 if o.precision is Precision.PURE_BF16 else None,
                   global_batch=w.micro_batch * w.grad_accum * cluster.world_size)


def _target(setup: FileSetup, model: ModelSpec) -> str:
    if setup.trainer == "llamafactory":
        return "llamafactory"
    built = {g.name for g in model.groups} - set(setup.options.without)
    return "minicpm" if setup.trainer == "minicpm" and built == MINICPM_BUILDS else "builtin"


def _space(o: TrainingOptions) -> SearchSpace:
    return SearchSpace(precisions=_dedupe(o.precision, Precision.AMP_BF16, Precision.PURE_BF16),
                       optimizers=_dedupe(o.optimizer, Optimizer.ADAMW, Optimizer.ADAMW_8BIT), attn=(o.attn,))


def _remedy(model: ModelSpec, setup: FileSetup, cluster: Cluster, cand, new_cluster: Cluster) -> Remedy:
    user = (setup.options, setup.workload, cluster)
    changes = describe_changes(model, user, (cand.options, cand.workload, new_cluster))
    hardware = new_cluster.label != cluster.label or new_cluster.host_ram_bytes != cluster.host_ram_bytes
    return Remedy(changes, cand.options, cand.workload, new_cluster, cand.estimate, cand.gives_up,
                  cand.speed.tokens_per_s, hardware)


def find_fixes(model: ModelSpec, cluster: Cluster, setup: FileSetup, est: Estimate, top: int = 5,
               margin: float = DEFAULT_MARGIN, runtime: RuntimeModel | None = None) -> tuple[list[Remedy], int]:
    """The cheapest changes with which the setup fits, each estimated; and how many estimates it took.

    Sources: the search over the user's cluster with the setup as the request (same trainer, same
    global batch); the setup itself with the smallest common host RAM size that holds it; and,
    when no setup that gives nothing up fits the cluster, the smallest host RAM or GPU count with
    which one does (the ladders `fixes.more_host_ram` / `fixes.more_gpus` that `memplan tune`'s
    `fixes.host_ram_fix` / `fixes.more_gpus_fix` climb).
    """
    request = _request(setup, cluster)
    constraints = Constraints(margin=margin, target=_target(setup, model))
    space = _space(setup.options)
    result = search(model, cluster, request, constraints, space, top=top, runtime=runtime)
    evaluated = result.evaluated
    out = [_remedy(model, setup, cluster, c, cluster) for c in result.candidates]
    gpu_cap = cluster.gpu_memory_bytes * (1 - margin)
    # the setup as written with more host RAM: a fix only where all of it is modelled
    host_bound = est.host.band.high > cluster.host_ram_bytes * (1 - margin)
    if not est.unmodeled and est.per_gpu.band.high <= gpu_cap and host_bound:
        for bigger in more_host_ram(cluster):
            if bigger.host_ram_bytes * (1 - margin) >= est.host.band.high:
                again = estimate(model, bigger, setup.options, setup.workload, setup.zero, runtime=runtime)
                params = trainable_inventory(model, setup.options)
                speed = step_time(model, params, bigger, setup.options, setup.workload, setup.zero)
                changes = describe_changes(model, (setup.options, setup.workload, cluster),
                                           (setup.options, setup.workload, bigger))
                out.append(Remedy(changes, setup.options, setup.workload, bigger, again, (), speed.tokens_per_s,
                                  True))
                evaluated += 1
                break
    if not any(not r.gives_up for r in out):
        for bigger_clusters in (more_host_ram(cluster), more_gpus(cluster)):
            for bigger in bigger_clusters:
                req = request.model_copy(update={"global_batch": _batch(request, bigger)})
                found = search(model, bigger, req, constraints, space, top=1, runtime=runtime)
                evaluated += found.evaluated
                fits = [c for c in found.candidates if not c.gives_up]
                if fits:
                    out.append(_remedy(model, setup, cluster, fits[0], bigger))
                    break
    ranked: dict[tuple[str, ...], Remedy] = {}
    for r in sorted(out, key=lambda r: r.rank_key):
        ranked.setdefault(r.changes, r)
    best = [replace(r, edits=file_edits(model, setup, cluster, est, r)) for r in list(ranked.values())[:top]]
    return best, evaluated


def _batch(request: Request, cluster: Cluster) -> int:
    world = cluster.world_size
    return -(-request.global_batch // world) * world


EDIT_SETTINGS = frozenset({
    "deepspeed", "zero_stage", "offload_optimizer", "offload_param", "bf16", "fp16", "pure_bf16",
    "bf16_master_weights_and_grads", "bf16_optimizer_states", "gradient_checkpointing",
    "disable_gradient_checkpointing", "flash_attn", "micro_batch", "grad_accum", "global_batch", "seq_len",
    "max_slice_nums", "optimizer_type", "optim",
    "finetuning_type", "use_lora", "lora_rank", "lora_dropout", "lora_target", "tune_vision", "tune_llm",
    "freeze_vision_tower", "freeze_multi_modal_projector", "freeze_language_model",
})
"""Settings whose edits a fix lists (the memory levers; not the schedule)."""


def _as_plan(model: ModelSpec, cluster: Cluster, options: TrainingOptions, workload: Workload, est: Estimate):
    from planner.plan import TrainerSettings, make_plan
    from planner.speed.step_time import StepTime

    candidate = Candidate(options, workload, est, StepTime(terms={}, flops_per_step=0.0, tokens_per_step=0), ())
    batch = workload.micro_batch * workload.grad_accum * cluster.world_size
    return make_plan(model, None, cluster, candidate, batch, Request(), Constraints(), TrainerSettings())


def _trainer_doc(plan, trainer: str) -> dict[str, object]:
    from planner.writers.formats import deepspeed_config, llamafactory_config, minicpm_flags, training_args

    if trainer == "minicpm":
        flags = minicpm_flags(plan)
        doc = {flags[i][2:]: flags[i + 1] for i in range(0, len(flags) - 1)
               if flags[i].startswith("--") and not flags[i + 1].startswith("--")}
    elif trainer == "llamafactory":
        doc = llamafactory_config(plan)
    else:
        doc = training_args(plan)
    if plan.deepspeed:
        def flat(d: dict, prefix: str = "") -> dict:
            out: dict = {}
            for k, v in d.items():
                out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
            return out
        doc.update({f"DeepSpeed {k}": v for k, v in flat(deepspeed_config(plan)).items()})
    return doc


def file_edits(model: ModelSpec, setup: FileSetup, cluster: Cluster, est: Estimate, remedy: Remedy) -> tuple[str, ...]:
    """A fix as edits of the user's files: both setups written by `memplan tune`'s writers for the
    user's trainer, and the memory keys that differ (empty where a writer cannot express one)."""
    from planner.writers.formats import NotExpressible
    from planner.writers.keymap import KEYMAP

    column = {"minicpm": "minicpm", "llamafactory": "llamafactory"}.get(setup.trainer, "hf")
    keys = {getattr(k, column) for k in KEYMAP if k.setting in EDIT_SETTINGS and getattr(k, column)}
    # keys HF fills from the trainer arguments change there, unless the user's file wrote a value
    keys |= {f"DeepSpeed {k.deepspeed}" for k in KEYMAP if k.setting in EDIT_SETTINGS and k.deepspeed
             and (not k.auto or k.setting in setup.explicit_ds)}
    try:
        before = _trainer_doc(_as_plan(model, cluster, setup.options, setup.workload, est), setup.trainer)
        after = _trainer_doc(_as_plan(model, remedy.cluster, remedy.options, remedy.workload, remedy.estimate),
                             setup.trainer)
    except (NotExpressible, ValueError):
        return ()
    out = []
    for key in sorted(set(before) | set(after), key=lambda k: (k.startswith("DeepSpeed"), k)):
        if key not in keys or before.get(key) == after.get(key):
            continue
        value = after.get(key)
        shown = "(remove)" if value is None else (json.dumps(value) if not isinstance(value, str) else value)
        out.append(f"--{key} {shlex.quote(shown)}" if setup.trainer == "minicpm" and not key.startswith("DeepSpeed")
                   else f"{key}: {shown}")
    return tuple(out)


def diagnose(model: ModelSpec, cluster: Cluster, setup: FileSetup, top: int = 5,
             margin: float = DEFAULT_MARGIN, runtime: RuntimeModel | None = None) -> Diagnosis:
    """Estimate the setup; when a budget is over (DOES NOT FIT) or may be (TIGHT), find the
    cheapest fixes; name the traps.

    An UNKNOWN estimate (nothing over on the modelled part, something not modelled) gets no fixes:
    nothing is known to be wrong, and the search ranks only fully modelled setups."""
    est = estimate(model, cluster, setup.options, setup.workload, setup.zero, notes=setup.notes, runtime=runtime)
    wanted = est.verdict in (Verdict.DOES_NOT_FIT, Verdict.TIGHT)
    fixes, evaluated = find_fixes(model, cluster, setup, est, top, margin, runtime) if wanted else ([], 0)
    traps = find_traps(model, cluster, setup, est)
    return Diagnosis(est, fixes, traps, evaluated + 1)
