"""The ``memplan`` command line: parse, build objects, call one library function, render.

The edge of the flow. User errors become one-line messages with exit code 2; heavy imports
(torch, transformers) happen only when a command needs them.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from planner.cli.common import (
    DEFAULT_MODEL,
    REFERENCE_GROUPS,
    FiniteFloat,
    UserError,
    error_line,
    json_text,
    load_model,
    make_cluster_noted,
    one_line,
    parse_image_size,
    parse_names,
    parse_size_arg,
    profiles_dir_option,
    user_errors,
)
from planner.profile.architectures import ProfileError

INTERNAL_ERROR_EXIT = 70
"""Exit status of an unexpected failure inside memplan (a bug): sysexits' EX_SOFTWARE."""

INTERRUPTED_EXIT = 130
"""Exit status after Ctrl-C: 128 + SIGINT, as shells report it."""

REPORT_HINT = "this is a bug in memplan: please report it with the command line (--debug shows the traceback)"


class _Group(click.Group):
    """The one error boundary: click's usage errors and the library's input errors as one line on
    stderr with exit code 2; anything unexpected as one line and a hint to report it (exit 70), its
    traceback only under ``--debug`` (or ``MEMPLAN_DEBUG=1``)."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        argv = list(args[0]) if args and args[0] is not None else sys.argv[1:]
        debug = _debug_requested(argv)
        try:
            return super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.Exit as exc:
            if standalone_mode:
                sys.exit(exc.exit_code)
            return exc.exit_code
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



@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="memplan")
@click.option("--debug", is_flag=True, help="Show the traceback of an unexpected error (or MEMPLAN_DEBUG=1).")
def main(debug: bool) -> None:
    """memplan: plan the memory of fine-tuning runs before they run out of it."""


ESTIMATE_EPILOG = """\b
Examples:
  memplan estimate
  memplan estimate --model minicpm-o-2.6 --gpus 2x3090 --host-ram 64GiB \\
      --without apm,audio_projection_layer,tts --freeze vpm --offload-optimizer none
  memplan estimate --model qwen2.5-7b --gpus 4xa100-80g --engine torch --precision pure-bf16
  memplan estimate --model ./my-model/config.json --gpus 2x4090 --lora-rank 16 --json
