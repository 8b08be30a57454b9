"""Launch: a plan folder -> the command that runs it; run it, keep a record, and step down to the
next safer plan when the run dies of out-of-memory.

Last stage of the flow (plan -> writers -> **launch**). Commands are argv lists, never shell
strings: user values (paths, extra flags) are single words whatever they contain. Each attempt is
recorded under ``PLAN_DIR/attempts/NN/``: the configs it ran with, the command, the exit status,
the failure recognised, the peak memory the run reported, the time, and its output.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from planner.architectures import ProfileError
from planner.plan import Plan
from planner.writers import FILES
from planner.writers.formats import NotExpressible, minicpm_flags
from planner.writers.scripts import launcher_argv

RETRY_HEADROOM = 0.10
"""After an out-of-memory failure the next plan must need at least this fraction of the broken
budget's capacity less than the plan that failed (2.4 GiB on a 24 GiB GPU). The estimate missed
by an unknown amount; a tenth is more than the allocator slack and fragmentation spikes it does
not model (docs/runtime.md), and small enough that one step rarely gives up more than needed."""

OUTPUT_TAIL_LINES = 400
"""Lines of a run's output kept in memory to recognise how it failed."""

PEAK_RE = re.compile(r"memplan-train: (.*)$")


class Target(StrEnum):
    """Which trainer runs the plan."""

    BUILTIN = "builtin"  # memplan train (planner.train): HF Trainer
    MINICPM = "minicpm"  # MiniCPM-o / MiniCPM-V finetune.py
    LLAMAFACTORY = "llamafactory"  # llamafactory-cli train


class Failure(StrEnum):
    """How a run ended, as far as memory goes."""

    GPU_OOM = "gpu"
    HOST_OOM = "host"
    OTHER = "other"


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


@dataclass(frozen=True)
class Command:
    """What to run: argv, the environment it adds, and where."""

    argv: list[str]
    env: dict[str, str]
    cwd: Path

    def as_json(self) -> dict:
        """The command as recorded."""
        return {"argv": self.argv, "env": self.env, "cwd": str(self.cwd)}


