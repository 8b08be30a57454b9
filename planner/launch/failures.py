"""Failures: how a run ended, as far as memory goes, read from its exit status and last output.

Part of the launch stage, below the run loop (`runner`) and `recovery`, which both use it: the
out-of-memory messages of torch, CUDA, NCCL, the host allocator and the kernel's OOM killer, and how
much safer the next plan must be.
"""

from __future__ import annotations

import re
import signal
from enum import StrEnum

RETRY_HEADROOM = 0.10
"""After an out-of-memory failure the next plan must need at least this fraction of the broken
budget's capacity less than the plan that failed (2.4 GiB on a 24 GiB GPU). The estimate missed
by an unknown amount; a tenth is more than the allocator slack and fragmentation spikes it does
not model (docs/runtime.md), and small enough that one step rarely gives up more than needed."""


class Failure(StrEnum):
    """How a run ended, as far as memory goes."""

    GPU_OOM = "gpu"
    HOST_OOM = "host"
    OTHER = "other"
    INTERRUPTED = "interrupted"  # Ctrl-C: recorded, never retried


# (pattern, budget): messages of real out-of-memory failures, as the libraries print them.
OOM_PATTERNS: tuple[tuple[re.Pattern[str], Failure], ...] = tuple(
    (re.compile(p), f)
    for p, f in (
        # torch's caching allocator: "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate ..."
        (r"CUDA out of memory", Failure.GPU_OOM),
        (r"torch\.(cuda\.)?OutOfMemoryError", Failure.GPU_OOM),
        # cuBLAS / CUDA runtime / NCCL allocation failures inside kernels and collectives
        (r"CUBLAS_STATUS_ALLOC_FAILED", Failure.GPU_OOM),
        (r"CUDA error: out of memory", Failure.GPU_OOM),
        (r"cudaErrorMemoryAllocation", Failure.GPU_OOM),
        (r"NCCL (WARN|error).*(Cuda failure 'out of memory'|out of memory)", Failure.GPU_OOM),
        # host side: torch's CPU allocator, pinned buffers (DeepSpeed offload), C++ and errno ENOMEM
        (r"DefaultCPUAllocator: (can't|not enough memory)", Failure.HOST_OOM),
        (r"CUDA error: (OS call failed|out of memory).*cudaHostAlloc", Failure.HOST_OOM),
        (r"std::bad_alloc", Failure.HOST_OOM),
        (r"\[Errno 12\] Cannot allocate memory", Failure.HOST_OOM),
        (r"MemoryError", Failure.HOST_OOM),
        # the kernel's OOM killer: SIGKILL, as torchrun and the DeepSpeed launcher report a child's death
        (r"Signal 9 \(SIGKILL\) received by PID", Failure.HOST_OOM),
        (r"exitcode\s*:\s*-9\b", Failure.HOST_OOM),
        (r"exits with return code = -9\b", Failure.HOST_OOM),
    )
)


def classify(returncode: int, output: str) -> Failure | None:
    """None for success; which budget broke for an out-of-memory failure; OTHER otherwise.

    A process killed by SIGKILL (exit status 137 from a shell, -9 from Python) with no other
    message is the kernel's OOM killer in practice: nothing else in a training run sends it.
    """
    if returncode == 0:
        return None
    for pattern, failure in OOM_PATTERNS:
        if pattern.search(output):
            return failure
    if returncode in (137, -signal.SIGKILL):
        return Failure.HOST_OOM
    return Failure.OTHER
