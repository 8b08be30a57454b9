"""``memplan profiles`` and ``memplan profiles validate``: the GPU and model profiles. The edge of the flow."""

from __future__ import annotations

from pathlib import Path

import click

from planner.cli.common import (
    UserError,
    profiles_dir_option,
    user_errors,
)
from planner.errors import ProfileError


@click.group(invoke_without_command=True)
@profiles_dir_option
@click.pass_context
@user_errors
def profiles(ctx: click.Context, profiles_dirs: tuple[Path, ...]) -> None:
    """List the GPU and model profiles (shipped and your own)."""
    if ctx.invoked_subcommand is not None:
        return
    from rich.table import Table

    from planner.cli.render import console, count
    from planner.profile.catalog import build_model, load_catalog

    catalog = load_catalog(profiles_dirs)
    for note in catalog.notes:
        click.echo(f"note: {note}", err=True)
    models = Table(title="models", title_justify="left")
    for col in ("name", "hub id", "params", "groups"):
        models.add_column(col, justify="right" if col == "params" else "left")
    for m in sorted(catalog.models.values(), key=lambda m: m.name):
        spec = build_model(m, check_counts=False)
        groups = ", ".join(f"{g.name} {count(g.params)}" for g in spec.groups)
        models.add_row(m.name, m.hf_id or "", count(spec.params), groups)
    gpus = Table(title="GPUs", title_justify="left")
    for col in ("name", "GPU", "memory", "bf16 TFLOP/s", "NVLink GB/s", "PCIe"):
        gpus.add_column(col)
    for g in sorted(catalog.gpus.values(), key=lambda g: (g.memory_mib, g.name)):
        gpus.add_row(
            g.name,
            g.full_name,
            f"{g.memory_mib} MiB",
            f"{g.bf16_tflops:g}" if g.bf16 else "no bf16",
            f"{g.nvlink_gbps:g}" if g.nvlink_gbps else "-",
            f"gen{g.pcie_gen} x{g.pcie_lanes}",
        )
    out = console()
    out.print(models)
    out.print(gpus)


@profiles.command("validate")
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
@user_errors
def validate(paths: tuple[Path, ...]) -> None:
    """Check profile files (default: the shipped ones): schema, and that every model's groups
    add up to their expected_params."""
    from planner.profile.catalog import build_model, builtin_profiles_dir, load_file, toml_files

    files = [f for p in (paths or (builtin_profiles_dir(),)) for f in toml_files(p)]
    if not files:
        raise UserError(f"no .toml files in {', '.join(map(str, paths))}")
    for path in files:
        pf = load_file(path)
        for m in pf.models:
            try:
                build_model(m)
            except ProfileError as exc:
                raise ProfileError(f"{path}: {exc}") from None
        click.echo(f"ok  {path}: {len(pf.gpus)} GPU(s), {len(pf.models)} model(s)")




