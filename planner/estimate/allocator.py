"""PyTorch's caching allocators as rules: how a request becomes a block, which pool it goes to,
which segment the driver is asked for, and what pinned host memory really takes.

Estimate stage; pure arithmetic (no torch, no I/O). Each rule is the source's, cited by function
name in ``c10/cuda/CUDACachingAllocator.cpp`` (PyTorch, read at commit 001074d; the constants are
unchanged since 1.x) and ``aten/src/ATen/core/CachingHostAllocator.h``. What the rules cannot give
(how many cached free blocks a run leaves unused at its peak) is a calibrated fraction, in
`planner.estimate.runtime`. docs/runtime.md explains how the pieces add up.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum

from planner.estimate.ledger import ALLOC_GRANULE_BYTES, block_bytes
from planner.units import MIB, ceil_div

K_MIN_BLOCK_SIZE = ALLOC_GRANULE_BYTES
"""``kMinBlockSize = 512``: "all sizes are rounded to at least 512 bytes" (bytes)."""
K_SMALL_SIZE = 1 * MIB
"""``kSmallSize = 1048576``: "largest 'small' allocation is 1 MiB" (bytes)."""
K_SMALL_BUFFER = 2 * MIB
"""``kSmallBuffer = 2097152``: "'small' allocations are packed in 2 MiB blocks" (bytes)."""
K_LARGE_BUFFER = 20 * MIB
"""``kLargeBuffer = 20971520``: "'large' allocations may be packed in 20 MiB blocks" (bytes)."""
K_MIN_LARGE_ALLOC = 10 * MIB
"""``kMinLargeAlloc = 10485760``: "allocations between 1 and 10 MiB may use kLargeBuffer" (bytes)."""
K_ROUND_LARGE = 2 * MIB
"""``kRoundLarge = 2097152``: "round up large allocations to 2 MiB" (bytes)."""


class Pool(StrEnum):
    """The two pools of the device allocator: blocks of one never serve requests of the other."""

    SMALL = "small"
    LARGE = "large"


def block_size(nbytes: int) -> int:
    """The block a request of ``nbytes`` gets, bytes (``round_size``: at least 512, then a multiple
    of 512; ``roundup_power2_divisions`` unset, the default). ``max_memory_allocated`` counts
    blocks, not requests. A request of 0 bytes gets no block."""
    if nbytes <= 0:
        return 0
    return max(block_bytes(nbytes), K_MIN_BLOCK_SIZE)


def pool(nbytes: int) -> Pool:
    """The pool a request goes to (``get_pool``: blocks of at most 1 MiB are small)."""
    return Pool.SMALL if block_size(nbytes) <= K_SMALL_SIZE else Pool.LARGE


def segment_size(nbytes: int) -> int:
    """What ``cudaMalloc`` is asked for when no cached block fits a request, bytes
    (``get_allocation_size``): a 2 MiB segment for a small block, a 20 MiB one for a block under
    10 MiB, else the block rounded up to 2 MiB."""
    size = block_size(nbytes)
    if size == 0:
        return 0
    if size <= K_SMALL_SIZE:
        return K_SMALL_BUFFER
    if size < K_MIN_LARGE_ALLOC:
        return K_LARGE_BUFFER
    return ceil_div(size, K_ROUND_LARGE) * K_ROUND_LARGE


def splits(free_block: int, request: int) -> bool:
    """Whether a cached free block of ``free_block`` bytes is split to serve ``request``
    (``should_split``, ``max_split_size`` unset): a small block when at least 512 bytes remain, a
    large one when more than 1 MiB remains. Unsplit, the whole block is allocated (and counted
    by ``max_memory_allocated``)."""
    size = block_size(request)
    remaining = free_block - size
    if pool(request) is Pool.SMALL:
        return remaining >= K_MIN_BLOCK_SIZE
    return remaining > K_SMALL_SIZE


def expandable_page(pool_: Pool) -> int:
    """The granule an expandable segment grows by (``expandable_segments:True``; Note [Expandable
    Segments]: "we use 2MiB pages for our small pool and 20MiB pages for our large pool"), bytes."""
    return K_SMALL_BUFFER if pool_ is Pool.SMALL else K_LARGE_BUFFER


def reserved_floor(blocks: Iterable[int], expandable: bool = False) -> int:
    """The least memory the allocator must reserve to hold these live blocks at once, bytes.

    Small blocks share 2 MiB segments; a large block needs its own segment or a part of a larger
    one, so the large pool holds at least their sum rounded up to the 2 MiB rounding (classic
    segments) or to the 20 MiB page (expandable segments). Real runs reserve more: segments freed
    blocks leave behind (fragmentation), which no rule gives.

    Args:
        blocks: the sizes of the live requests, bytes.
        expandable: ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True``.
    """
    small = large = 0
    for nbytes in blocks:
        if pool(nbytes) is Pool.SMALL:
            small += block_size(nbytes)
        else:
            large += block_size(nbytes)
    small_unit = K_SMALL_BUFFER
    large_unit = expandable_page(Pool.LARGE) if expandable else K_ROUND_LARGE
    return ceil_div(small, small_unit) * small_unit + ceil_div(large, large_unit) * large_unit


def pinned_block_size(nbytes: int) -> int:
    """Host bytes a pinned tensor of ``nbytes`` really takes (``CachingHostAllocatorImpl::
    allocate``: "Round up the allocation to the nearest power of two to improve reuse", then
    ``cudaHostAlloc`` of that size; ``tensor.pin_memory()`` and DeepSpeed's
    ``accelerator.pin_memory`` both go through it). Page-locked: all of it is resident."""
    if nbytes <= 0:
        return 0
    return 1 << (nbytes - 1).bit_length()
