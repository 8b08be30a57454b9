"""A fake `planner.judge.calibrate.Device` with deterministic numbers, for testing `memplan
calibrate` on a machine without a GPU. Its formulas are the known answers the tests check the fit
against (each step is numbered from 0 in the order it runs, the warm-up step included)."""

from __future__ import annotations

from dataclasses import dataclass, field

from planner.judge.calibrate import DeviceInfo, StepFailed, StepSpec

MIB = 2**20
GIB = 2**30

WORKSPACE = 32 * MIB
"""What the first matmul allocates (and keeps)."""
WORKSPACE_SEGMENT = 40 * MIB
"""What it reserves for it: the fit takes the allocated jump."""
CONTEXT_INIT = 300 * MIB
CONTEXT_BASE = 400 * MIB
"""NVML sees the process hold this plus the step's number in MiB beyond the reserved memory."""
NCCL_EXTRA = 2 * GIB
"""Further memory NVML sees during a ZeRO-3 step (NCCL's buffers): the fit must leave it out."""
TFLOPS = 71.5
LINK = 12.5


def step_tensor_bytes(n: int) -> int:
    """The n-th step allocates (n + 1) x 100 MiB at its peak."""
    return (n + 1) * 100 * MIB


def fragmentation(n: int) -> float:
    """reserved / allocated - 1 of the n-th step: 0, 2, 4, 6, 8 %, repeating."""
    return 0.02 * (n % 5)


@dataclass
class FakeDevice:
    """One (or ``count``) RTX 3090 with memory that follows the formulas above."""

    count: int = 1
    name: str = "NVIDIA GeForce RTX 3090"
    free_bytes: int = 23 * GIB
    fail: frozenset[str] = frozenset()
    """Labels of steps that run out of memory."""
    calls: list[str] = field(default_factory=list)
    steps_run: list[StepSpec] = field(default_factory=list)
    _alloc_peak: int = 0
    _reserved_peak: int = 0
    _reserved_now: int = 0
    _beyond: int = 0
    _allocated: int = 0

    def init(self) -> DeviceInfo:
        self.calls.append("init")
        return DeviceInfo(name=self.name, count=self.count, memory_bytes=24 * GIB, free_bytes=self.free_bytes,
                          torch_version="2.13.0+cu128", cuda_version="12.8", context_init_bytes=CONTEXT_INIT)

    def first_matmul(self) -> tuple[int, int]:
        self.calls.append("first_matmul")
        self._allocated = WORKSPACE
        return WORKSPACE, WORKSPACE_SEGMENT

    def release(self) -> None:
        self.calls.append("release")
        self._reserved_now = self._allocated

    def reset_peaks(self) -> None:
        self.calls.append("reset_peaks")
        self._alloc_peak = self._reserved_peak = self._allocated

    def allocated_now(self) -> int:
        return self._allocated

    def allocated_peak(self) -> int:
        return self._alloc_peak

    def reserved_now(self) -> int:
        return self._reserved_now

    def reserved_peak(self) -> int:
        return self._reserved_peak

    def nvml_used(self) -> int | None:
        return self._reserved_now + self._beyond

    def run_step(self, spec: StepSpec) -> float:
        self.calls.append(f"run_step {spec.label}")
        n = len(self.steps_run)
        self.steps_run.append(spec)
        if spec.label in self.fail:
            raise StepFailed("out of memory")
        self._alloc_peak = self._allocated + step_tensor_bytes(n)
        self._reserved_peak = round(self._alloc_peak * (1 + fragmentation(n)))
        self._reserved_now = self._reserved_peak
        self._beyond = CONTEXT_BASE + n * MIB + (NCCL_EXTRA if spec.zero3 else 0)
        return 0.01 * (n + 1)

    def matmul_tflops(self) -> float | None:
        self.calls.append("matmul_tflops")
        return TFLOPS

    def link_gbytes_per_s(self) -> float | None:
        self.calls.append("link")
        return LINK if self.count > 1 else None
