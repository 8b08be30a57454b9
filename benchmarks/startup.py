"""Wall time of `memplan estimate` with the default model, cold process each time.

Usage: python benchmarks/startup.py [RUNS]. Prints the median and the worst of RUNS runs, and
checks that torch, transformers and deepspeed are never imported on the estimate path.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

ARGS = ["estimate", "--gpus", "2x3090", "--host-ram", "64GiB"]


def main(runs: int = 10) -> None:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "planner.cli", *ARGS], check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    probe = (f"import sys, runpy; sys.argv = ['memplan', *{ARGS!r}]\n"
             "try:\n    runpy.run_module('planner.cli', run_name='__main__')\nexcept SystemExit:\n    pass\n"
             "heavy = [m for m in ('torch', 'transformers', 'deepspeed') if m in sys.modules]\n"
             "print(','.join(heavy) or 'none')")
    heavy = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True).stdout.split()[-1]
    print(f"memplan {' '.join(ARGS)}: median {statistics.median(times):.3f} s, worst {max(times):.3f} s "
          f"over {runs} runs; heavy modules imported: {heavy}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10)
