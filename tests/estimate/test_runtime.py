"""The GPU runtime model term by term against its source's rule, and the band over every profile.

Allocator numbers are PyTorch's (``c10/cuda/CUDACachingAllocator.cpp`` at 001074d: the constants
``kMinBlockSize = 512``, ``kSmallSize = 1048576``, ``kSmallBuffer = 2097152``, ``kLargeBuffer =
20971520``, ``kMinLargeAlloc = 10485760``, ``kRoundLarge = 2097152`` and the functions
``round_size``, ``get_pool``, ``get_allocation_size``, ``should_split``; the host allocator's
``PowerOf2Ceil`` in ``aten/src/ATen/core/CachingHostAllocator.h``), the cuBLAS workspace is
``parseChosenWorkspaceSize`` in ``aten/src/ATen/cuda/CublasHandlePool.cpp``, ZeRO-3's reuse rule is
``PartitionedParameterCoordinator.__params_to_release`` (DeepSpeed).
"""

from __future__ import annotations

import dataclasses

import pytest

from planner.estimate import RuntimeModel, estimate
from planner.estimate.allocator import (
    Pool,
    block_size,
    expandable_page,
    pinned_block_size,
    pool,
    reserved_floor,
    segment_size,
    splits,
)
from planner.estimate.band import Band, Verdict
from planner.estimate.result import Budget, Category
from planner.estimate.runtime import (
    CUDA_CONTEXT_EAGER,
    CUDA_CONTEXT_LAZY,
    NCCL_NVLINK,
    NCCL_PCIE,
    cublas_workspaces,
    cuda_context,
    nccl_buffers,
    pinned_rounding_items,
    retained_numel,
)
from planner.estimate.states import ZeroSettings
from planner.profile.catalog import build_model, load_catalog
from planner.profile.hardware import make_cluster
from planner.units import GIB, MIB
from planner.workload.inventory import Workload, trainable_inventory
from planner.workload.options import LoraOptions, TrainingOptions

CATALOG = load_catalog(())


# --- the caching allocator, rule by rule ------------------------------------------------------


def test_block_rounding_is_round_size():
    """round_size: below kMinBlockSize a request gets 512 bytes, above a multiple of 512."""
    assert [block_size(n) for n in (0, 1, 511, 512, 513, 1024, 1025)] == [0, 512, 512, 512, 1024, 1024, 1536]


def test_pools_split_at_one_mib():
    """get_pool: blocks of at most kSmallSize (1 MiB) go to the small pool, the rest to the large."""
    assert pool(1 * MIB) is Pool.SMALL and pool(1 * MIB - 100) is Pool.SMALL
    assert pool(1 * MIB + 1) is Pool.LARGE  # rounds to 1 MiB + 512


def test_segments_are_get_allocation_size():
    """get_allocation_size: 2 MiB segments for small blocks, 20 MiB for blocks under 10 MiB,
    else the block rounded up to kRoundLarge (2 MiB)."""
    assert segment_size(100) == segment_size(1 * MIB) == 2 * MIB
    assert segment_size(1 * MIB + 1) == segment_size(10 * MIB - 512) == 20 * MIB
    assert segment_size(10 * MIB) == 10 * MIB
    assert segment_size(10 * MIB + 1) == 12 * MIB
    assert segment_size(33 * MIB + 1) == 34 * MIB


def test_split_rules_are_should_split():
    """should_split: a small block splits when at least 512 bytes remain; a large one only when
    more than kSmallSize remains, else the whole block is handed out (and counted as allocated)."""
    assert splits(2 * MIB, 1 * MIB) and not splits(2 * MIB, 2 * MIB - 256)
    assert not splits(20 * MIB, 19 * MIB)  # 1 MiB left: not more than kSmallSize
    assert splits(20 * MIB, 19 * MIB - 512)


def test_reserved_floor_and_expandable_segments():
    """Small blocks pack into 2 MiB segments; the large pool holds at least its blocks rounded to
    2 MiB, or to the 20 MiB page of an expandable segment (Note [Expandable Segments])."""
    assert reserved_floor([100, 100, 100]) == 2 * MIB
    assert reserved_floor([3 * MIB]) == 4 * MIB
    assert reserved_floor([3 * MIB], expandable=True) == 20 * MIB == expandable_page(Pool.LARGE)
    assert expandable_page(Pool.SMALL) == 2 * MIB
    assert reserved_floor([]) == 0


def test_pinned_host_memory_rounds_to_a_power_of_two():
    """CachingHostAllocatorImpl::allocate: roundSize = PowerOf2Ceil(size)."""
    assert [pinned_block_size(n) for n in (0, 1, 3, 4, 5)] == [0, 1, 4, 4, 8]
    assert pinned_block_size(GIB) == GIB and pinned_block_size(GIB + 1) == 2 * GIB
    assert pinned_block_size(7_681_626_624) == 2**33  # MiniCPM-o's 16-bit partition per rank


