"""``memplan trace``: a real training step traced on fake CUDA tensors beside the estimate. The edge of
the flow; imports torch only when it runs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import click

from planner.cli.common import (
    FiniteFloat,
    UserError,
    json_text,
    parse_names,
    profiles_dir_option,
    user_errors,
)
from planner.profile.load import load_model
from planner.workload.options import Precision

TRACE_EPILOG = """\b
Examples:
  memplan trace --model qwen2.5-0.5b --seq-len 512
  memplan trace --model qwen2.5-7b --seq-len 1024 --precision amp-bf16 --grad-ckpt --json
  memplan trace --model minicpm-o-2.6 --freeze llm.embed_tokens   # traces its Qwen2 LLM
"""


@click.command(epilog=TRACE_EPILOG)
@click.option("--model", default="qwen2.5-0.5b", show_default=True, help="Profile name, hub id or local config.json.")
@click.option("--precision", type=click.Choice([p.value for p in Precision]), default=Precision.AMP_BF16.value,
              show_default=True)
@click.option("--optimizer", type=click.Choice(["adamw-forloop", "adamw-foreach", "adamw-fused", "adafactor", "sgd"]),
              default="adamw-fused", show_default=True)
@click.option("--grad-ckpt/--no-grad-ckpt", default=False, show_default=True)
@click.option("--attn", type=click.Choice(["eager", "sdpa"]), default="sdpa", show_default=True)
@click.option("--freeze", multiple=True, callback=parse_names,
              help="Freeze these parts of the LLM (e.g. llm.embed_tokens).")
@click.option("--micro-batch", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--seq-len", type=click.IntRange(min=2), default=512, show_default=True)
@click.option("--timeout", "timeout_s", type=FiniteFloat(min=1), default=1800, show_default=True,
              help="Seconds before the trace is stopped.")
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON.")
@profiles_dir_option
@user_errors
def trace(model: str, precision: str, optimizer: str, grad_ckpt: bool, attn: str, freeze: tuple[str, ...] | None,
          micro_batch: int, seq_len: int, timeout_s: float, as_json: bool, profiles_dirs: tuple[Path, ...]) -> None:
    """Run a real training step of the model's LLM on fake CUDA tensors (no weights, no GPU) under
    torch's MemTracker, and print what it measured next to memplan's estimate for the same step
    (plain PyTorch, one GPU)."""
    from planner.errors import require_extra

    require_extra("memplan trace", "torch", "transformers")
    from planner.judge.compare import compare_trace
    from planner.judge.protocol import TraceError
    from planner.profile.catalog import load_catalog

    catalog = load_catalog(profiles_dirs)
    spec = load_model(model, catalog)
    try:
        report = compare_trace(
            spec, catalog, precision=precision, optimizer=optimizer, grad_ckpt=grad_ckpt, attn=attn,
            freeze=freeze or (), micro_batch=micro_batch, seq_len=seq_len, timeout_s=timeout_s,
            progress=None if as_json else _progress_printer(),
        )
    except TraceError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        why = lines[0] if lines else type(exc).__name__
        if len(lines) > 1:
            why += f" ... {lines[-1]}"  # the worker's last word (its error), not its whole stderr
        if "killed after" in why:
            raise UserError(f"trace stopped after --timeout {timeout_s:g} s; give it more with --timeout") from None
        raise UserError(f"trace failed: {why}") from None
    from planner.cli import render

    if as_json:
        click.echo(json_text(report.as_json()))
    else:
        render.console().print(render.trace_view(report))


def _progress_printer() -> Callable[[str], None]:
    from planner.cli.render import console

    out = console()

    def show(message: str) -> None:
        out.print(f"[dim]trace: {message}[/dim]")

    return show


