"""``memplan launch`` (run a plan folder, step down on out-of-memory) and ``memplan train`` (the
built-in trainer), and the launch options ``memplan tune --launch`` shares. The edge of the flow.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import click

from planner.cli.common import PassThroughCommand, UserError, user_errors

LAUNCH_EPILOG = """\b
Examples:
  memplan launch memplan-plan --data train.json
  memplan launch memplan-plan --target minicpm --script ~/MiniCPM-o/finetune/finetune.py --dry-run
  memplan launch memplan-plan --max-retries 3 -- --max_steps 100 --logging_steps 5
"""


TARGET_OPTION = click.option(
    "--target", type=click.Choice(["builtin", "minicpm", "llamafactory"]), default="builtin", show_default=True,
    help="Trainer: memplan train, MiniCPM's finetune.py, or llamafactory-cli.")


def launch_options(fn: Callable) -> Callable:
    """The options `memplan launch` and `memplan tune --launch` share (besides --target)."""
    for decorator in reversed((
        click.option("--script", type=click.Path(path_type=Path), default=None,
                     help="MiniCPM-o's finetune/finetune.py (--target minicpm)."),
        click.option("--hostfile", type=click.Path(path_type=Path), default=None,
                     help="DeepSpeed hostfile for several nodes. [default: PLAN_DIR/hostfile]"),
        click.option("--max-retries", type=click.IntRange(min=0, max=10), default=2, show_default=True,
                     help="Relaunches with a safer plan after out-of-memory failures."),
        click.option("--dry-run", is_flag=True, help="Print the exact command (argv) and run nothing."),
        click.argument("extra", nargs=-1, type=click.UNPROCESSED),
    )):
        fn = decorator(fn)
    return fn


def run_plan(out_dir: Path, target: str, script: Path | None, hostfile: Path | None, data: str | None,
             max_retries: int, dry_run: bool, extra: tuple[str, ...]) -> int:
    """Launch (or print) the plan in ``out_dir``; the exit status to return: the last run's.

    Everything a run needs is checked before anything starts (`launch.checks.readiness`); a real launch
    stops at the first problem, a dry run prints the command and warns of each.
    """
    from planner.errors import ProfileError
    from planner.launch.checks import read_plan, readiness
    from planner.launch.command import Target, command
    from planner.launch.command import dry_run as print_command
    from planner.launch.runner import exit_status, launch

    try:
        if dry_run:
            plan = read_plan(out_dir)
            cmd = command(out_dir, plan, Target(target), script, hostfile, data, extra)
            for problem in readiness(out_dir, plan, Target(target), cmd, hostfile, data):
                click.echo(f"memplan: warning: a launch would stop here: {problem}", err=True)
            print_command(cmd, click.echo)
            return 0
        attempts = launch(out_dir, Target(target), script=script, hostfile=hostfile, data=data, extra=extra,
                          max_retries=max_retries, echo=lambda line: click.echo(line))
    except ProfileError as exc:
        raise UserError(str(exc)) from None
    return exit_status(attempts)


@click.command(cls=PassThroughCommand, epilog=LAUNCH_EPILOG)
@click.argument("plan_dir", type=click.Path(path_type=Path, file_okay=False))
@click.option("--data", default=None, help="Training data. [default: the plan's]")
@TARGET_OPTION
@launch_options
@user_errors
def launch(plan_dir: Path, data: str | None, target: str, script: Path | None, hostfile: Path | None,
           max_retries: int, dry_run: bool, extra: tuple[str, ...]) -> None:
    """Run a plan folder through torchrun / DeepSpeed's launcher, streaming its output; after an
    out-of-memory failure write the next safer plan and run again. EXTRA (after --) goes to the
    trainer. Exits with the run's status."""
    sys.exit(run_plan(plan_dir, target, script, hostfile, data, max_retries, dry_run, extra))


@click.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                 "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def train(args: tuple[str, ...]) -> None:
    """The built-in trainer: HF Trainer on a plan folder (run it under torchrun; see
    `memplan train --help`)."""
    from planner.errors import require_extra

    try:
        require_extra("memplan train", "torch", "transformers")
    except ValueError as exc:
        raise UserError(str(exc)) from None
    from planner.train.run import main as train_main

    sys.exit(train_main(list(args)))
