"""Runtime memory: engine buffers that depend on the model's shapes, what the GPU process holds
beyond its tensors (cuBLAS workspaces, the caching allocator's fragmentation, the CUDA context,
NCCL's buffers), pinned host memory as the host allocator rounds it, and the host's loading peak.

Pure arithmetic. The allocator's rules are in `planner.estimate.allocator`; every constant here
has a unit and a source. What no rule gives is a band (`Band`: low, expected, high) whose middle
and upper end were calibrated on published measurements (docs/calibration.md); `RuntimeModel`
carries them, and a calibration profile measured on the user's GPU replaces them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from planner.estimate.allocator import pinned_block_size, reserved_floor
from planner.estimate.band import Band, GpuFigures
from planner.estimate.result import ALWAYS, ENGINE_ROW, RUNTIME_ROW, STEP, Category, Item, Phase, Place
from planner.estimate.states import ZERO12_ALIGNMENT, ZeroSettings, state_dtype, working_dtype
from planner.profile.architectures import Part
from planner.profile.calibration import CalibrationProfile
from planner.profile.catalog import GpuSpec
from planner.units import GIB, MIB, ceil_div, round_up
from planner.workload.inventory import Param
from planner.workload.options import Engine, Offload, TrainingOptions, ZeroStage

# --- The GPU process beyond its tensors (bytes) ---------------------------------------------------
CUDA_CONTEXT_LAZY = Band(256 * MIB, 512 * MIB, 1 * GIB)
"""CUDA context, driver state and the kernels loaded so far, per GPU process, with lazy module
loading (CUDA >= 11.7; PyTorch sets ``CUDA_MODULE_LOADING=LAZY`` since 1.13, pytorch#86509).
Low: a bare context, 256 MiB on an RTX 3090 (torch 2.7, CUDA 12.8; invoke-ai/InvokeAI#9413) and
274 MiB in pytorch#86509's test; expected: about 400 MB once CUDA is up (ptrblck, pytorch#109888)
plus the cuBLAS, attention and elementwise kernels a training step loads; high: 1 GiB, what the
context reached before lazy loading (">1000MB", pytorch#107667). Not measured per GPU generation
here (no GPU was lent): `memplan calibrate` measures it on the user's card."""

CUDA_CONTEXT_EAGER = Band(640 * MIB, 1 * GIB, 2 * GIB)
"""The same without lazy loading (CUDA < 11.7, or ``CUDA_MODULE_LOADING=EAGER``): every kernel of
every library loaded at start, 636 MiB before cuDNN in pytorch#86509 and over 1000 MB with the
libraries (pytorch#107667)."""

LAZY_LOADING_CUDA = (11, 7)
"""The first CUDA version with lazy module loading (CUDA C++ Programming Guide, "Lazy Loading")."""

CUBLAS_WORKSPACE_BYTES = 4096 * 1024 * 2 + 16 * 1024 * 8
"""PyTorch's default cuBLAS workspace per (handle, stream), ``:4096:2:16:8`` = 8.125 MiB
(aten/src/ATen/cuda/CublasHandlePool.cpp, ``parseChosenWorkspaceSize``). Allocated through the
caching allocator, so ``max_memory_allocated`` counts it."""

CUBLAS_WORKSPACE_BYTES_SM90 = 4096 * 8 * 1024
"""The same on compute capability 9.x, 10.x and 12.x (Hopper, Blackwell): 32 MiB."""

CUBLAS_HANDLES = (1, 2, 4)
"""cuBLAS workspaces alive, (low, expected, high): handles are per thread and device
(``DeviceThreadHandlePool``), so forward and the optimizer step (the Python thread) and backward
(autograd's device thread) hold one each; high: PyTorch versions whose cuBLASLt workspace is not
unified with cuBLAS's (``TORCH_CUBLASLT_UNIFIED_WORKSPACE``) hold a second one per handle."""

NCCL_PCIE = Band(32 * MIB, 64 * MIB, 256 * MIB)
"""NCCL's own device buffers per GPU where GPUs talk over PCIe: ``NCCL_BUFFSIZE`` 4 MiB per
channel and connection for the Simple protocol plus the LL and LL128 buffers, ring and tree
connections to 2-4 peers over 2-4 channels (NCCL environment variables docs; "memory usage is
linearly tied to the number of channels", sjeaugey in NVIDIA/nccl#986). Allocated by NCCL with
cudaMalloc/cuMem, never by PyTorch's allocator."""

NCCL_NVLINK = Band(256 * MIB, 512 * MIB, 1280 * MIB)
"""The same over NVLink/NVSwitch (SXM boards), where NCCL opens up to 32 channels: 1.06 GB per
H100 after initialisation in NVIDIA/nccl#1685; nccl-tests keeps 1 GiB free for NCCL on HGX/DGX
(NVIDIA/nccl-tests#198)."""

FRAGMENTATION = (0.0, 0.12, 0.21)
"""``max_memory_reserved / max_memory_allocated - 1`` of a training run, (low, expected, high):
what the caching allocator keeps cached that the peak cannot use (free blocks in segments of
other sizes, the unsplit tails of large blocks, segments from loading the model). No rule gives
it; calibrated on published pairs and reserved figures (docs/calibration.md, "fragmentation"),
low: none (only the segments the live blocks need, `allocator.reserved_floor`)."""

CALIBRATED_FRAGMENTATION_SPREAD = FRAGMENTATION[2] - FRAGMENTATION[1]
"""How far the high end stays above a measured expected fragmentation, at least (dimensionless):
the spread of the published runs above their median (docs/calibration.md). A calibration's few
short steps on small models do not meet a long run's longest batches and evaluation loops (the
same PEFT setup reserved 18.7 GiB over 1,000 steps and 21.0 GiB over 5,000)."""

CALIBRATED_CONTEXT_HIGH = 1.25
"""A context measured by `memplan calibrate` (after a training step) may still grow by the
kernels a different model loads: its high end is 25 % above the measurement (dimensionless)."""

# --- The host process (bytes per rank) ---------------------------------------------------------
HOST_PROCESS = Band(512 * MIB, 2 * GIB, 3 * GIB)
"""Resident host memory of one training process before any model: Python, torch, transformers,
deepspeed and the CUDA libraries. Low: 464 MiB measured here for the CPU build's imports;
expected and high: the CUDA runtime, cuBLAS/cuDNN/NCCL libraries and the driver's host-side
state add 1-2.5 GiB per process on a GPU machine (not measured here: no GPU was lent)."""

HOST_PROCESS_BYTES = HOST_PROCESS.expected
"""The host process's expected figure, bytes per rank (the overhead item's size)."""

SOURCED = "the sourced defaults (docs/runtime.md)"
"""What the output names when no calibration profile is used."""


@dataclass(frozen=True)
class RuntimeModel:
    """The constants of the GPU process beyond its tensors, as the estimator uses them.

    The defaults are the sourced constants above; `from_calibration` replaces what a calibration
    profile measured on the user's GPU. The estimator stays pure: the CLI loads the profile.

    Attributes:
        cuda_context: the context band per GPU; None: by CUDA version (lazy loading or not).
        cuda_version: the run's CUDA version (``"12.4"``); None: assume lazy loading.
        cublas_workspace_bytes: one cuBLAS workspace, bytes; None: PyTorch's default for the GPU.
        fragmentation: (low, expected, high) of reserved / allocated - 1.
        expandable_segments: ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` (the large pool
            grows in 20 MiB pages; no public pair was found, so the fraction stays the same).
        source: where these come from, named in the output.
    """

    cuda_context: Band | None = None
    cuda_version: str | None = None
    cublas_workspace_bytes: int | None = None
    fragmentation: tuple[float, float, float] = FRAGMENTATION
    expandable_segments: bool = False
    source: str = SOURCED

    @classmethod
    def from_calibration(cls, profile: CalibrationProfile) -> RuntimeModel:
        """The model with what ``memplan calibrate`` measured on the user's GPU; a field it did
        not measure (None) keeps the sourced default. A measured context is its expected and low
        value, `CALIBRATED_CONTEXT_HIGH` times it the high end."""
        low, exp, high = FRAGMENTATION
        if profile.fragmentation_expected is not None:
            exp = profile.fragmentation_expected
            high = max(profile.fragmentation_high or 0.0, exp + CALIBRATED_FRAGMENTATION_SPREAD)
        elif profile.fragmentation_high is not None:
            high = max(profile.fragmentation_high, exp)
        context = profile.cuda_context_bytes
        return cls(
            cuda_context=None if context is None else Band(context, context, int(context * CALIBRATED_CONTEXT_HIGH)),
            cuda_version=profile.cuda_version,
            cublas_workspace_bytes=profile.cublas_workspace_bytes,
            fragmentation=(min(low, exp), exp, high),
            source=f"memplan calibrate on {profile.gpu}, {profile.measured}",
        )


def cuda_context(model: RuntimeModel) -> Band:
    """The CUDA context per GPU process, bytes: measured, or by CUDA version."""
    if model.cuda_context is not None:
        return model.cuda_context
    return CUDA_CONTEXT_LAZY if _lazy_loading(model.cuda_version) else CUDA_CONTEXT_EAGER


def _lazy_loading(cuda_version: str | None) -> bool:
    if not cuda_version:
        return True  # PyTorch 2.x wheels are built for CUDA 11.8 and later
    try:
        major, minor = (int(x) for x in cuda_version.split(".")[:2])
    except ValueError:
        return True
    return (major, minor) >= LAZY_LOADING_CUDA


def cublas_workspaces(gpu: GpuSpec, model: RuntimeModel) -> Band:
    """cuBLAS workspaces alive on one GPU, bytes: one per handle (`CUBLAS_HANDLES`)."""
    one = model.cublas_workspace_bytes
    if one is None:
        one = CUBLAS_WORKSPACE_BYTES_SM90 if gpu.compute_capability_tuple[0] in (9, 10, 12) else CUBLAS_WORKSPACE_BYTES
    low, exp, high = CUBLAS_HANDLES
    return Band(low * one, exp * one, high * one)


def nccl_buffers(gpu: GpuSpec, world_size: int) -> Band:
    """NCCL's device buffers per GPU, bytes: none alone; NVLink boards open more channels."""
    if world_size <= 1:
        return Band.exact(0)
    return NCCL_NVLINK if gpu.form_factor == "sxm" and gpu.nvlink_gbps > 0 else NCCL_PCIE


def gpu_figures(tensor_peak: Band, gpu: GpuSpec, world_size: int, model: RuntimeModel) -> GpuFigures:
    """The allocated, reserved and nvidia-smi figures of one GPU at its peak, each a band.

    Args:
        tensor_peak: the tensors alive at the peak (the ledger's blocks), bytes; its high end
            counts data-dependent parts at their worst.
        gpu: the GPU (its compute capability picks the cuBLAS workspace, its board the NCCL band).
        world_size: ranks in the run.
        model: the runtime constants.
    """
    allocated = tensor_peak + cublas_workspaces(gpu, model)
    low, exp, high = model.fragmentation
    # Only the total of the live blocks is known here, so the floor rounds it as one large block;
    # the fractions (calibrated on whole runs) carry the rest of reserved - allocated.
    floor = {b: reserved_floor([b], model.expandable_segments) for b in (allocated.low, allocated.expected,
                                                                          allocated.high)}
    reserved = Band(floor[allocated.low] + int(low * allocated.low),
                    floor[allocated.expected] + int(exp * allocated.expected),
                    floor[allocated.high] + int(high * allocated.high))
    return GpuFigures(allocated, reserved, reserved + cuda_context(model) + nccl_buffers(gpu, world_size))


def overhead_items(figures: GpuFigures, tensor_peak_bytes: int) -> list[Item]:
    """The GPU's expected figure beyond its tensors (workspaces, fragmentation, context, NCCL) and
    the host process, as overhead items (the bands' ends are in `spreads`)."""
    return [
        Item(RUNTIME_ROW, Category.OVERHEAD, Place.GPU, figures.device.expected - tensor_peak_bytes, ALWAYS),
        Item(RUNTIME_ROW, Category.OVERHEAD, Place.HOST, HOST_PROCESS_BYTES, ALWAYS),
    ]


def spreads(figures: GpuFigures) -> tuple[tuple[int, int], tuple[int, int]]:
    """(expected - low, high - expected) of the GPU figure and of one rank's host bytes."""
    dev, host = figures.device, HOST_PROCESS
    return (dev.expected - dev.low, dev.high - dev.expected), (host.expected - host.low, host.high - host.expected)


def gathered_param_items(params: Sequence[Param], options: TrainingOptions, world_size: int,
                         zero: ZeroSettings) -> list[Item]:
    """ZeRO-3's full parameters gathered during forward and backward, per GPU.

    Two rules of ``partitioned_param_coordinator.py`` decide, and the larger holds: the module
    running now plus the prefetch bucket (fetch up to ``stage3_prefetch_bucket_size`` elements
    ahead, never more than ``stage3_max_live_parameters``; the largest module decides: for an LLM
    the embedding or ``lm_head``); and, where forward turns into backward, every module whose next
    use is nearer than ``stage3_max_reuse_distance`` elements, which ``__params_to_release`` keeps
    gathered (`retained_numel`). Gathers are padded to a multiple of the world size."""
    if options.engine is not Engine.DEEPSPEED or options.zero is not ZeroStage.PARAMETERS:
        return []
    wd = working_dtype(options)
    modules: dict[tuple[str, str], int] = {}
    for p in params:
        if p.numel <= zero.param_persistence_threshold:
            continue  # persistent: already gathered, counted with the weights
        key = (p.group, _module_key(p))
        modules[key] = modules.get(key, 0) + round_up(p.numel, world_size)
    if not modules:
        return []
    largest = max(modules.values())
    live = min(largest + zero.prefetch_bucket_size, max(zero.max_live_parameters, largest))
    retained = retained_numel(params, options, world_size, zero)
    if retained:
        live = max(live, retained + min(zero.prefetch_bucket_size, max(0, zero.max_live_parameters - retained)))
    fwd_bwd = frozenset({Phase.FORWARD, Phase.BACKWARD})
    return [Item(ENGINE_ROW, Category.BUFFERS, Place.GPU, live * wd.itemsize, fwd_bwd)]


def retained_numel(params: Sequence[Param], options: TrainingOptions, world_size: int, zero: ZeroSettings) -> int:
    """Elements (padded to the world size) ZeRO-3 keeps gathered where forward turns into
    backward: after a module's forward, ``__params_to_release`` walks the recorded module order
    from the next module on and keeps the module's parameters if it meets them again before
    ``stage3_max_reuse_distance`` elements (DeepSpeed's default and MiniCPM's config: 1e9). From
    the second step on (the first has no complete trace) that keeps the tail of the model.

    The distance to a module's next use, in elements of the modules between: without activation
    checkpointing ``2 x`` what follows it (the rest of forward, then backward back to it); with
    it, a decoder layer's module next runs when backward recomputes its layer: the rest of its
    layer, ``3 x`` the later layers (forward, recompute, backward) and ``2 x`` the norm and
    ``lm_head`` after them. Only the group that runs last (the one with the LM head) is walked:
    the modules of a group before it are a whole LLM away from their next use."""
    order = _last_group_modules(params, zero)
    layer_total: dict[str, int] = {}
    for _, layer, numel in order:
        if layer is not None:
            layer_total[layer] = layer_total.get(layer, 0) + numel
    after = sum(n for _, _, n in order)  # elements after module i, by the walk below
    later_layers = sum(layer_total.values())  # elements of layers after module i's layer
    done: dict[str, int] = {}
    kept = 0
    for _, layer, numel in order:
        after -= numel
        if layer is None:
            distance = 2 * after
        else:
            if layer not in done:
                later_layers -= layer_total[layer]
            done[layer] = done.get(layer, 0) + numel
            if options.grad_ckpt:
                tail = after - (layer_total[layer] - done[layer]) - later_layers
                distance = (layer_total[layer] - numel) + 3 * later_layers + 2 * tail
            else:
                distance = 2 * after
        if distance < zero.max_reuse_distance:
            kept += round_up(numel, world_size)
    return kept


def _last_group_modules(params: Sequence[Param], zero: ZeroSettings) -> list[tuple[str, str | None, int]]:
    """(module, decoder layer or None, elements) of the group with the LM head, in forward order,
    leaving out persistent parameters; a tied ``lm_head`` (no parameter of its own) runs the
    embedding's weight last."""
    heads = [p.group for p in params if p.tensor.part is Part.LM_HEAD]
    group = heads[-1] if heads else next((p.group for p in params if p.tensor.part is Part.EMBED_TOKENS), None)
    if group is None:
        return []
    modules: dict[str, list] = {}
    for p in params:
        if p.group != group or p.numel <= zero.param_persistence_threshold:
            continue
        key = p.tensor.name.rsplit(".", 1)[0]
        layer = _module_key(p) if p.tensor.part is Part.LAYERS else None
        modules.setdefault(key, [key, layer, 0, p.tensor.part])[2] += p.numel
    rows = list(modules.values())
    if not heads:  # tied: the embedding's weight is used again, last, as the LM head
        rows.sort(key=lambda r: r[3] is Part.EMBED_TOKENS)
    return [(key, layer, numel) for key, layer, numel, _ in rows]


def _module_key(p: Param) -> str:
    """The unit ZeRO-3 gathers together: one decoder layer, or the embedding, or lm_head."""
    name = p.tensor.name
    if p.tensor.part is Part.LAYERS:
        parts = name.split(".")
        return ".".join(parts[:3])  # model.layers.N
    return name.rsplit(".", 1)[0]


def ddp_bucket_items(params: Sequence[Param], options: TrainingOptions, world_size: int) -> list[Item]:
    """DDP's gradient buckets: with ``gradient_as_bucket_view=False`` (PyTorch's and HF Trainer's
    default) the reducer keeps a flat bucket buffer beside every gradient, one more copy of all
    trained gradients (torch/csrc/distributed/c10d/reducer.cpp, ``Reducer::initialize_buckets``),
    alive from the first backward on."""
    if options.engine is not Engine.TORCH or world_size == 1:
        return []
    wd = working_dtype(options)
    nbytes = sum(p.numel for p in params if p.trainable) * wd.itemsize
    return [Item(ENGINE_ROW, Category.BUFFERS, Place.GPU, nbytes, STEP)]


def loading_items(params: Sequence[Param], options: TrainingOptions, zero_init: bool) -> list[Item]:
    """Host memory while the model is built and its weights read, per rank.

    Without ``zero.Init`` every rank materialises the whole model in host RAM in the load dtype
    before it moves to the GPU (the trap of ZeRO-3 runs whose model class does not support it);
    with ``zero.Init`` (HF ``from_pretrained`` under a ZeRO-3 DeepSpeed config) each rank holds its
    partition plus one checkpoint shard being read (transformers' safetensors loading; about 5 GB
    shards on the hub, ``max_shard_size="5GB"``).
    """
    wd = working_dtype(options)
    total = sum(p.numel for p in params if p.origin == "base") * wd.itemsize
    if zero_init:
        nbytes = min(total, SHARD_BYTES)
    else:
        nbytes = total
    return [Item(RUNTIME_ROW, Category.WEIGHTS, Place.HOST, nbytes, frozenset({Phase.LOAD}))]


SHARD_BYTES = 5 * 10**9
"""transformers' default ``max_shard_size="5GB"``: the largest checkpoint file read at once."""


def pinned_rounding_items(params: Sequence[Param], options: TrainingOptions, world_size: int,
                          zero: ZeroSettings) -> list[Item]:
    """What the power-of-two rounding of pinned host memory adds to DeepSpeed's offload buffers,
    per rank (`allocator.pinned_block_size`). The pinned buffers and their granularity are those
    of docs/zero-internals.md section 8: ZeRO-1/2 pin the flat fp32 master partition, its fp32
    gradient, the 16-bit staging partition and the largest parameter's temp gradient; ZeRO-3 pins
    the trainable 16-bit partitions in one flat buffer, every frozen partition on its own (with
    ``offload_param``), the flat gradient buffer and each sub-group's fp32 gradient (with
    ``offload_optimizer``). Adam's states are not pinned. Alive from ``initialize()``; the
    gradients' only in the step."""
    if options.engine is not Engine.DEEPSPEED or not options.pin_memory:
        return []
    wd, sd = working_dtype(options).itemsize, state_dtype(options).itemsize
    trained = [p for p in params if p.trainable]
    offload_opt = options.offload_optimizer is Offload.CPU
    kept: list[int] = []
    grads: list[int] = []
    if options.zero in (ZeroStage.OPTIMIZER_STATES, ZeroStage.GRADIENTS) and offload_opt:
        total = sum(p.numel for p in trained)
        part = ceil_div(round_up(total, ZERO12_ALIGNMENT * world_size), world_size)
        largest = max((p.numel for p in trained), default=0)
        kept += [part * sd, part * wd, largest * wd]  # master partition, 16-bit staging, temp grad
        grads.append(part * sd)  # the master partition's .grad
    elif options.zero is ZeroStage.PARAMETERS:
        parts = [ceil_div(p.numel, world_size) for p in trained]
        if options.offload_param is Offload.CPU:
            kept.append(sum(parts) * wd)  # param_groups_fp16_flat_cpu_memory
            kept += [ceil_div(p.numel, world_size) * wd for p in params
                     if not p.trainable and p.numel > zero.param_persistence_threshold]
        if offload_opt:
            grads.append(sum(parts) * wd)  # grad_partitions_flat_buffer
            left = sum(parts)
            while left > 0:  # the fp32 gradient of each sub-group's master partition
                grads.append(min(left, zero.sub_group_size) * sd)
                left -= zero.sub_group_size
    return [Item(RUNTIME_ROW, Category.OVERHEAD, Place.HOST, extra, phases)
            for extra, phases in ((_rounding(kept), ALWAYS), (_rounding(grads), STEP)) if extra]


def _rounding(sizes: Sequence[int]) -> int:
    """Bytes the pinned host allocator adds to allocations of these sizes."""
    return sum(pinned_block_size(n) - n for n in sizes)
