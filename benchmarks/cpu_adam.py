"""Throughput of DeepSpeed's CPU Adam (``DeepSpeedCPUAdam``) on this machine, per thread count.

What ZeRO-Offload runs on the host each optimizer step: ``optimizer.step()`` over the rank's fp32
master partition, its fp32 gradient and two fp32 Adam states (``adamw_mode=True``, as the engine
builds it for ``"AdamW"`` with ``offload_optimizer``). ``planner.speed.step_time.CPU_ADAM_ELEMENTS_PER_S_PER_CORE``
is set from this measurement (docs/speed.md).

Two sizes, because one Adam step streams 28 bytes per element (reads parameter, gradient and
both states, writes parameter and both states; ``CPU_ADAM_BYTES_PER_ELEMENT``): a partition that
fits in the last-level cache shows the compute rate of a core, a large one the host memory's
bandwidth, which all ranks of a node share.

Usage: ``DS_ACCELERATOR=cpu python benchmarks/cpu_adam.py [MILLION_ELEMENTS ...]`` (default
``10 50``; 10 M elements are 160 MB of state, 50 M are 800 MB). The first run JIT-builds
DeepSpeed's ``cpu_adam`` op (1-2 minutes on two cores; cached in ~/.cache/torch_extensions).
Prints, per size and thread count, the median and best seconds of one step (of 7) and, from the
best (the machine may be shared), elements per second in all and per thread and the memory
traffic that implies.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def measure(numel: int, threads: int, repeats: int) -> tuple[float, float]:
    """(median, best) seconds of one ``DeepSpeedCPUAdam.step()`` over ``numel`` fp32 elements."""
    import torch
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    torch.set_num_threads(threads)  # also the OpenMP team size the op's ``omp parallel for`` uses
    param = torch.nn.Parameter(torch.randn(numel, dtype=torch.float32))
    param.grad = torch.randn(numel, dtype=torch.float32) * 1e-3
    opt = DeepSpeedCPUAdam([param], lr=1e-4, weight_decay=0.0, adamw_mode=True)
    opt.step()  # creates exp_avg / exp_avg_sq (first touch) outside the timed steps
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - start)
    del opt, param
    return statistics.median(times), min(times)


BYTES_PER_ELEMENT = 28  # fp32: read p, g, m, v (16 B), write p, m, v (12 B)


def main(sizes_million: list[float], repeats: int = 7) -> None:
    import platform

    import torch

    cores = os.cpu_count() or 1
    print(f"DeepSpeedCPUAdam (adamw_mode), fp32, median of {repeats} steps; torch {torch.__version__}, "
          f"{cores} CPUs, {platform.processor() or platform.machine()}")
    for million in sizes_million:
        numel = int(million * 1e6)
        for threads in sorted({1, cores}):
            median, best = measure(numel, threads, repeats)
            rate = numel / best
            print(f"{numel / 1e6:6.0f} M elements, threads={threads}: median {median:.4f} s/step, best "
                  f"{best:.4f} s: {rate / 1e6:7.1f} M elements/s, {rate / threads / 1e6:7.1f} M/s per thread, "
                  f"{rate * BYTES_PER_ELEMENT / 1e9:5.1f} GB/s of memory traffic")


if __name__ == "__main__":
    main([float(a) for a in sys.argv[1:]] or [10, 50])