def command(plan_dir: Path, plan: Plan, target: Target, script: Path | None = None, hostfile: Path | None = None,
            data: str | None = None, extra: Sequence[str] = ()) -> Command:
    """The command that runs ``plan`` from ``plan_dir`` with ``target``.

    Raises:
        ProfileError: the target cannot run this plan, or needs something missing (the MiniCPM
            script, a hostfile for several nodes, the LLaMA-Factory YAML).
    """
    plan_dir = plan_dir.resolve()
    env: dict[str, str] = {}
    if plan.options.offload_optimizer.value != "none":
        # torchrun sets OMP_NUM_THREADS=1 for several ranks; CPU Adam wants its share of the cores.
        env["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS",
                                                str(max(1, (os.cpu_count() or 1) // plan.cluster.gpus_per_node)))
    if plan.cluster.nodes > 1:
        hostfile = hostfile or plan_dir / "hostfile"
        if not hostfile.is_file():
            raise ProfileError(f"{plan.cluster.nodes} nodes: no hostfile at {hostfile} (--hostfile)")
    hf = str(hostfile.resolve()) if hostfile else "hostfile"
    if target is Target.BUILTIN:
        program = ["planner.train", str(plan_dir), "--data", data or plan.trainer.data_path, *extra]
        return Command(launcher_argv(plan, program, hf, module=True), env, Path.cwd())
    if target is Target.MINICPM:
        if script is None:
            raise ProfileError("--target minicpm needs --script PATH (MiniCPM-o's finetune/finetune.py)")
        if not script.is_file():
            raise ProfileError(f"--script {script}: no such file")
        try:
            flags = minicpm_flags(plan)
        except NotExpressible as exc:
            raise ProfileError(f"--target minicpm: {exc}") from None
        flags[flags.index("--deepspeed") + 1] = str(plan_dir / "ds_config.json")
        if data:
            flags[flags.index("--data_path") + 1] = data
        # finetune.py imports its own dataset.py and trainer.py: run it from its folder
        return Command(launcher_argv(plan, [str(script.resolve()), *flags, *extra], hf), env, script.resolve().parent)
    yaml_path = plan_dir / "llamafactory.yaml"
    if not yaml_path.is_file():
        reason = plan.skipped.get("llamafactory.yaml", "no llamafactory.yaml in the plan folder")
        raise ProfileError(f"--target llamafactory: {reason}")
    env |= {"FORCE_TORCHRUN": "1", "NNODES": str(plan.cluster.nodes), "NPROC_PER_NODE": str(plan.cluster.gpus_per_node)}
    if plan.cluster.nodes > 1:  # LLaMA-Factory runs torchrun on each node; this is the local node's command
        env |= {k: os.environ[k] for k in ("NODE_RANK", "MASTER_ADDR", "MASTER_PORT") if k in os.environ}
    argv = ["llamafactory-cli", "train", str(yaml_path), *extra]
    if data:
        argv += [f"dataset_dir={Path(data).parent}", f"dataset={Path(data).stem}"]
    return Command(argv, env, plan_dir)


@dataclass
class Attempt:
    """One run of the plan, as recorded in ``attempts/NN/result.json``."""

    number: int
    candidate: str
    returncode: int = 0
    failure: str | None = None
    seconds: float = 0.0
    started: str = ""
    reported: dict[str, str] = field(default_factory=dict)
    """What the run printed on its ``memplan-train:`` line (peak memory, steps, loss)."""
    changed: str | None = None
    """What the next attempt changes, and why."""


def run_streaming(cmd: Command, log: Path, echo: Callable[[str], None]) -> tuple[int, str]:
    """Run ``cmd``, passing its output through line by line and into ``log``; return the exit
    status and the last lines of output."""
    tail: deque[str] = deque(maxlen=OUTPUT_TAIL_LINES)
    env = os.environ | cmd.env
    with open(log, "w", encoding="utf-8") as fh:
        try:
            proc = subprocess.Popen(cmd.argv, cwd=cmd.cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, errors="replace", bufsize=1)
        except FileNotFoundError:
            raise ProfileError(f"{cmd.argv[0]}: not found on PATH") from None
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                fh.write(line)
                tail.append(line)
                echo(line.rstrip("\n"))
            returncode = proc.wait()
        except KeyboardInterrupt:
            proc.send_signal(signal.SIGINT)
            proc.wait()
            raise
    return returncode, "".join(tail)


def _record_dir(plan_dir: Path) -> Path:
    root = plan_dir / "attempts"
    root.mkdir(exist_ok=True)
    numbers = [int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit()]
    out = root / f"{max(numbers, default=0) + 1:02d}"
    out.mkdir()
    return out


def launch(plan_dir: Path, target: Target, *, script: Path | None = None, hostfile: Path | None = None,
           data: str | None = None, extra: Sequence[str] = (), max_retries: int = 2,
           step_down: Callable[[Plan, Failure], tuple[Plan, str] | None] | None = None,
           echo: Callable[[str], None] = print) -> list[Attempt]:
    """Run the plan in ``plan_dir``; after an out-of-memory failure write the next safer plan
    over the folder's configs (the old ones are kept with their attempt) and run again, at most
    ``max_retries`` times. Checkpoints in the trainer's output folder are never touched.

    Args:
        plan_dir: a folder written by `memplan tune`.
        target: the trainer.
        script, hostfile, data, extra: see `command`.
        max_retries: relaunches after out-of-memory failures.
        step_down: the next plan after a failure and what it changes, or None when there is no
            safer plan (default: `recovery.step_down`).
        echo: where the run's output and memplan's messages go.

    Returns:
        Every attempt, the last one deciding the exit status.
    """
    if step_down is None:
        from planner.recovery import step_down
    attempts: list[Attempt] = []
    while True:
        plan = Plan.read(plan_dir / "plan.json")
        cmd = command(plan_dir, plan, target, script, hostfile, data, extra)
        record = _record_dir(plan_dir)
        for name in FILES:
            if (plan_dir / name).is_file():
                shutil.copy2(plan_dir / name, record / name)
        (record / "command.json").write_text(json.dumps(cmd.as_json(), indent=2) + "\n")
        attempt = Attempt(number=int(record.name), candidate=plan.candidate,
                          started=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        echo(f"memplan: attempt {attempt.number}: {plan.candidate}")
        start = time.perf_counter()
        returncode, tail = run_streaming(cmd, record / "output.log", echo)
        attempt.seconds = round(time.perf_counter() - start, 3)
        attempt.returncode = returncode
        failure = classify(returncode, tail)
        attempt.failure = failure.value if failure else None
        for line in tail.splitlines():
            m = PEAK_RE.search(line)
            if m:
                attempt.reported = dict(kv.split("=", 1) for kv in m.group(1).split() if "=" in kv)
        attempts.append(attempt)
        retry = failure in (Failure.GPU_OOM, Failure.HOST_OOM) and len(attempts) <= max_retries
        nxt = step_down(plan, failure) if retry else None
        if nxt is not None:
            attempt.changed = nxt[1]
        (record / "result.json").write_text(json.dumps(attempt.__dict__, indent=2) + "\n")
        if failure in (Failure.GPU_OOM, Failure.HOST_OOM):
            where = "GPU memory" if failure is Failure.GPU_OOM else "host RAM"
            if not retry:
                echo(f"memplan: attempt {attempt.number} ran out of {where}; no retries left (--max-retries)")
            elif nxt is None:
                echo(f"memplan: attempt {attempt.number} ran out of {where}; no safer plan fits")
        if nxt is None:
            return attempts
        from planner.writers import write_plan_folder

        write_plan_folder(nxt[0], plan_dir, force=True)
        echo(f"memplan: attempt {attempt.number} ran out of "
             f"{'GPU memory' if failure is Failure.GPU_OOM else 'host RAM'}; next: {nxt[1]}")


def exit_status(attempts: Sequence[Attempt]) -> int:
    """The exit status to return: the last attempt's (128 + signal for a killed run)."""
    code = attempts[-1].returncode if attempts else 1
    return 128 - code if code < 0 else code


def dry_run(cmd: Command, echo: Callable[[str], None] = print) -> None:
    """Print the exact command: where it runs, what it adds to the environment, its argv."""
    echo(f"cwd: {cmd.cwd}")
    for k, v in cmd.env.items():
        echo(f"env: {k}={v}")
    echo(f"argv: {json.dumps(cmd.argv)}")
