"""``memplan calibrate``: a short matrix of real training steps on this machine's GPU, each beside
memplan's estimate, and this machine's constants fitted and stored as a calibration profile that
estimate, tune and explain read. ``--show`` prints stored profiles (no GPU needed). The edge of the
flow; imports torch only when it runs on a GPU.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from planner.cli.common import UserError, json_text, profiles_dir_option, user_errors
from planner.errors import ProfileError
from planner.units import GIB, format_bytes

CALIBRATE_EPILOG = """\b
Examples:
  memplan calibrate                 # about a minute on one GPU; writes ~/.config/memplan/calibration/<gpu>.toml
  memplan calibrate --gpu rtx3090   # when the driver's name matches no profile
  memplan calibrate --show          # the stored profiles (no GPU needed)
  MEMPLAN_CONFIG_DIR=/tmp/m memplan calibrate --json
"""


def open_device() -> Any:
    """The GPU the matrix runs on (`planner.judge.cuda_device.CudaDevice`), or a one-line refusal.

    The one test seam: tests replace this function (``monkeypatch.setattr(planner.cli.calibrate,
    "open_device", ...)``) with one returning a fake `planner.judge.calibrate.Device`, so the run,
    the fit, the profile written and the output are checked on a machine without a GPU.

    Raises:
        UserError: torch or transformers missing, no CUDA GPU, or no NVML.
    """
    from planner.errors import require_extra

    require_extra("memplan calibrate", "torch", "transformers")
    from planner.judge.cuda_device import CudaDevice, cuda_problem

    problem = cuda_problem()
    if problem:
        raise UserError(problem)
    return CudaDevice()


@click.command(epilog=CALIBRATE_EPILOG)
@click.option("--gpu", "gpu_name", default=None,
              help="The GPU profile to calibrate (default: the profile of the name the driver gives GPU 0).")
@click.option("--show", is_flag=True, help="Print the stored calibration profile(s) and exit; needs no GPU.")
@click.option("--json", "as_json", is_flag=True, help="Print the run (or the stored profiles) as JSON.")
@profiles_dir_option
@user_errors
def calibrate(gpu_name: str | None, show: bool, as_json: bool, profiles_dirs: tuple[Path, ...]) -> None:
    """Measure this machine's GPU: about 16 short training steps of small decoders built from
    their configs (random weights, nothing downloaded) in fp32, amp-bf16 and pure-bf16, eager and
    sdpa, 512 to 2048 tokens, with and without checkpointing, and one DeepSpeed ZeRO-3 step; each
    beside memplan's estimate. Fits the CUDA context, cuBLAS workspace, allocator fragmentation,
    achieved bf16 TFLOP/s and (with several GPUs) the link bandwidth, and writes them as a
    calibration profile that estimate, tune and explain then use for this GPU."""
    if show:
        _show(gpu_name, as_json)
        return
    from planner.judge.calibrate import run_calibration
    from planner.profile.calibration import save_calibration
    from planner.profile.catalog import load_catalog

    catalog = load_catalog(profiles_dirs)
    device = open_device()
    info = device.init()
    gpu = _gpu_profile(catalog, gpu_name, info.name)
    with _progress() as progress:
        run = run_calibration(device, info, gpu, progress=progress)
    path = save_calibration(run.profile)
    if as_json:
        click.echo(json_text({**run.as_json(), "path": str(path)}))
        return
    _print_run(run, path)


def _gpu_profile(catalog: Any, gpu_name: str | None, device_name: str) -> Any:
    """The GPU profile to calibrate: ``--gpu``, else the one the driver's device name matches."""
    try:
        return catalog.gpu(gpu_name if gpu_name is not None else device_name.replace(" ", "-"))
    except ProfileError as exc:
        how = "" if gpu_name is not None else " (name its profile with --gpu, or add one with --profiles-dir)"
        raise UserError(f"{exc}{how}") from None


@contextlib.contextmanager
def _progress() -> Iterator[Callable[[int, int, str], None]]:
    """Progress on stderr: a rich bar on a terminal, else one line per part."""
    if not sys.stderr.isatty():
        def line(done: int, total: int, what: str) -> None:
            click.echo(f"memplan calibrate: [{done}/{total}] {what}", err=True)

        yield line
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("calibrate"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.description}"), console=Console(stderr=True), transient=True)
    with bar:
        task = bar.add_task("", total=None)

        def update(done: int, total: int, what: str) -> None:
            bar.update(task, completed=done, total=total, description=what)

        yield update


