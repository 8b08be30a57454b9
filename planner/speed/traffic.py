"""Traffic: the bytes one rank moves per optimizer step, between GPUs and to and from the host.

Estimate stage, pure arithmetic (no torch, no I/O), read from DeepSpeed 0.19.8's sources and
checked against its comms logger on a real engine (tests/speed/test_speed.py). ``planner.speed.step_time`` turns
these bytes into seconds; docs/speed.md derives every rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from planner.estimate.states import ZERO12_ALIGNMENT, ZeroSettings, working_dtype
from planner.profile.catalog import ModelSpec
from planner.speed.flops import recomputed
from planner.speed.flops import units as flop_units
from planner.units import ceil_div, round_up
from planner.workload.inventory import Param, Workload
from planner.workload.options import Engine, Offload, TrainingOptions, ZeroStage

DS_MAX_REUSE_DISTANCE = 1_000_000_000
"""``stage3_max_reuse_distance`` (elements), DeepSpeed 0.19.8's default, which HF does not fill:
a ZeRO-3 parameter used again within this many gathered elements stays gathered
(partitioned_param_coordinator.py ``__params_to_release``)."""


@dataclass(frozen=True)
class Collective:
    """One kind of collective per optimizer step on one rank.

    Attributes:
        op: ``all_reduce``, ``all_gather`` or ``reduce_scatter``.
        what: what it moves.
        nbytes: full buffer bytes per step (the gathered / reduced size), all calls together.
    """

    op: str
    what: str
    nbytes: float

    def sent_bytes(self, ranks: int) -> float:
        """Bytes one rank sends in a ring: all-reduce 2(n-1)/n, the others (n-1)/n of the buffer."""
        if ranks <= 1:
            return 0.0
        factor = 2 if self.op == "all_reduce" else 1
        return factor * (ranks - 1) / ranks * self.nbytes


@dataclass(frozen=True)
class HostTraffic:
    """Offload traffic of one rank per optimizer step, bytes."""

    to_gpu: float = 0.0
    to_host: float = 0.0
    nvme_read: float = 0.0
    nvme_write: float = 0.0


def _comm_bytes(options: TrainingOptions) -> int:
    """Bytes per gradient element on the wire: DeepSpeed communicates in the module's dtype
    (engine.py ``communication_data_type``); DDP reduces ``.grad``, fp32 under torch AMP."""
    return working_dtype(options).itemsize


def _aligned(numel: int, ranks: int) -> int:
    """ZeRO-3 pads every parameter to a multiple of the ranks (``ds_numel_aligned``)."""
    return ceil_div(numel, ranks) * ranks


_GATHERED: dict[tuple, tuple[float, float]] = {}


def zero3_gathered(model: ModelSpec, params: Sequence[Param], workload: Workload, zero: ZeroSettings,
                   grad_ckpt: bool, world_size: int = 1,
                   max_reuse_distance: int = DS_MAX_REUSE_DISTANCE) -> tuple[float, float]:
    """Elements ZeRO-3 all-gathers in one micro-step's forward and in its backward
    (recomputation included), padding included.

    The trace DeepSpeed records is every module with parameters in forward order, then, for each
    module the backward passes through, in reverse order (under checkpointing a layer's
    recomputed forward first, without the last product that early stop skips). A module's
    parameters are gathered at a use unless they stayed gathered since the previous one: they
    are released after a use unless their next use comes within ``max_reuse_distance`` elements
    of other modules' parameters. Parameters of at most ``param_persistence_threshold`` elements
    stay gathered and are not counted. Not modeled: the prefetcher keeps parameters whose next
    use its look-ahead (``prefetch_bucket_size``) skipped over, which on a model smaller than
    that look-ahead saves most backward gathers (docs/speed.md).
    """
    key = (tuple((g.name, g.kind) for g in model.groups), tuple(params), workload, grad_ckpt,
           zero.param_persistence_threshold, world_size, max_reuse_distance)
    if key not in _GATHERED:
        if len(_GATHERED) >= 256:
            _GATHERED.clear()
        _GATHERED[key] = _gathered(model, params, workload, zero.param_persistence_threshold, grad_ckpt,
                                   world_size, max_reuse_distance)
    return _GATHERED[key]


def _gathered(model: ModelSpec, params: Sequence[Param], workload: Workload, persistence: int, grad_ckpt: bool,
              world_size: int, max_reuse_distance: int) -> tuple[float, float]:
    all_units, _ = flop_units(model, params, workload, grad_ckpt)
    seq: list[tuple[int, bool]] = [(i, True) for i in range(len(all_units))]
    by_layer: dict[tuple[str, int | None], list[int]] = {}
    for i, u in enumerate(all_units):
        by_layer.setdefault((u.group, u.layer), []).append(i)
    done: set[tuple[str, int | None]] = set()
    for i in reversed(range(len(all_units))):
        u = all_units[i]
        key = (u.group, u.layer)
        if grad_ckpt and u.layer is not None and key not in done:
            done.add(key)
            layer = [all_units[j] for j in by_layer[key]]
            if any(v.backward for v in layer):
                rerun = {id(v) for v in recomputed(layer)}
                seq += [(j, False) for j in by_layer[key] if id(all_units[j]) in rerun]
        if u.backward:
            seq.append((i, False))
    sizes = [sum(n for _, n in all_units[i].tensors) for i, _ in seq]
    prefix = [0]
    for s in sizes:
        prefix.append(prefix[-1] + s)
    last: dict[str, int] = {}
    fwd = bwd = 0.0
    for k, (i, forward) in enumerate(seq):
        for name, numel in all_units[i].tensors:
            if numel <= persistence:
                continue
            j = last.get(name)
            if j is None or prefix[k] - prefix[j + 1] >= max_reuse_distance:
                if forward:
                    fwd += _aligned(numel, world_size)
                else:
                    bwd += _aligned(numel, world_size)
            last[name] = k
    return fwd, bwd


def collectives(model: ModelSpec, params: Sequence[Param], options: TrainingOptions, workload: Workload,
                zero: ZeroSettings, world_size: int,
                max_reuse_distance: int = DS_MAX_REUSE_DISTANCE) -> list[Collective]:
    """The collectives one rank takes part in per optimizer step.

    * DDP (HF Trainer without DeepSpeed): one all-reduce of every trained gradient per optimizer
      step (``no_sync`` during accumulation).
    * DeepSpeed ZeRO-0/1: the same all-reduce at the accumulation boundary; ZeRO-1 then
      all-gathers the updated 16-bit parameters.
    * ZeRO-2: the gradient buckets are all-reduced in every micro-step's backward
      (stage_1_and_2.py ``average_tensor``: ``use_multi_rank_bucket_allreduce`` defaults to
      True), then the updated parameters all-gathered once.
    * ZeRO-3: every micro-step all-gathers the 16-bit parameters of each module as it runs
      (``zero3_gathered``) and reduce-scatters the trained gradients; after the optimizer step
      it all-gathers the persistent parameters.
    """
    if world_size <= 1:
        return []
    trained = sum(p.numel for p in params if p.trainable)
    b, c = working_dtype(options).itemsize, _comm_bytes(options)
    gas = workload.grad_accum
    if options.engine is Engine.TORCH or options.zero is ZeroStage.DISABLED:
        return [Collective("all_reduce", "gradients, once per step", trained * c)]
    flat = round_up(trained, ZERO12_ALIGNMENT * world_size)  # the padded flat 16-bit group
    if options.zero is ZeroStage.OPTIMIZER_STATES:
        return [Collective("all_reduce", "gradients at the boundary", trained * c),
                Collective("all_gather", "updated parameters", flat * b)]
    if options.zero is ZeroStage.GRADIENTS:
        return [Collective("all_reduce", "gradient buckets, every micro-step", gas * trained * c),
                Collective("all_gather", "updated parameters", flat * b)]
    fwd, bwd = zero3_gathered(model, params, workload, zero, options.grad_ckpt, world_size, max_reuse_distance)
    persistent = sum(_aligned(p.numel, world_size) for p in params if p.numel <= zero.param_persistence_threshold)
    return [Collective("all_gather", "parameters in forward, every micro-step", gas * fwd * b),
            Collective("all_gather", "parameters in backward, every micro-step", gas * bwd * b),
            Collective("reduce_scatter", "gradients, every micro-step",
                       gas * sum(_aligned(p.numel, world_size) for p in params if p.trainable) * c),
            Collective("all_gather", "persistent parameters after the step", persistent * b)]


def host_traffic(model: ModelSpec, params: Sequence[Param], options: TrainingOptions, workload: Workload,
                 zero: ZeroSettings, world_size: int) -> HostTraffic:
    """What the offloads move per optimizer step on one rank (``P`` = the rank's partition of
    the trained elements, ``b`` = 2 bytes for a 16-bit module; DeepSpeed 0.19.8 sources):

    * optimizer offload, ZeRO-1/2: the fp32 gradient partition goes down at the boundary
      (``P*4``; stage_1_and_2.py ``async_inplace_copy_grad_to_fp32_buffer_from_gpu`` casts on
      the GPU); ZeRO-2 with accumulation also parks the 16-bit gradients on the host between
      micro-steps (``async_accumulate_grad_in_cpu_via_gpu``: down every micro-step, up every
      micro-step after the first); the updated 16-bit partition comes up once (``P*b``).
    * optimizer offload, ZeRO-3: every micro-step the reduced 16-bit gradient partition goes
      down into the host buffer and comes back up to be added to or moved to the GPU
      (stage3.py ``partition_grads``), the fp32 partition goes down at the boundary
      (``_offload_grad_partition_at_boundary``), the updated 16-bit partition comes up unless
      the parameters are offloaded too.
    * parameter offload (ZeRO-3): every gather first copies the rank's partition up
      (partition_parameters.py ``ds_tensor.to(device)``); without optimizer offload the updated
      partition goes down after the step.
    * NVMe: the optimizer reads and writes its fp32 master, both states and the fp32 gradient
      (16 bytes per element each way); offloaded parameters are read at every gather and the
      updated ones written after the step.
    """
    if options.engine is not Engine.DEEPSPEED:
        return HostTraffic()
    n = max(world_size, 1)
    part = ceil_div(sum(p.numel for p in params if p.trainable), n)
    b, gas = working_dtype(options).itemsize, workload.grad_accum
    f32 = 4
    up = down = read = write = 0.0
    off_opt, off_par = options.offload_optimizer, options.offload_param
    if off_opt is not Offload.NONE:
        down += part * f32
        if options.zero is ZeroStage.PARAMETERS:
            down += gas * part * b
            up += gas * part * b + (0 if off_par is not Offload.NONE else part * b)
        else:
            up += part * b
            if options.zero is ZeroStage.GRADIENTS and gas > 1:
                down += gas * part * b
                up += (gas - 1) * part * b
        if off_opt is Offload.NVME:
            read += 4 * part * f32
            write += 4 * part * f32
    if off_par is not Offload.NONE:
        fwd, bwd = zero3_gathered(model, params, workload, zero, options.grad_ckpt, n)
        fetched = gas * (fwd + bwd) / n * b
        up += fetched
        if off_opt is Offload.NONE:
            down += part * b
        if off_par is Offload.NVME:
            read += fetched
            write += part * b
    return HostTraffic(up, down, read, write)
