"""The estimator: pure arithmetic from (model, cluster, options, workload) to bytes.

Third stage of the flow. No torch import and no I/O anywhere under this package, so
``memplan estimate`` starts fast and tests can call it thousands of times.
"""

from __future__ import annotations

from collections.abc import Iterable

from planner.estimate.coverage import unmodeled_parts
from planner.estimate.result import ALWAYS, STEP, Band, Estimate, Item, Place, Spreads, Verdict, assemble
from planner.estimate.runtime import (
    RuntimeModel,
    ddp_bucket_items,
    gathered_param_items,
    gpu_figures,
    loading_items,
    overhead_items,
    pinned_rounding_items,
    spreads,
)
from planner.estimate.states import ZeroSettings, model_state_items
from planner.estimate.step import step_items
from planner.profile.catalog import ModelSpec
from planner.profile.hardware import Cluster
from planner.workload.inventory import Origin, Workload, check_media, trainable_inventory
from planner.workload.options import Engine, TrainingOptions, ZeroStage
from planner.workload.positions import check_positions

__all__ = ["estimate", "Estimate", "RuntimeModel", "Verdict"]


def estimate(
    model: ModelSpec,
    cluster: Cluster,
    options: TrainingOptions,
    workload: Workload,
    zero: ZeroSettings | None = None,
    notes: Iterable[str] = (),
    activations: bool = True,
    runtime: RuntimeModel | None = None,
) -> Estimate:
    """Estimate one training setup: per-GPU bytes for the most loaded rank, host bytes per node.

    Args:
        model: the model's groups and tensors.
        cluster: GPUs, nodes and host RAM.
        options: how the step runs and what trains.
        workload: tokens per micro-step (activations arrive with the activation model).
        zero: DeepSpeed values; default: what HF Trainer resolves "auto" to for this model.
        notes: notes to carry into the result.
        activations: False leaves out what the step itself holds (activations, temporaries): the
            rest is a lower bound of the GPU peak (said in ``unmodeled``), and the host figure is
            unchanged. The search prunes with it before it runs the activation model.
        runtime: the constants of the GPU process beyond its tensors (context, workspaces,
            fragmentation); default: the sourced ones (`RuntimeModel()`), or what the CLI read
            from the user's calibration profile.

    Returns:
        The estimate; what it does not model is in ``Estimate.unmodeled`` (then ``fits`` is
        None unless a budget is over on the modelled part alone), and a sequence past a RoPE
        model's trained length is a note.

    Raises:
        ProfileError: the GPU cannot run the options (bf16 without bf16, flash-attn 2 before
            Ampere or in fp32), the workload has media the model cannot take, the sequence is
            longer than the model's learned positions (`check_positions`), or the selections
            contradict each other or train nothing (`trainable_inventory`).
    """
    options.check_runs_on(cluster.gpu)
    check_media(model, options, workload)
    notes = [*notes, *check_positions(model, workload.seq_len)]
    params = trainable_inventory(model, options)
    zero = zero or ZeroSettings.hf_auto(model.hidden_size)
    items = model_state_items(params, options, cluster.world_size, zero, workload.grad_accum)
    modeled = None
    if activations:
        step, modeled = step_items(model, params, options, workload, items)
        items += step
    items += gathered_param_items(params, options, cluster.world_size, zero)
    items += ddp_bucket_items(params, options, cluster.world_size)
    items += pinned_rounding_items(params, options, cluster.world_size, zero)
    zero3 = options.engine is Engine.DEEPSPEED and options.zero is ZeroStage.PARAMETERS
    zero_init = zero3 and options.zero_init
    if not zero_init:  # offloaded partitions appear after loading, at initialize()
        items = [Item(it.group, it.category, it.place, it.nbytes, STEP)
                 if it.place is Place.HOST and it.phases == ALWAYS else it for it in items]
    items += loading_items(params, options, zero_init=zero_init)
    runtime = runtime or RuntimeModel()
    peak = _tensor_peak(items)
    figures = gpu_figures(peak, cluster.gpu, cluster.world_size, runtime)
    items += overhead_items(figures, peak.expected)
    gpu_spread, host_spread = spreads(figures)
    group_params: dict[str, tuple[int, int]] = {}
    for p in params:
        total, trained = group_params.get(p.group, (0, 0))
        group_params[p.group] = (
            total + (p.numel if p.origin == Origin.BASE else 0),
            trained + (p.numel if p.trainable else 0),
        )
    gaps = unmodeled_parts(model, params, options, workload, modeled)
    return assemble(items, group_params, cluster.gpus_per_node, cluster.gpu_memory_bytes, cluster.host_ram_bytes, notes,
                    gaps, Spreads(gpu_spread, host_spread, figures, runtime.source))


def _tensor_peak(items: list[Item]) -> Band:
    """The GPU's tensors at their peak phase, bytes: exact, and (high end) with every
    data-dependent item at its worst (`Item.worst_nbytes`)."""
    gpu = [it for it in items if it.place is Place.GPU]
    phases = {ph for it in gpu for ph in it.phases}
    exact = max((sum(it.nbytes for it in gpu if ph in it.phases) for ph in phases), default=0)
    worst = max((sum(max(it.nbytes, it.worst_nbytes or 0) for it in gpu if ph in it.phases) for ph in phases),
                default=0)
    return Band(exact, exact, worst)