# --- the process beyond its tensors ---------------------------------------------------------------


def test_cublas_workspace_by_compute_capability():
    """parseChosenWorkspaceSize: ``:4096:2:16:8`` = 8,519,680 bytes, 32 MiB on 9.x/10.x/12.x; one
    per handle, two handles expected (forward/optimizer thread, autograd's thread); a calibrated
    size replaces PyTorch's default."""
    ada, hopper = CATALOG.gpu("rtx4090"), CATALOG.gpu("h100-sxm")
    assert cublas_workspaces(ada, RuntimeModel()) == Band(8_519_680, 2 * 8_519_680, 4 * 8_519_680)
    assert cublas_workspaces(hopper, RuntimeModel()).expected == 2 * 32 * MIB
    assert cublas_workspaces(ada, RuntimeModel(cublas_workspace_bytes=MIB)).expected == 2 * MIB


def test_context_and_nccl_bands():
    """Lazy module loading from CUDA 11.7 on; NCCL has no buffers alone, more over NVLink."""
    assert cuda_context(RuntimeModel()) == CUDA_CONTEXT_LAZY == cuda_context(RuntimeModel(cuda_version="12.4"))
    assert cuda_context(RuntimeModel(cuda_version="11.6")) == CUDA_CONTEXT_EAGER
    assert nccl_buffers(CATALOG.gpu("rtx3090"), 1) == Band.exact(0)
    assert nccl_buffers(CATALOG.gpu("rtx3090"), 2) == NCCL_PCIE
    assert nccl_buffers(CATALOG.gpu("h100-sxm"), 8) == NCCL_NVLINK


def test_zero3_keeps_what_it_will_reuse_soon():
    """__params_to_release keeps a module gathered when its next use is nearer than
    stage3_max_reuse_distance elements: for Qwen2.5-7B (lm_head 545M elements, layers 233M) only
    lm_head is that near; a 0.5B model is kept almost whole; a distance of 0 keeps nothing."""
    opts = TrainingOptions(engine="deepspeed", zero=3)
    big = build_model(CATALOG.model("qwen2.5-7b"))
    zero = ZeroSettings.hf_auto(big.hidden_size)
    params = trainable_inventory(big, opts)
    head = sum(p.numel for p in params if p.tensor.part.value == "lm_head")
    assert retained_numel(params, opts, 1, zero) == head
    small = build_model(CATALOG.model("qwen2.5-0.5b"))
    sparams = trainable_inventory(small, opts)
    szero = ZeroSettings.hf_auto(small.hidden_size)
    gathered = sum(p.numel for p in sparams if p.numel > szero.param_persistence_threshold)
    assert retained_numel(sparams, opts, 1, szero) > 0.5 * gathered
    assert retained_numel(sparams, opts, 1, dataclasses.replace(szero, max_reuse_distance=0)) == 0


def test_pinned_rounding_only_where_deepspeed_pins():
    """Plain PyTorch and offload without pin_memory pin nothing; ZeRO-2 with the optimizer on the
    CPU rounds its flat partitions up to powers of two."""
    model = build_model(CATALOG.model("qwen2.5-0.5b"))
    zero = ZeroSettings.hf_auto(model.hidden_size)
    torch = TrainingOptions(engine="torch")
    off = TrainingOptions(engine="deepspeed", zero=2, offload_optimizer="cpu")
    assert pinned_rounding_items(trainable_inventory(model, torch), torch, 1, zero) == []
    unpinned = off.model_copy(update={"pin_memory": False})
    assert pinned_rounding_items(trainable_inventory(model, unpinned), unpinned, 1, zero) == []
    items = pinned_rounding_items(trainable_inventory(model, off), off, 1, zero)
    total = sum(p.numel for p in trainable_inventory(model, off))
    part = total + total % 2
    largest = max(p.numel for p in trainable_inventory(model, off))
    kept = [part * 4, part * 2, largest * 2]  # fp32 master, 16-bit staging, temp grad
    assert [it.nbytes for it in items] == [sum(pinned_block_size(n) - n for n in kept),
                                           pinned_block_size(part * 4) - part * 4]


# --- the band ------------------------------------------------------------------------------------


def _budget(expected: int, low: int, high: int, capacity: int, lower_bound: bool = False) -> Budget:
    cats = {c: 0 for c in Category} | {Category.WEIGHTS: expected}
    return Budget(capacity, cats, lower_bound=lower_bound, spread=(expected - low, high - expected))


