"""What the commands share: user errors as one line, option parsers, the model and cluster they
plan for, and the reference request. The edge of the flow, with `cli`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import click
from pydantic import ValidationError

from planner.errors import ProfileError
from planner.units import parse_size
from planner.workload.options import LORA_DROPOUT


class UserError(click.ClickException):
    """A mistake in what the user asked for: one line, exit code 2."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        error_line(self.format_message())


def one_line(text: str, limit: int = 300) -> str:
    """Text as one printable line: newlines and control characters escaped, long text cut."""
    line = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)
    return line if len(line) <= limit else line[: limit - 3] + "..."


def error_line(message: str) -> None:
    """The one form a user error takes: ``memplan: error: ...`` as one line on stderr."""
    click.echo(f"memplan: error: {one_line(message, 2000)}", err=True)


def user_errors(fn: Callable) -> Callable:
    """Turn the library's input errors into UserError, so no traceback reaches the user."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ProfileError as exc:
            raise UserError(str(exc)) from None
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = ".".join(str(p) for p in err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            raise UserError(f"{loc}: {msg}" if loc else msg) from None

    return wrapper


def parse_size_arg(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    """A memory size with its unit (``64GiB``, ``64GB``); a bare number is refused, and so is zero
    (a budget of nothing) except where zero means "none" (``--nvme 0``)."""
    if value is None:
        return None
    try:
        size = parse_size(value, require_unit=value.strip() not in ("0",))
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    if size == 0 and param.name not in ZERO_MEANS_NONE:
        raise click.BadParameter("must be more than 0 bytes")
    return size


ZERO_MEANS_NONE = frozenset({"nvme"})
"""Size options for which 0 is a meaningful answer ("no NVMe")."""


class FiniteFloat(click.FloatRange):
    """A float range that also refuses ``inf`` and ``nan`` (which Python's float() accepts and JSON
    cannot carry)."""

    name = "float"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number




def parse_out_dir(ctx: click.Context, param: click.Parameter, value: str | None) -> Path | None:
    """``--out``: a folder path. The empty string, which would silently mean the current folder, is
    refused; ``.`` spelled out is the user's choice."""
    if value is None:
        return None
    if value.strip() == "":
        raise click.BadParameter("needs a folder name (use . for the current folder)")
    if "\x00" in value:
        raise click.BadParameter("a path cannot contain a NUL byte")
    return Path(value)


def json_text(doc: Any) -> str:
    """Strict JSON for ``--json`` output: no NaN or Infinity, which other parsers refuse."""
    return json.dumps(doc, indent=2, allow_nan=False)


class PassThroughCommand(click.Command):
    """A command whose arguments after ``--`` go unparsed to the program it runs (the ``extra``
    parameter), while every option before ``--`` is checked, so a typo (``--gpu``) is an error
    with "did you mean", never a trainer flag."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        tail: list[str] = []
        if "--" in args:
            cut = args.index("--")
            args, tail = args[:cut], args[cut + 1:]
        rest = super().parse_args(ctx, args)
        ctx.params["extra"] = tuple(ctx.params.get("extra") or ()) + tuple(tail)
        return rest


def parse_image_size(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    parts = value.lower().replace(" ", "").split("x")
    if len(parts) != 2 or not all(p.isascii() and p.isdigit() and len(p) < 10 and int(p) > 0 for p in parts):
        raise click.BadParameter(f"{value!r} is not WIDTHxHEIGHT in pixels, e.g. 1344x1344")
    width, height = int(parts[0]), int(parts[1])
    from planner.workload.inventory import MAX_IMAGE_SIDE

    if max(width, height) > MAX_IMAGE_SIDE:
        raise click.BadParameter(f"{value!r}: a side over {MAX_IMAGE_SIDE} pixels")
    return width, height


def parse_names(ctx: click.Context, param: click.Parameter,
                value: tuple[str, ...] | str | None) -> tuple[str, ...] | None:
    """Comma-separated and/or repeated names -> a tuple; None when not given."""
    if value is None or value == ():
        return None
    values = (value,) if isinstance(value, str) else value
    return tuple(n.strip() for v in values for n in v.split(",") if n.strip())


def _profile_paths(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> tuple[Path, ...]:
    for value in values:
        if value.strip() == "" or "\x00" in value:
            raise click.BadParameter(f"{value!r} is not a path (empty, or with a NUL byte)")
    return tuple(Path(v) for v in values)


profiles_dir_option = click.option(
    "--profiles-dir",
    "profiles_dirs",
    multiple=True,
    callback=_profile_paths,
    help="Extra folder (or file) of GPU/model profiles; repeatable. Also $MEMPLAN_PROFILES.",
)


trust_remote_code_option = click.option(
    "--trust-remote-code",
    is_flag=True,
    help="A local model whose config.json names its own code (auto_map) may run the .py files in its "
    "folder to be built on the meta device (as transformers' trust_remote_code=True); never fetched.",
)


lora_dropout_option = click.option(
    "--lora-dropout",
    type=FiniteFloat(min=0, max=1, max_open=True),
    default=LORA_DROPOUT,
    show_default=True,
    help="peft lora_dropout of the adapters. Above 0 each adapter keeps a dropped copy of its input and a "
    "mask for backward (the value itself changes no byte); 0 is peft's default. The default is MiniCPM-o's "
    "and LitGPT's, and what tune's plans write.",
)


def lora_dropout_note(ctx: click.Context, lora: Any) -> str | None:
    """A note when LoRA runs with the default ``--lora-dropout`` the user did not state: the
    estimate assumes dropout on (it never says FITS for less than a run with dropout needs)."""
    if lora is None or ctx.get_parameter_source("lora_dropout") is not click.core.ParameterSource.DEFAULT:
        return None
    return (f"LoRA dropout {lora.dropout:g} assumed (each adapter keeps its dropped input and mask); "
            "--lora-dropout 0 if the run uses none (peft's default)")


def make_cluster_noted(gpus: str | None, catalog: Any, host_ram: int | None, notes: list[str]) -> Any:
    from planner.profile.hardware import make_cluster
    from planner.workload.reference import DEFAULT_GPUS

    if gpus is not None:
        cluster = make_cluster(gpus, catalog, host_ram)
    else:
        try:
            cluster = make_cluster("auto", catalog, host_ram)
        except ProfileError:
            cluster = make_cluster(DEFAULT_GPUS, catalog, host_ram)
            notes.insert(0, f"no NVIDIA GPU detected: planning for {DEFAULT_GPUS} (--gpus to choose)")
    if cluster.note:
        notes.append(cluster.note)
    return cluster


def runtime_model(cluster: Any) -> Any:
    """The runtime constants for the cluster's GPU (`estimate.runtime.RuntimeModel`): what
    ``memplan calibrate`` measured on it when the user's config folder holds a calibration profile
    for that GPU (``calibration/<gpu>.toml``), else the sourced defaults. The estimate names which.

    Raises:
        ProfileError: a calibration file that is there but broken (one line naming it).
    """
    from planner.estimate.runtime import RuntimeModel
    from planner.profile.calibration import load_calibration

    profile = load_calibration(cluster.gpu.name)
    return RuntimeModel() if profile is None else RuntimeModel.from_calibration(profile)