def _cell(nbytes: int | None) -> str:
    return "-" if nbytes is None else f"{nbytes / GIB:.2f}"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def step_table(run: Any) -> Any:
    """Predicted vs measured per step, narrow enough for 80 columns: GiB (est: memplan's tensors at
    the peak; alloc: ``max_memory_allocated`` minus what was allocated before the step; resv:
    ``max_memory_reserved``; NVML: the driver's figure for the process), seconds per step (est s:
    memplan's speed model; s: measured, warm)."""
    from rich import box
    from rich.table import Table

    table = Table(title="per step, GiB: est = memplan's step tensors, alloc = measured", title_justify="left",
                  box=box.SIMPLE_HEAD, pad_edge=False)
    for name in ("step", "est", "alloc", "err", "resv", "NVML", "est s", "s"):
        table.add_column(name, justify="left" if name == "step" else "right", no_wrap=True)
    for s in run.steps:
        m = s.measured
        table.add_row(s.spec.label, _cell(s.predicted_tensor_bytes), _cell(m.step_tensor_bytes if m else None),
                      "-" if s.error is None else f"{s.error:+.1%}", _cell(m.reserved_peak_bytes if m else None),
                      _cell(m.nvml_used_bytes if m else None), _seconds(s.predicted_s),
                      "skip" if m is None else _seconds(m.step_s))
    return table


def profile_lines(profile: Any) -> list[str]:
    """The fitted constants, one line each with its unit; "not measured" where None."""

    def size(v: int | None) -> str:
        return "not measured" if v is None else format_bytes(v)

    frag = ("not measured" if profile.fragmentation_expected is None
            else f"+{profile.fragmentation_expected:.1%} expected, +{profile.fragmentation_high:.1%} high")
    return [
        f"CUDA context (beyond reserved)  {size(profile.cuda_context_bytes)}",
        f"cuBLAS workspace                {size(profile.cublas_workspace_bytes)}",
        f"allocator fragmentation         {frag}",
        "achieved bf16 matmul            " + ("not measured" if profile.achieved_bf16_tflops is None
                                              else f"{profile.achieved_bf16_tflops:.1f} TFLOP/s"),
        "link between GPUs               " + ("not measured (one GPU)" if profile.link_gbytes_per_s is None
                                              else f"{profile.link_gbytes_per_s:.1f} GB/s"),
        f"measured {profile.measured}",
        f"source: {profile.source}",
    ]


def _print_run(run: Any, path: Path) -> None:
    from planner.cli.render import console

    out = console()
    out.print(step_table(run))
    for s in run.steps:
        if s.skipped:
            out.print(f"skipped {s.spec.label}: {s.skipped}", markup=False)
    out.print(f"calibration of {run.gpu.name} ({run.info.count}x {run.info.name}):", markup=False)
    for line in profile_lines(run.profile):
        out.print(f"  {line}", markup=False)
    for note in run.notes:
        out.print(f"note: {note}", markup=False)
    out.print(f"written to {path}", markup=False)
    out.print(f"memplan estimate, tune and explain use it for {run.gpu.name}; delete the file to go back to "
              "the defaults", markup=False)


def _show(gpu_name: str | None, as_json: bool) -> None:
    """Print the stored profile of ``--gpu``, or every stored profile."""
    from planner.profile.calibration import CALIBRATION_SUBDIR, calibration_path, config_dir, load_calibration

    if gpu_name is not None:
        profile = load_calibration(gpu_name)
        if profile is None:
            raise UserError(f"no calibration profile for {gpu_name} ({calibration_path(gpu_name)}); "
                            "run memplan calibrate on that GPU")
        found = [(calibration_path(gpu_name), profile)]
    else:
        folder = config_dir() / CALIBRATION_SUBDIR
        names = sorted(p.stem for p in folder.glob("*.toml")) if folder.is_dir() else []
        found = [(calibration_path(n), load_calibration(n)) for n in names if _is_profile_name(n)]
    if as_json:
        click.echo(json_text([{"path": str(p), **prof.model_dump()} for p, prof in found if prof is not None]))
        return
    if not found:
        click.echo(f"no calibration profiles in {config_dir() / CALIBRATION_SUBDIR} (memplan calibrate writes them)")
    for path, profile in found:
        click.echo(f"{profile.gpu}: {path}")
        for line in profile_lines(profile):
            click.echo(f"  {line}")


def _is_profile_name(name: str) -> bool:
    from planner.profile.calibration import check_gpu_name

    try:
        check_gpu_name(name)
    except ValueError:
        return False
    return True
