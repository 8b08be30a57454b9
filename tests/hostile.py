"""The hostile-input harness: run one memplan command in a sandbox folder and check that it is
refused as a user would want: the exit status, exactly one line on stderr in memplan's form, no
traceback, within a time limit, and no file outside the plan folder created, changed or removed.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from click.testing import CliRunner

from planner.cli import main

ERROR_LINE = re.compile(r"^memplan: error: \S.*$")


class Hang(Exception):
    """The command ran past its time limit."""


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise Hang in the main thread after ``seconds`` (SIGALRM; POSIX)."""

    def on_alarm(signum: int, frame: object) -> None:
        raise Hang(f"no answer within {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def snapshot(root: Path, skip: Path | None = None) -> dict[str, str]:
    """Every file and folder under ``root`` (except under ``skip``) -> a digest of its content."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if skip is not None and (here == skip or skip in here.parents):
            dirnames[:] = []
            continue
        for d in dirnames:
            out[str((here / d).relative_to(root)) + "/"] = "dir"
        for f in filenames:
            path = here / f
            if path.is_fifo() or not path.is_file():
                out[str(path.relative_to(root))] = "special"
                continue
            h = hashlib.sha256()
            with open(path, "rb") as fh:
                h.update(fh.read(1 << 20))  # the first MiB and the size tell a change here
            out[str(path.relative_to(root))] = f"{h.hexdigest()}:{path.stat().st_size}:{path.stat().st_mode:o}"
    return out


@dataclass
class Outcome:
    exit_code: int
    stdout: str
    stderr: str


def run_cli(args: list[str], cwd: Path, seconds: float = 30, env: dict[str, str] | None = None) -> Outcome:
    """Run ``memplan ARGS`` in-process from ``cwd`` and return what a user would see."""
    runner = CliRunner()
    old = Path.cwd()
    os.chdir(cwd)
    try:
        with time_limit(seconds):
            result = runner.invoke(main, args, catch_exceptions=True, env=env)
    finally:
        os.chdir(old)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"memplan {args!r} raised {result.exception!r}") from result.exception
    return Outcome(result.exit_code, result.stdout, result.stderr)


def assert_refused(args: list[str], cwd: Path, match: str, code: int = 2, plan_dir: Path | None = None,
                   seconds: float = 30, env: dict[str, str] | None = None) -> Outcome:
    """``memplan ARGS`` is refused: exit ``code``, one ``memplan: error:`` line on stderr matching
    ``match`` (a regex), nothing else there, and no file under ``cwd`` (outside ``plan_dir``) changed."""
    before = snapshot(cwd, plan_dir)
    outcome = run_cli(args, cwd, seconds, env)
    after = snapshot(cwd, plan_dir)
    lines = outcome.stderr.splitlines()
    assert outcome.exit_code == code, (outcome.exit_code, outcome.stderr, outcome.stdout[-2000:])
    assert len(lines) == 1 and ERROR_LINE.match(lines[0]), outcome.stderr
    assert "Traceback" not in outcome.stderr + outcome.stdout
    assert re.search(match, lines[0]), (match, lines[0])
    assert before == after, f"files changed: {sorted(set(before.items()) ^ set(after.items()))}"
    return outcome
