"""The ``memplan`` group: the one error boundary, and the registry of commands, each imported only
when it runs (so ``memplan estimate`` never imports what ``memplan trace`` needs). The edge of the flow.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from planner.cli.common import (
    error_line,
    one_line,
)
from planner.errors import ProfileError

COMMANDS = {
    "estimate": "planner.cli.estimate:estimate",
    "tune": "planner.cli.tune:tune",
    "explain": "planner.cli.explain:explain",
    "launch": "planner.cli.launch:launch",
    "train": "planner.cli.launch:train",
    "trace": "planner.cli.trace:trace",
    "profiles": "planner.cli.profiles:profiles",
    "calibrate": "planner.cli.calibrate:calibrate",
}
"""Command name -> ``module:object``; the registry, read only when a command is looked up."""


_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())
"""click 8.2+ raises this for a group called with nothing; older click prints the help itself."""

INTERNAL_ERROR_EXIT = 70
"""Exit status of an unexpected failure inside memplan (a bug): sysexits' EX_SOFTWARE."""

INTERRUPTED_EXIT = 130
"""Exit status after Ctrl-C: 128 + SIGINT, as shells report it."""

REPORT_HINT = "this is a bug in memplan: please report it with the command line (--debug shows the traceback)"


class _Group(click.Group):
    """The one error boundary: click's usage errors and the library's input errors as one line on
    stderr with exit code 2; anything unexpected as one line and a hint to report it (exit 70), its
    traceback only under ``--debug`` (or ``MEMPLAN_DEBUG=1``)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None:
            return None
        import importlib

        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        argv = list(args[0]) if args and args[0] is not None else sys.argv[1:]
        debug = _debug_requested(argv)
        try:
            return super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.Exit as exc:
            if standalone_mode:
                sys.exit(exc.exit_code)
            return exc.exit_code
        except _NO_ARGS_IS_HELP as exc:  # plain `memplan`: the help, as asked (click >= 8.2 raises it)
            click.echo(exc.ctx.get_help() if exc.ctx else "")
            sys.exit(0)
        except click.UsageError as exc:
            hint = f" (see: {exc.ctx.command_path} --help)" if exc.ctx else ""
            error_line(f"{exc.format_message()}{hint}")
            sys.exit(2)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except (click.Abort, KeyboardInterrupt):
            click.echo("memplan: interrupted", err=True)
            sys.exit(INTERRUPTED_EXIT)
        except ProfileError as exc:  # a library error that no command turned into a UserError
            error_line(str(exc))
            sys.exit(2)
        except SystemExit:
            raise
        except BrokenPipeError:  # memplan ... | head: the reader left; not an error of ours
            sys.exit(0)
        except MemoryError:
            error_line("out of memory while planning (an input far too large?)")
            sys.exit(2)
        except RecursionError:
            error_line("input nested too deeply to read")
            sys.exit(2)
        except Exception as exc:  # noqa: BLE001  the last resort: never a traceback without --debug
            if debug:
                raise
            error_line(f"internal error: {type(exc).__name__}: {one_line(str(exc))}; {REPORT_HINT}")
            sys.exit(INTERNAL_ERROR_EXIT)


def _debug_requested(argv: list[str]) -> bool:
    import os

    return "--debug" in argv or os.environ.get("MEMPLAN_DEBUG", "") not in ("", "0")



@click.group("memplan", cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="memplan")
@click.option("--debug", is_flag=True, help="Show the traceback of an unexpected error (or MEMPLAN_DEBUG=1).")
def main(debug: bool) -> None:
    """memplan: plan the memory of fine-tuning runs before they run out of it."""


