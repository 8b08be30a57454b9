"""Runner: run a plan folder's command, keep a record of each attempt, and step down to the next
safer plan when the run dies of out-of-memory.

Last stage of the flow (plan -> writers -> **launch**): the run loop, above `command` (the argv),
`checks` (nothing starts until everything a run needs is checked), `failures` and `recovery`.
Each attempt is recorded under ``PLAN_DIR/attempts/NN/``: the configs it ran with, the command,
the exit status, the failure recognised, the peak memory the run reported, the time, its output,
and why the loop stopped.
"""
from __future__ import annotations

import itertools
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
from pathlib import Path

from planner.errors import ProfileError
from planner.launch import recovery
from planner.launch.checks import read_plan, readiness, record_problem
from planner.launch.command import Command, Target, command
from planner.launch.failures import Failure, classify
from planner.plan import Plan
from planner.writers import FILES

OUTPUT_TAIL_LINES = 400
"""Lines of a run's output kept in memory to recognise how it failed."""

PEAK_RE = re.compile(r"memplan-train: (.*)$")

INTERRUPTED = 128 + signal.SIGINT
"""The exit status recorded for an attempt stopped with Ctrl-C (128 + SIGINT, as shells say)."""


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
    stopped: str | None = None
    """Why no attempt follows a failed one: no retries left, no safer plan, or why re-planning
    or starting the next attempt failed."""


def run_streaming(cmd: Command, log: Path, echo: Callable[[str], None]) -> tuple[int, str]:
    """Run ``cmd``, passing its output through line by line and into ``log``; return the exit
    status and the last lines of output.

    Raises:
        ProfileError: the program cannot be started (not found, not executable).
    """
    tail: deque[str] = deque(maxlen=OUTPUT_TAIL_LINES)
    env = os.environ | cmd.env
    try:
        fh = open(log, "w", encoding="utf-8")  # noqa: SIM115  (closed by the with below)
    except OSError as exc:
        raise ProfileError(f"{log}: cannot write: {exc.strerror or exc}") from None
    with fh:
        try:
            proc = subprocess.Popen(cmd.argv, cwd=cmd.cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, errors="replace", bufsize=1)
        except FileNotFoundError as exc:
            missing = cmd.argv[0] if exc.filename in (None, cmd.argv[0]) else exc.filename
            raise ProfileError(f"{missing}: not found" + (" on PATH" if missing == cmd.argv[0] else "")) from None
        except OSError as exc:
            raise ProfileError(f"{cmd.argv[0]}: cannot start: {exc.strerror or exc}") from None
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


def _new_record(plan_dir: Path, cmd: Command) -> Path:
    """``PLAN_DIR/attempts/NN/`` with the configs the attempt runs with and its command.

    Raises:
        ProfileError: the record cannot be written (the folder is read-only, ``attempts`` is a
            file, the disk is full).
    """
    problem = record_problem(plan_dir)
    if problem:
        raise ProfileError(problem)
    root = plan_dir / "attempts"
    try:
        root.mkdir(exist_ok=True)
        taken = [int(n) for n in os.listdir(root) if n.isascii() and n.isdigit()]
        for number in itertools.count(max(taken, default=0) + 1):
            record = root / f"{number:02d}"
            try:
                record.mkdir()
                break
            except FileExistsError:  # another launch took it meanwhile
                continue
        for name in FILES:
            if (plan_dir / name).is_file():
                shutil.copy2(plan_dir / name, record / name)
        (record / "command.json").write_text(json.dumps(cmd.as_json(), indent=2) + "\n")
    except OSError as exc:
        raise ProfileError(f"{root}: cannot record the attempt: {exc.strerror or exc}") from None
    return record


def _write_result(record: Path, attempt: Attempt, echo: Callable[[str], None]) -> None:
    try:
        (record / "result.json").write_text(json.dumps(attempt.__dict__, indent=2) + "\n")
    except OSError as exc:  # the run's exit status still decides; say the record is short
        echo(f"memplan: cannot write {record / 'result.json'}: {exc.strerror or exc}")


def _start(plan_dir: Path, target: Target, script: Path | None, hostfile: Path | None, data: str | None,
           extra: Sequence[str]) -> tuple[Plan, Command, Path]:
    """The plan, its command and its new record, everything checked; nothing runs yet.

    Raises:
        ProfileError: the first thing that would stop the run.
    """
    plan = read_plan(plan_dir)
    cmd = command(plan_dir, plan, target, script, hostfile, data, extra)
    problems = readiness(plan_dir, plan, target, cmd, hostfile, data)
    if problems:
        raise ProfileError(problems[0])
    return plan, cmd, _new_record(plan_dir, cmd)


