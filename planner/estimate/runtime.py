"""Runtime memory: engine buffers that depend on the model's shapes, the non-tensor overhead of a
CUDA process, and the host's model-loading peak.

Pure arithmetic. Constants that cannot be derived carry a unit and a source and are reported in
the ``overhead`` category, apart from tensor bytes. None of them was measured on a GPU for this
release (no GPU was lent to the task that wrote them); docs/runtime.md says how to measure them.
"""

from __future__ import annotations

from collections.abc import Sequence

from planner.estimate.result import ALWAYS, ENGINE_ROW, RUNTIME_ROW, STEP, Category, Item, Phase, Place
from planner.estimate.states import ZeroSettings, working_dtype
from planner.profile.architectures import Part
from planner.units import MIB, round_up
from planner.workload.inventory import Param
from planner.workload.options import Engine, TrainingOptions, ZeroStage

# --- Non-tensor overhead per GPU process (bytes) ------------------------------------------------
CUDA_CONTEXT_BYTES = 512 * MIB
"""CUDA context + PyTorch's kernels with lazy module loading (CUDA >= 11.7, PyTorch 2.x default):
nvidia-smi shows 300-600 MiB for an idle process on Ampere/Hopper (PyTorch docs "CUDA semantics",
memory management notes; NVIDIA CUDA C++ Programming Guide, lazy loading). Upper middle of that."""

CUBLAS_WORKSPACE_BYTES = 32 * MIB
"""PyTorch's default cuBLAS workspace for one stream, ``CUBLAS_WORKSPACE_CONFIG=:4096:8``:
8 x 4 MiB (torch/csrc/cuda/CublasHandlePool.cpp, ``getChosenWorkspaceSize``)."""

NCCL_BUFFER_BYTES_PER_PEER = 2 * 4 * MIB * 2
"""NCCL's communication buffers: ``NCCL_BUFFSIZE`` = 4 MiB per channel per peer, send and
receive, with the 2 channels NCCL opens over PCIe (NCCL environment variables docs); NVLink
systems open more channels and use more."""

ALLOCATOR_RESERVE_FRACTION = 0.05
"""PyTorch's caching allocator keeps freed blocks and rounds requests up (512 B; 2 MiB segments for
small blocks, 20 MiB for large ones), so ``max_memory_reserved`` runs ahead of
``max_memory_allocated``; 5 % of the tensor peak is a commonly seen gap for steady LLM training
(PyTorch docs, "CUDA semantics: memory management"). Fragmentation spikes can exceed it."""

HOST_PROCESS_BYTES = 2048 * MIB
"""Resident host memory of one training process before any model: Python, torch, transformers,
deepspeed and the CUDA libraries. Measured here: 464 MiB for the CPU build's imports; the CUDA
runtime, cuBLAS/cuDNN/NCCL libraries and the driver's host-side state add 1-2 GiB per process
on a GPU machine (not measured here)."""


def gathered_param_items(params: Sequence[Param], options: TrainingOptions, world_size: int,
                         zero: ZeroSettings) -> list[Item]:
    """ZeRO-3's full parameters gathered for the module running now, plus the prefetch bucket
    (partitioned_param_coordinator.py: fetch up to ``stage3_prefetch_bucket_size`` elements
    ahead, never more than ``stage3_max_live_parameters``). The largest module decides: for an
    LLM that is the embedding or ``lm_head`` (vocab x hidden), gathered at the first and the last
    step of forward and backward. Gathers are padded to a multiple of the world size."""
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
    fwd_bwd = frozenset({Phase.FORWARD, Phase.BACKWARD})
    return [Item(ENGINE_ROW, Category.BUFFERS, Place.GPU, live * wd.itemsize, fwd_bwd)]


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


def overhead_items(world_size: int, tensor_peak_bytes: int) -> list[Item]:
    """The named constants above, for one GPU process and its host side."""
    nccl = NCCL_BUFFER_BYTES_PER_PEER * (world_size - 1) if world_size > 1 else 0
    gpu = CUDA_CONTEXT_BYTES + CUBLAS_WORKSPACE_BYTES + nccl + int(ALLOCATOR_RESERVE_FRACTION * tensor_peak_bytes)
    return [
        Item(RUNTIME_ROW, Category.OVERHEAD, Place.GPU, gpu, ALWAYS),
        Item(RUNTIME_ROW, Category.OVERHEAD, Place.HOST, HOST_PROCESS_BYTES, ALWAYS),
    ]


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
