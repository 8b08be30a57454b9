"""The step tape's ledger: live bytes by category, the allocator's granule, and the tensor records it counts.

Estimate stage; pure arithmetic (no torch, no I/O). Every storage is rounded up to the CUDA caching
allocator's block size; peaks are taken after every allocation, per phase, and the last of equal
peaks wins (as in the tracer). Categories follow torch's ``MemTracker``: ``activations`` (born in
forward or in a recomputation), ``temporaries`` (born in backward), ``gradients`` (parameter
``.grad``). The tape that drives it is ``planner.estimate.tape``.
"""

from __future__ import annotations

from dataclasses import dataclass

# --------------------------------------------------------------------------------------------
# Constants (each with where it comes from)
# --------------------------------------------------------------------------------------------

ALLOC_GRANULE_BYTES = 512
"""Every CUDA caching-allocator block is a multiple of 512 bytes (c10/cuda/CUDACachingAllocator.cpp
``kMinBlockSize``); torch 2.13 ``MemTracker`` rounds each storage the same way on cuda."""

FP32, HALF, INT64, BOOL = 4, 2, 8, 1
"""Element sizes in bytes: float32; bfloat16/float16; int64 ids and RNG state; bool masks."""

CATEGORIES = ("activations", "temporaries", "gradients")


def block_bytes(nbytes: int) -> int:
    """Bytes one storage of ``nbytes`` occupies (0 stays 0: empty tensors own no block)."""
    return 0 if nbytes <= 0 else -(-nbytes // ALLOC_GRANULE_BYTES) * ALLOC_GRANULE_BYTES


# --------------------------------------------------------------------------------------------
# The ledger
# --------------------------------------------------------------------------------------------


class Ledger:
    """Live bytes by category, with a reference count per storage and a peak per phase."""

    def __init__(self) -> None:
        self._size: dict[int, int] = {}
        self._cat: dict[int, str] = {}
        self._refs: dict[int, int] = {}
        self._next = 0
        self.now = dict.fromkeys(CATEGORIES, 0)
        self.total = 0
        self.phase = "forward"
        self.peaks: dict[str, tuple[int, dict[str, int]]] = {}

    def alloc(self, nbytes: int, cat: str) -> int | None:
        """A new storage of ``nbytes`` (rounded to the granule) with one reference; None (and no
        new peak) for an empty one."""
        size = block_bytes(nbytes)
        if size == 0:
            return None
        sid, self._next = self._next, self._next + 1
        self._size[sid], self._cat[sid], self._refs[sid] = size, cat, 1
        self.now[cat] += size
        self.total += size
        self.tick()
        return sid

    def ref(self, sid: int | None) -> None:
        if sid is not None:
            self._refs[sid] += 1

    def unref(self, sid: int | None) -> None:
        if sid is None:
            return
        self._refs[sid] -= 1
        if self._refs[sid] == 0:
            size = self._size.pop(sid)
            self.now[self._cat.pop(sid)] -= size
            self.total -= size
            del self._refs[sid]

    def retype(self, sid: int | None, cat: str) -> None:
        if sid is not None:
            self.now[self._cat[sid]] -= self._size[sid]
            self.now[cat] += self._size[sid]
            self._cat[sid] = cat

    def tick(self) -> None:
        """Record the current total as the phase peak if it is at least as large."""
        best = self.peaks.get(self.phase)
        if best is None or self.total >= best[0]:
            self.peaks[self.phase] = (self.total, dict(self.now))

    def peak(self, phase: str) -> dict[str, int]:
        """Bytes by category at ``phase``'s peak (zeros for a phase that never allocated)."""
        return self.peaks.get(phase, (0, dict.fromkeys(CATEGORIES, 0)))[1]


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class Param:
    """One parameter tensor (its bytes are model states, not on the ledger) and its ``.grad``."""

    name: str
    numel: int
    item: int
    trainable: bool
    grad: Tensor | None = None
    uses: int = 0  # autograd edges into its AccumulateGrad (2 for a tied embedding / lm_head)
    arrived: int = 0


@dataclass(eq=False)
class Tensor:
    """A tensor: elements, element size, requires-grad, its storage on the ledger (``None`` for
    parameters and tensors that own no bytes) and, for a parameter, its record."""

    numel: int
    item: int
    rg: bool
    st: int | None = None
    param: Param | None = None

    @property
    def nbytes(self) -> int:
        return self.numel * self.item
