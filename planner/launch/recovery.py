"""Recovery: after a run dies of out-of-memory, the next safer plan from the same request.

Part of the launch stage. The plan folder remembers what it was searched with (plan.json): the
request, the constraints, the search space, and the GPU and model specs themselves, so the next
plan comes from the same search on any machine, with or without the profile folders the plan was
made with. It is the best candidate of that search with a cap on the budget that broke,
``RETRY_HEADROOM`` of its capacity below what the failed plan needed.
"""

from __future__ import annotations

from planner.errors import ProfileError
from planner.launch.failures import RETRY_HEADROOM, Failure
from planner.plan import Plan, make_plan
from planner.profile.catalog import ModelSpec, build_model, load_catalog
from planner.profile.hardware import Cluster
from planner.search.search import search
from planner.units import format_bytes

REPLAN_HINT = "re-plan with memplan tune (and its --profiles-dir) to get a plan that records its specs"


def plan_model(plan: Plan) -> ModelSpec:
    """The model a plan was made for: its recorded profile, else the config.json it was read from,
    else (a plan of an older memplan) the profile of that name in the shipped folder and
    $MEMPLAN_PROFILES.

    Raises:
        ProfileError: none of them is there (a moved config.json, a user profile of an old plan).
    """
    if plan.model.profile is not None:
        # the counts were checked when the plan was made; the profile is the same data now
        return build_model(plan.model.profile, check_counts=False)
    if plan.model.config is None:  # an older plan: its model by name, as it was found then
        catalog = load_catalog(())
        if catalog.has_model(plan.model.name):
            return build_model(catalog.model(plan.model.name))
    from planner.profile.hf_config import find_config, model_from_config

    for where in filter(None, (plan.model.config, plan.model.path, plan.model.name)):
        if find_config(where) is not None:
            return model_from_config(where)
    where = plan.model.config or plan.model.path
    raise ProfileError(f"the plan's model {plan.model.name!r}: no config.json at {where} and no profile of that name "
                       f"here; {REPLAN_HINT}")


def plan_cluster(plan: Plan) -> Cluster:
    """The cluster a plan was made for: its recorded GPU profile with the GPU memory and host RAM
    it was planned with, else (a plan of an older memplan) the GPU profile of that name here.

    Raises:
        ProfileError: an old plan whose GPU has no profile here (it came from --profiles-dir).
    """
    c = plan.cluster
    if c.gpu_spec is not None:
        return c.to_cluster()
    catalog = load_catalog(())
    try:
        gpu = catalog.gpu(c.gpu)
    except ProfileError:
        raise ProfileError(f"the plan's GPU {c.gpu!r} has no profile here; {REPLAN_HINT}") from None
    return Cluster(gpu, c.nodes, c.gpus_per_node, c.gpu_memory_bytes, c.host_ram_bytes)


def step_down(plan: Plan, failure: Failure) -> tuple[Plan, str] | None:
    """The next plan after ``plan`` ran out of the ``failure`` budget, and what it changes; None
    when nothing fits under the tighter cap.

    Raises:
        ProfileError: the plan's model or GPU cannot be rebuilt here (see `plan_model`).
    """
    c = plan.constraints
    if failure is Failure.GPU_OOM:
        cap = int(plan.per_gpu_bytes - RETRY_HEADROOM * plan.cluster.gpu_memory_bytes)
        constraints = c.model_copy(update={"max_gpu_bytes": min(cap, c.max_gpu_bytes or cap)})
    else:
        cap = int(plan.host_bytes - RETRY_HEADROOM * plan.cluster.host_ram_bytes)
        constraints = c.model_copy(update={"max_host_bytes": min(cap, c.max_host_bytes or cap)})
    if cap <= 0:
        return None
    model, cluster = plan_model(plan), plan_cluster(plan)
    chosen = search(model, cluster, plan.request, constraints, plan.space).chosen
    if chosen is None:
        return None
    new = make_plan(model, plan.model.path, cluster, chosen, plan.global_batch, plan.request, constraints,
                    plan.trainer, plan.notes, plan.space)
    where = "per GPU" if failure is Failure.GPU_OOM else "host RAM"
    return new, f"{describe_change(plan, new)}; {where} {format_bytes(_bytes(plan, failure))} -> " \
                f"{format_bytes(_bytes(new, failure))} (cap {format_bytes(cap)})"


def _bytes(plan: Plan, failure: Failure) -> int:
    return plan.per_gpu_bytes if failure is Failure.GPU_OOM else plan.host_bytes


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