"""


@main.command(epilog=ESTIMATE_EPILOG)
@click.option(
    "--model",
    default=None,
    help=f"Profile name, hub id or local config.json (or its folder). [default: {DEFAULT_MODEL}]",
)
@click.option(
    "--gpus",
    default=None,
    help="GPUS like 2x3090, 8xa100-80g, 2x8xh100 (nodes x GPUs per node), or auto. [default: auto, else 2x3090]",
)
@click.option("--host-ram", callback=parse_size_arg, help="Host RAM per node, e.g. 128GiB. [default: this machine's]")
@click.option("--engine", type=click.Choice(["torch", "deepspeed"]), default="deepspeed", show_default=True)
@click.option(
    "--zero", type=click.Choice(["0", "1", "2", "3"]), default="3", show_default=True, help="DeepSpeed ZeRO stage."
)
@click.option("--offload-optimizer", type=click.Choice(["none", "cpu", "nvme"]), default="cpu", show_default=True)
@click.option("--offload-param", type=click.Choice(["none", "cpu", "nvme"]), default="cpu", show_default=True)
@click.option(
    "--precision",
    type=click.Choice(["fp32", "amp-bf16", "amp-fp16", "pure-bf16"]),
    default="amp-bf16",
    show_default=True,
)
@click.option(
    "--optimizer",
    type=click.Choice(["adamw", "adamw-forloop", "adamw-foreach", "adamw-fused", "adamw-8bit", "adafactor", "sgd"]),
    default="adamw",
    show_default=True,
    help="adamw = the engine's default (torch: fused AdamW; DeepSpeed: FusedAdam, or CPU Adam when offloaded).",
)
@click.option(
    "--train",
    multiple=True,
    callback=parse_names,
    help="Train only these groups/parts (e.g. llm,resampler); the rest is frozen.",
)
@click.option(
    "--freeze", multiple=True, callback=parse_names, help="Freeze these groups/parts (e.g. vpm or llm.embed_tokens)."
)
@click.option(
    "--without", multiple=True, callback=parse_names, help="Groups the training script never builds (e.g. apm,tts)."
)
@click.option("--lora-rank", type=click.IntRange(min=1), default=None, help="Train LoRA adapters of this rank (peft).")
@click.option(
    "--lora-targets",
    multiple=True,
    callback=parse_names,
    help="Linear names to adapt [default: q_proj,k_proj,v_proj,o_proj]; all-linear for all.",
)
@click.option("--lora-groups", multiple=True, callback=parse_names, help="Groups that get adapters [default: the LLM].")
@click.option(
    "--micro-batch", type=click.IntRange(min=1), default=1, show_default=True, help="Samples per GPU per micro-step."
)
@click.option(
    "--grad-accum", type=click.IntRange(min=1), default=1, show_default=True, help="Micro-steps per optimizer step."
)
@click.option(
    "--seq-len", type=click.IntRange(min=1), default=1024, show_default=True, help="Tokens per sample (context length)."
)
@click.option("--grad-ckpt/--no-grad-ckpt", default=True, show_default=True, help="Activation checkpointing.")
@click.option("--attn", type=click.Choice(["eager", "sdpa", "flash_attention_2"]), default="sdpa", show_default=True,
              help="The LLM's attention implementation.")
@click.option("--images", type=click.IntRange(min=0), default=None,
              help="Images per sample. [default: 1 for models with a vision tower, else 0]")
@click.option("--image-size", callback=parse_image_size, help="WxH in pixels. [default: 1344x1344]")
@click.option("--max-slice-nums", type=click.IntRange(min=1), default=None,
              help="MiniCPM's slice cap per image. [default: 9; 1 for the reference setup]")
@click.option("--audio-seconds", type=FiniteFloat(min=0), default=0.0, show_default=True,
              help="Seconds of audio per sample.")
@click.option("--zero-init/--no-zero-init", default=True, show_default=True,
              help="ZeRO-3 builds the model under deepspeed.zero.Init (no rank holds it whole).")
@click.option("--json", "as_json", is_flag=True, help="Print the estimate as JSON.")
@profiles_dir_option
@user_errors
def estimate(
    model: str | None,
    gpus: str | None,
    host_ram: int | None,
    engine: str,
    zero: str,
    offload_optimizer: str,
    offload_param: str,
    precision: str,
    optimizer: str,
    train: tuple[str, ...] | None,
    freeze: tuple[str, ...] | None,
    without: tuple[str, ...] | None,
    lora_rank: int | None,
    lora_targets: tuple[str, ...] | None,
    lora_groups: tuple[str, ...] | None,
    micro_batch: int,
    grad_accum: int,
    seq_len: int,
    grad_ckpt: bool,
    attn: str,
    images: int | None,
    image_size: tuple[int, int] | None,
    max_slice_nums: int | None,
    audio_seconds: float,
    zero_init: bool,
    as_json: bool,
    profiles_dirs: tuple[Path, ...],
) -> None:
    """Estimate the memory of one training setup, per GPU and per host."""
    from planner.estimate import estimate as run_estimate
    from planner.profile.catalog import load_catalog
    from planner.workload.inventory import Workload
    from planner.workload.options import LoraOptions, TrainingOptions

    catalog = load_catalog(profiles_dirs)
    notes = list(catalog.notes)
    if model is None and train is None and freeze is None and without is None and lora_rank is None:
        without, freeze = REFERENCE_GROUPS["without"], REFERENCE_GROUPS["freeze"]
        max_slice_nums = 1 if max_slice_nums is None else max_slice_nums
        notes.append(
            f"no --model: planning the reference setup: {DEFAULT_MODEL} as its finetune.py builds it"
            " (without apm, audio_projection_layer, tts), vpm frozen, LLM and resampler trained,"
            " one image per sample cut into at most 1 slice"
        )
    spec = load_model(model or DEFAULT_MODEL, catalog)
    cluster = make_cluster_noted(gpus, catalog, host_ram, notes)
    ctx = click.get_current_context()
    if not cluster.gpu.bf16 and ctx.get_parameter_source("precision") is click.core.ParameterSource.DEFAULT:
        precision = "amp-fp16"  # the default amp-bf16 cannot run there; an explicit bf16 is refused
        notes.append(f"{cluster.gpu.full_name} has no bf16: planning amp-fp16 (--precision to choose)")
    if engine == "torch":  # the DeepSpeed defaults do not apply; explicit values are still checked
        default = click.core.ParameterSource.DEFAULT
        zero = "0" if ctx.get_parameter_source("zero") is default else zero
        if ctx.get_parameter_source("offload_optimizer") is default:
            offload_optimizer = "none"
        if ctx.get_parameter_source("offload_param") is default:
            offload_param = "none"
    lora = None
    if lora_rank is not None:
        lora = LoraOptions(
            rank=lora_rank, **({"targets": lora_targets} if lora_targets else {}), groups=lora_groups or ()
        )
    elif lora_targets or lora_groups:
        raise UserError("--lora-targets and --lora-groups need --lora-rank")
    options = TrainingOptions(
        engine=engine,
        zero=int(zero),
        offload_optimizer=offload_optimizer,
        offload_param=offload_param,
        precision=precision,
        optimizer=optimizer,
        train=train,
        freeze=freeze or (),
        without=without or (),
        lora=lora,
        grad_ckpt=grad_ckpt,
        attn=attn,
        zero_init=zero_init,
    )
    built = {g.name for g in spec.groups} - set(options.without)
    has_vision = any(g.kind == "siglip_vision" and g.name in built for g in spec.groups)
    has_audio = any(g.kind == "whisper_encoder" and g.name in built for g in spec.groups)
    if images is None:
        images = 1 if has_vision else 0
    if images and not has_vision:
        raise UserError(f"--images {images}: {spec.name} has no vision tower in this run")
    if audio_seconds and not has_audio:
        raise UserError(f"--audio-seconds: {spec.name} has no audio encoder in this run")
    workload = Workload(
        micro_batch=micro_batch,
        grad_accum=grad_accum,
        seq_len=seq_len,
        images=images,
        max_slice_nums=max_slice_nums or 9,
        audio_seconds=audio_seconds,
        **({"image_size": image_size} if image_size else {}),
    )
    est = run_estimate(spec, cluster, options, workload, notes=notes)
    from planner.cli import render

    title = f"{spec.name} on {cluster.label}, {_describe(options)}"
    if as_json:
        doc = render.estimate_json(
            est,
            {
                "model": spec.name,
                "gpus": cluster.label,
                "world_size": cluster.world_size,
                "options": json.loads(options.model_dump_json()),
                "workload": workload.model_dump(),
            },
        )
        click.echo(json_text(doc))
    else:
        render.console().print(render.estimate_view(est, title))


def _describe(options: Any) -> str:
    if options.engine.value == "torch":
        return f"torch, {options.precision.value}, {options.optimizer_impl.value}"
    off = []
    if options.offload_optimizer.value != "none":
        off.append(f"optimizer->{options.offload_optimizer.value}")
    if options.offload_param.value != "none":
        off.append(f"params->{options.offload_param.value}")
    return f"ZeRO-{int(options.zero)}" + (f" ({', '.join(off)})" if off else "") + f", {options.precision.value}"


@main.group(invoke_without_command=True)
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




TRACE_EPILOG = """\b
Examples:
  memplan trace --model qwen2.5-0.5b --seq-len 512
  memplan trace --model qwen2.5-7b --seq-len 1024 --precision amp-bf16 --grad-ckpt --json
  memplan trace --model minicpm-o-2.6 --freeze llm.embed_tokens   # traces its Qwen2 LLM
