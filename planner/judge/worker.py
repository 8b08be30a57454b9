"""The trace worker: ``python -m planner.judge.worker``, spawned by planner.judge.trace for every trace.
Reads requests (JSON) on stdin, prepares the fake CUDA device before importing torch, runs each
step and writes progress and result lines on stdout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict

from planner.judge.patches import _enable_fake_cuda
from planner.judge.protocol import _PROGRESS, _RESULT, TraceRequest
from planner.judge.trace import _run_trace


def _worker() -> int:
    data = json.loads(sys.stdin.read())
    reqs = [TraceRequest.from_json(json.dumps(d)) for d in (data if isinstance(data, list) else [data])]
    req = reqs[0]

    def say(msg: str) -> None:
        sys.stdout.write(_PROGRESS + msg.replace("\n", " ") + "\n")
        sys.stdout.flush()

    notes: list[str] = []
    dev = req.device
    if dev == "cuda":
        say("preparing fake CUDA device")
        try:
            note = _enable_fake_cuda()
            if note:
                notes.append(note)
        except (OSError, subprocess.SubprocessError) as exc:
            dev = "cpu"
            notes.append(f"fake CUDA impossible ({exc}); traced on cpu: CPU autocast lists, CPU sdpa, "
                         "no 512-byte rounding")
    say("importing torch and transformers")
    import transformers  # noqa: F401  (import before the trace so it is not timed)

    for one in reqs:
        result = _run_trace(one, dev, list(notes), say)
        sys.stdout.write(_RESULT + json.dumps(asdict(result)) + "\n")
        sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: with fake CUDA the autograd engine's device threads sometimes
    # abort the process at exit (std::terminate, exit status 134) after the work is done.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(_worker())