def test_verdict_transitions_around_capacity():
    """FITS while the high end fits; TIGHT from the high end down to the expected figure; DOES NOT
    FIT past the expected figure; a lower bound within capacity is UNKNOWN."""
    low, exp, high = 90, 100, 120
    cases = {150: Verdict.FITS, 120: Verdict.FITS, 119: Verdict.TIGHT, 100: Verdict.TIGHT, 99: Verdict.DOES_NOT_FIT}
    for capacity, verdict in cases.items():
        b = _budget(exp, low, high, capacity)
        assert b.verdict is verdict, capacity
        assert b.fits is {Verdict.FITS: True, Verdict.DOES_NOT_FIT: False}.get(verdict)
    assert _budget(exp, low, high, 150, lower_bound=True).verdict is Verdict.UNKNOWN
    assert _budget(exp, low, high, 99, lower_bound=True).verdict is Verdict.DOES_NOT_FIT
    with pytest.raises(ValueError):
        Band(2, 1, 3)


def test_estimate_verdict_follows_the_gpu_band():
    """One real estimate, the GPU's capacity moved across its band."""
    model = build_model(CATALOG.model("qwen2.5-1.5b"))
    cluster = make_cluster("1x4090", CATALOG, 256 * GIB)
    options = TrainingOptions(engine="torch", precision="pure-bf16")
    workload = Workload(micro_batch=1, seq_len=512)
    band = estimate(model, cluster, options, workload).per_gpu.band
    assert band.low < band.expected < band.high
    for capacity, verdict, fits in ((band.high, Verdict.FITS, True), (band.high - 1, Verdict.TIGHT, None),
                                    (band.expected, Verdict.TIGHT, None),
                                    (band.expected - 1, Verdict.DOES_NOT_FIT, False)):
        est = estimate(model, dataclasses.replace(cluster, gpu_memory_bytes=capacity), options, workload)
        assert (est.verdict, est.fits) == (verdict, fits), capacity


SETUPS = {
    "torch lora": TrainingOptions(engine="torch", precision="pure-bf16", lora=LoraOptions(rank=16)),
    "torch full": TrainingOptions(engine="torch", precision="amp-bf16"),
    "zero2 offload": TrainingOptions(engine="deepspeed", zero=2, offload_optimizer="cpu"),
    "zero3 offload": TrainingOptions(engine="deepspeed", zero=3, offload_optimizer="cpu", offload_param="cpu"),
}


@pytest.mark.parametrize("name", sorted(CATALOG.models))
def test_band_is_ordered_for_every_profile(name: str):
    """low <= expected <= high for both budgets, and allocated <= reserved <= nvidia-smi at each
    point of the GPU's band, for every built-in model under four engines on 2 GPUs."""
    model = build_model(CATALOG.model(name))
    cluster = make_cluster("2x3090", CATALOG, 512 * GIB)
    for setup, options in SETUPS.items():
        est = estimate(model, cluster, options, Workload(micro_batch=1, seq_len=256, images=0))
        for budget in (est.per_gpu, est.host):
            band = budget.band
            assert band.low <= band.expected == budget.total_bytes <= band.high, (setup, budget)
        f = est.gpu_figures
        assert f is not None and f.device == est.per_gpu.band, setup
        for point in ("low", "expected", "high"):
            assert getattr(f.allocated, point) <= getattr(f.reserved, point) <= getattr(f.device, point), setup
        assert f.allocated.low >= est.per_gpu.tensor_bytes, setup


def test_a_calibration_profile_replaces_only_what_it_measured():
    """Unmeasured fields keep the sourced defaults; a measured fragmentation keeps at least the
    published runs' spread above it; the source is named."""
    from planner.estimate.runtime import CALIBRATED_FRAGMENTATION_SPREAD, FRAGMENTATION, SOURCED
    from planner.profile.calibration import CalibrationProfile

    base = dict(gpu="rtx3090", measured="2026-12-05", torch_version="2.13.0", source="test")
    only_context = RuntimeModel.from_calibration(CalibrationProfile(**base, cuda_context_bytes=400 * MIB))
    assert only_context.cuda_context == Band(400 * MIB, 400 * MIB, 500 * MIB)
    assert only_context.fragmentation == FRAGMENTATION and only_context.cublas_workspace_bytes is None
    assert only_context.source == "memplan calibrate on rtx3090, 2026-12-05" != SOURCED
    short = RuntimeModel.from_calibration(CalibrationProfile(**base, fragmentation_expected=0.04,
                                                             fragmentation_high=0.08))
    assert short.fragmentation == (0.0, 0.04, pytest.approx(0.04 + CALIBRATED_FRAGMENTATION_SPREAD))
