"""Recovery: after a run dies of out-of-memory, the next safer plan from the same request.

Part of the launch stage. The plan folder remembers the request and the constraints it was
searched with (plan.json); the next plan is the best candidate of the same search with a cap on
the budget that broke, ``RETRY_HEADROOM`` of its capacity below what the failed plan needed.
"""

from __future__ import annotations

from dataclasses import replace

from planner.architectures import ProfileError
from planner.hardware import make_cluster
from planner.launch import RETRY_HEADROOM, Failure
from planner.plan import Plan, make_plan
from planner.profile import ModelSpec, build_model, load_catalog
from planner.search import search
from planner.units import GIB


def plan_model(plan: Plan) -> ModelSpec:
    """The model a plan was made for: its profile, or the local config.json it was read from.

    Raises:
        ProfileError: neither exists any more (a removed user profile, a moved config).
    """
    catalog = load_catalog(())
    if catalog.has_model(plan.model.name):
        return build_model(catalog.model(plan.model.name))
    from planner.hf_config import find_config, model_from_config

    for where in (plan.model.path, plan.model.name):
        if find_config(where) is not None:
            return model_from_config(where)
    raise ProfileError(f"the plan's model {plan.model.name!r} is neither a profile nor a config.json here")


def step_down(plan: Plan, failure: Failure) -> tuple[Plan, str] | None:
    """The next plan after ``plan`` ran out of the ``failure`` budget, and what it changes; None
    when nothing fits under the tighter cap."""
    model = plan_model(plan)
    catalog = load_catalog(())
    cluster = make_cluster(plan.cluster.gpus, catalog, plan.cluster.host_ram_bytes)
    cluster = replace(cluster, gpu_memory_bytes=plan.cluster.gpu_memory_bytes)
    c = plan.constraints
    if failure is Failure.GPU_OOM:
        cap = int(plan.per_gpu_bytes - RETRY_HEADROOM * plan.cluster.gpu_memory_bytes)
        constraints = c.model_copy(update={"max_gpu_bytes": min(cap, c.max_gpu_bytes or cap)})
    else:
        cap = int(plan.host_bytes - RETRY_HEADROOM * plan.cluster.host_ram_bytes)
        constraints = c.model_copy(update={"max_host_bytes": min(cap, c.max_host_bytes or cap)})
    if cap <= 0:
        return None
    chosen = search(model, cluster, plan.request, constraints).chosen
    if chosen is None:
        return None
    new = make_plan(model, plan.model.path, cluster, chosen, plan.global_batch, plan.request, constraints,
                    plan.trainer, plan.notes)
    where = "per GPU" if failure is Failure.GPU_OOM else "host RAM"
    return new, f"{describe_change(plan, new)}; {where} {_gib(_bytes(plan, failure))} -> " \
                f"{_gib(_bytes(new, failure))} (cap {_gib(cap)})"


def _bytes(plan: Plan, failure: Failure) -> int:
    return plan.per_gpu_bytes if failure is Failure.GPU_OOM else plan.host_bytes


def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


def describe_change(old: Plan, new: Plan) -> str:
    """The settings that differ between two plans, ``name old -> new``."""
    def view(p: Plan) -> dict[str, str]:
        o, w = p.options, p.workload
        return {
            "engine": "torch" if o.engine.value == "torch" else f"ZeRO-{int(o.zero)}",
            "offload_optimizer": o.offload_optimizer.value,
            "offload_param": o.offload_param.value,
            "precision": o.precision.value,
            "optimizer": o.optimizer.value,
            "checkpointing": "on" if o.grad_ckpt else "off",
            "micro-batch": str(w.micro_batch),
            "accumulation": str(w.grad_accum),
            "context": str(w.seq_len),
            "slices": str(w.max_slice_nums),
            "training": f"LoRA r{o.lora.rank}" if o.lora else "full",
        }
    a, b = view(old), view(new)
    changes = [f"{k} {a[k]} -> {b[k]}" for k in a if a[k] != b[k]]
    return ", ".join(changes) or "the same settings"