"""


@main.command(epilog=TRACE_EPILOG)
@click.option("--model", default="qwen2.5-0.5b", show_default=True, help="Profile name, hub id or local config.json.")
@click.option("--precision", type=click.Choice(["fp32", "amp-bf16", "amp-fp16", "pure-bf16"]), default="amp-bf16",
              show_default=True)
@click.option("--optimizer", type=click.Choice(["adamw-forloop", "adamw-foreach", "adamw-fused", "adafactor", "sgd"]),
              default="adamw-fused", show_default=True)
@click.option("--grad-ckpt/--no-grad-ckpt", default=False, show_default=True)
@click.option("--attn", type=click.Choice(["eager", "sdpa"]), default="sdpa", show_default=True)
@click.option("--freeze", multiple=True, callback=parse_names,
              help="Freeze these parts of the LLM (e.g. llm.embed_tokens).")
@click.option("--micro-batch", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--seq-len", type=click.IntRange(min=1), default=512, show_default=True)
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
    from planner.judge.compare import compare_trace
    from planner.judge.trace import TraceError
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


def _register() -> None:
    from planner.cli.explain import explain
    from planner.cli.tune import tune

    main.add_command(tune)
    main.add_command(explain)
    from planner.cli.launch import register

    register(main)


_register()

if __name__ == "__main__":
    main()