def _rewrite(plan: Plan, plan_dir: Path) -> None:
    """Write the next plan over the folder's configs, keeping the user's hostfile (edited from the
    template, it is the user's file, which the writer rightly refuses to replace)."""
    from planner.writers import write_plan_folder

    kept, aside = plan_dir / "hostfile", plan_dir / ".hostfile.memplan-kept"
    moved = False
    try:
        if kept.is_file() and not kept.is_symlink():
            os.replace(kept, aside)
            moved = True
        write_plan_folder(plan, plan_dir, force=True)
    except OSError as exc:
        raise ProfileError(f"{plan_dir}: cannot write the next plan: {exc.strerror or exc}") from None
    finally:
        if moved:
            os.replace(aside, kept)


def launch(plan_dir: Path, target: Target, *, script: Path | None = None, hostfile: Path | None = None,
           data: str | None = None, extra: Sequence[str] = (), max_retries: int = 2,
           step_down: Callable[[Plan, Failure], tuple[Plan, str] | None] | None = None,
           echo: Callable[[str], None] = print) -> list[Attempt]:
    """Run the plan in ``plan_dir``; after an out-of-memory failure write the next safer plan
    over the folder's configs (the old ones are kept with their attempt) and run again, at most
    ``max_retries`` times. Checkpoints in the trainer's output folder are never touched. Every
    attempt that started gets its ``result.json``, also when re-planning fails.

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

    Raises:
        ProfileError: the first attempt cannot start (see `readiness`); nothing was run.
    """
    if step_down is None:
        step_down = recovery.step_down
    attempts: list[Attempt] = []
    record: Path | None = None
    while True:
        try:
            plan, cmd, next_record = _start(plan_dir, target, script, hostfile, data, extra)
        except ProfileError as exc:
            if record is None:
                raise
            attempts[-1].stopped = f"attempt {attempts[-1].number + 1} could not start: {exc}"
            echo(f"memplan: {attempts[-1].stopped}")
            _write_result(record, attempts[-1], echo)
            return attempts
        record = next_record
        attempt = Attempt(number=int(record.name), candidate=plan.candidate,
                          started=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        attempts.append(attempt)
        echo(f"memplan: attempt {attempt.number}: {plan.candidate}")
        begun = time.perf_counter()
        try:
            returncode, tail = run_streaming(cmd, record / "output.log", echo)
        except (KeyboardInterrupt, ProfileError, OSError) as exc:  # recorded, then passed on
            interrupted = isinstance(exc, KeyboardInterrupt)
            attempt.seconds = round(time.perf_counter() - begun, 3)
            attempt.returncode = INTERRUPTED if interrupted else 127
            attempt.failure = (Failure.INTERRUPTED if interrupted else Failure.OTHER).value
            attempt.stopped = "interrupted" if interrupted else f"could not run: {exc}"
            _write_result(record, attempt, echo)
            if isinstance(exc, OSError):  # writing output.log (a full disk)
                raise ProfileError(f"{record / 'output.log'}: {exc.strerror or exc}") from None
            raise
        attempt.seconds = round(time.perf_counter() - begun, 3)
        attempt.returncode = returncode
        failure = classify(returncode, tail)
        attempt.failure = failure.value if failure else None
        for line in tail.splitlines():
            m = PEAK_RE.search(line)
            if m:
                attempt.reported = dict(kv.split("=", 1) for kv in m.group(1).split() if "=" in kv)
        _after(plan, plan_dir, attempt, failure, len(attempts) <= max_retries, step_down, echo)
        _write_result(record, attempt, echo)
        if attempt.changed is None:
            return attempts


def _after(plan: Plan, plan_dir: Path, attempt: Attempt, failure: Failure | None, retry_left: bool,
           step_down: Callable[[Plan, Failure], tuple[Plan, str] | None], echo: Callable[[str], None]) -> None:
    """After an attempt: for an out-of-memory failure, write the next plan and set ``changed``;
    otherwise (or when there is none) set ``stopped`` and say why."""
    if failure not in (Failure.GPU_OOM, Failure.HOST_OOM):
        return
    where = "GPU memory" if failure is Failure.GPU_OOM else "host RAM"
    if not retry_left:
        attempt.stopped = "no retries left (--max-retries)"
    else:
        try:
            nxt = step_down(plan, failure)
            if nxt is None:
                attempt.stopped = "no safer plan fits"
            else:
                _rewrite(nxt[0], plan_dir)
                attempt.changed = nxt[1]
        except ProfileError as exc:
            attempt.stopped = f"re-planning failed: {exc}"
    if attempt.changed:
        echo(f"memplan: attempt {attempt.number} ran out of {where}; next: {attempt.changed}")
    else:
        echo(f"memplan: attempt {attempt.number} ran out of {where}; {attempt.stopped}")


def exit_status(attempts: Sequence[Attempt]) -> int:
    """The exit status to return: the last attempt's (128 + signal for a killed run)."""
    code = attempts[-1].returncode if attempts else 1
    return 128 - code if code < 0 else code
