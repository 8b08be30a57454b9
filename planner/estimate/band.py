"""A figure that is not exact (low, expected, high), the verdict it gives against a capacity, and
the three figures a user meets for one GPU.

Estimate stage; no dependencies. `planner.estimate.result` re-exports these types; the runtime
model (`planner.estimate.runtime`) fills them; docs/runtime.md says what each end counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Verdict(StrEnum):
    """What an estimate says about fitting, from each budget's band (`Band`):

    * ``FITS``: the high end of every budget is within its capacity;
    * ``TIGHT``: the expected figure is within capacity, the high end is not (the allocator's
      fragmentation, the workspaces or data-dependent parts may or may not push it over);
    * ``DOES NOT FIT``: the expected figure of a budget is over its capacity;
    * ``UNKNOWN``: nothing is over at the expected figure on the modelled part, but the ledger
      leaves something out (`Estimate.unmodeled`), so the figures are lower bounds.
    """

    FITS = "FITS"
    TIGHT = "TIGHT"
    DOES_NOT_FIT = "DOES NOT FIT"
    UNKNOWN = "UNKNOWN"


@dataclass(frozen=True, slots=True)
class Band:
    """A figure that is not exact: its low, expected and high value, bytes.

    ``low`` counts what is certain (tensor bytes, fixed runtime pieces at their least, no
    fragmentation); ``expected`` the calibrated middle; ``high`` the upper ends of everything that
    is not exact (docs/runtime.md).
    """

    low: int
    expected: int
    high: int

    def __post_init__(self) -> None:
        if not self.low <= self.expected <= self.high:
            raise ValueError(f"a band must be ordered, got {self.low} <= {self.expected} <= {self.high}")

    @classmethod
    def exact(cls, nbytes: int) -> Band:
        """A figure known exactly."""
        return cls(nbytes, nbytes, nbytes)

    def __add__(self, other: Band) -> Band:
        return Band(self.low + other.low, self.expected + other.expected, self.high + other.high)

    def shift(self, nbytes: int) -> Band:
        """The band moved by ``nbytes`` at all three points."""
        return Band(self.low + nbytes, self.expected + nbytes, self.high + nbytes)

    def scale(self, factor: int) -> Band:
        """The band times ``factor`` (ranks on a node)."""
        return Band(self.low * factor, self.expected * factor, self.high * factor)

    def verdict(self, capacity: int) -> Verdict:
        """FITS, TIGHT or DOES NOT FIT against ``capacity`` bytes (never UNKNOWN: that is about
        what is modelled, not about the band)."""
        if self.expected > capacity:
            return Verdict.DOES_NOT_FIT
        return Verdict.FITS if self.high <= capacity else Verdict.TIGHT


@dataclass(frozen=True, slots=True)
class GpuFigures:
    """The three figures a user meets for one GPU, each as a band, bytes.

    Attributes:
        allocated: ``torch.cuda.max_memory_allocated()``: the tensors' blocks at the peak plus the
            library workspaces PyTorch's allocator hands out (cuBLAS).
        reserved: ``torch.cuda.max_memory_reserved()``: the segments the caching allocator holds,
            allocated plus what it cached and could not reuse (fragmentation).
        device: what ``nvidia-smi`` shows for the process: reserved plus the CUDA context (driver,
            kernels) and NCCL's buffers, which PyTorch's allocator never sees. The GPU budget.
    """

    allocated: Band
    reserved: Band
    device: Band
