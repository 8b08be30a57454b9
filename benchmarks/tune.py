"""Wall time of the tune search over the whole default space, cold process each time.

Usage: python benchmarks/tune.py [RUNS]. For MiniCPM-o 2.6 on 2x RTX 3090 (the reference
request) with 64 GiB and 256 GiB of host RAM, each run starts a fresh Python (so nothing is
remembered between runs) and times `planner.search.search.search` alone, then the fixes, then the whole
`memplan tune` command (imports, search, fixes, files). Prints the median and the worst of RUNS.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time

PROBE = """
import time
t0 = time.perf_counter()
from planner.workload.reference import REFERENCE_GROUPS
from planner.profile.hardware import make_cluster
from planner.profile.catalog import build_model, load_catalog
from planner.search.fixes import fixes
from planner.search.search import search
from planner.search.space import Constraints, Request, SearchSpace
from planner.units import GIB
catalog = load_catalog(())
model = build_model(catalog.model("minicpm-o-2.6"))
cluster = make_cluster("2x3090", catalog, {host} * GIB)
request = Request(seq_len=1024, images=1, max_slice_nums=1, **REFERENCE_GROUPS)
t1 = time.perf_counter()
result = search(model, cluster, request)
t2 = time.perf_counter()
fixes(model, cluster, request, Constraints(), SearchSpace(), result)
t3 = time.perf_counter()
print(t2 - t1, t3 - t2, result.evaluated, len(result.candidates), result.chosen.name)
"""


def main(runs: int = 5) -> None:
    for host in (64, 256):
        searches, fixes, commands = [], [], []
        for _ in range(runs):
            out = subprocess.run([sys.executable, "-c", PROBE.format(host=host)], check=True, capture_output=True,
                                 text=True).stdout.split()
            searches.append(float(out[0]))
            fixes.append(float(out[1]))
            evaluated, fitting, chosen = out[2], out[3], " ".join(out[4:])
            with tempfile.TemporaryDirectory() as tmp:
                start = time.perf_counter()
                subprocess.run([sys.executable, "-m", "planner.cli", "tune", "--gpus", "2x3090", "--host-ram",
                                f"{host}GiB", "--out", f"{tmp}/plan", "--json"], check=True, capture_output=True)
                commands.append(time.perf_counter() - start)
        print(f"host {host} GiB: search median {statistics.median(searches):.2f} s (worst {max(searches):.2f}), "
              f"{evaluated} estimates, {fitting} fit; fixes median {statistics.median(fixes):.2f} s; "
              f"whole `memplan tune` median {statistics.median(commands):.2f} s (worst {max(commands):.2f}); "
              f"chosen: {chosen}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
