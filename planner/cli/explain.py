"""``memplan explain``: read the training files a user already has, estimate that setup, say which
budget breaks and by how much, the cheapest changes that fit, and the traps that apply.

The edge of the flow: parse, read the files (`planner.explain.readers`, `planner.explain.from_files`), call
`planner.explain.diagnose.diagnose`, render (`planner.cli.render_explain`). docs/explain.md documents it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import click

from planner.cli.common import (
    UserError,
    parse_image_size,
    parse_size_arg,
    profiles_dir_option,
    runtime_model,
    user_errors,
)
from planner.profile.load import load_model

EXPLAIN_EPILOG = """\b
Examples:
  memplan explain finetune_ds.sh --gpus 3090 --host-ram 64GiB
  memplan explain finetune_ds.sh ds_config_zero3.json --gpus 2x3090 --host-ram 256GiB --json
  memplan explain train.yaml ds_z3.json --model minicpm-o-2.6 --gpus 4xa100-80gb --seq-len 4096
  memplan explain ds_config.json --args "--per_device_train_batch_size 2 --bf16 true" --model qwen2.5-7b --gpus 2x4090
"""

FLAG_OF_SETTING = {"seq_len": "--seq-len", "micro_batch": "--micro-batch", "grad_accum": "--grad-accum",
                   "max_slice_nums": "--max-slice-nums", "bf16": "--precision", "fp16": "--precision",
                   "pure_bf16": "--precision"}
PRECISION_SETTINGS = {
    "fp32": {"bf16": False, "fp16": False, "pure_bf16": False},
    "amp-bf16": {"bf16": True, "fp16": False, "pure_bf16": False},
    "amp-fp16": {"bf16": False, "fp16": True, "pure_bf16": False},
    "pure-bf16": {"bf16": True, "fp16": False, "pure_bf16": True},
}
_COUNTED = re.compile(r"^\s*\d+\s*[x*]")


def _file_paths(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> tuple[Path, ...]:
    """The FILES as paths; a NUL byte (which click.Path's own check fails on) names no file."""
    for v in value:
        if "\x00" in v:
            raise UserError(f"{v!r}: a file name cannot hold a NUL byte")
    return tuple(Path(v) for v in value)


@click.command(epilog=EXPLAIN_EPILOG)
@click.argument("files", nargs=-1, callback=_file_paths)
@click.option("--args", "arg_strings", multiple=True,
              help="finetune.py / HF Trainer arguments as one string, read like a script's flags; repeatable.")
@click.option("--model", default=None,
              help="Profile name, hub id or local config.json. [default: the files' model_name_or_path]")
@click.option("--gpus", default=None,
              help="GPUs like 2x3090, or just 3090 with the count from the script's launcher. [default: auto]")
@click.option("--host-ram", callback=parse_size_arg, help="Host RAM per node, e.g. 64GiB. [default: this machine's]")
@click.option("--seq-len", type=click.IntRange(min=2), default=None, help="Context per sample (wins over the files).")
@click.option("--micro-batch", type=click.IntRange(min=1), default=None, help="Samples per GPU per micro-step.")
@click.option("--grad-accum", type=click.IntRange(min=1), default=None, help="Micro-steps per optimizer step.")
@click.option("--precision", type=click.Choice(list(PRECISION_SETTINGS)), default=None,
              help="Precision (wins over the files' bf16/fp16/pure_bf16).")
@click.option("--images", type=click.IntRange(min=0), default=None,
              help="Images per sample. [default: 1 with a vision tower in the run]")
@click.option("--image-size", callback=parse_image_size, help="WxH in pixels. [default: 1344x1344]")
@click.option("--max-slice-nums", type=click.IntRange(min=1), default=None, help="MiniCPM's slice cap per image.")
@click.option("--audio-seconds", type=click.FloatRange(min=0), default=None, help="Seconds of audio per sample.")
@click.option("--zero-init/--no-zero-init", default=True, show_default=True,
              help="ZeRO-3 builds the model under deepspeed.zero.Init (from_pretrained after TrainingArguments).")
@click.option("--top", type=click.IntRange(min=1), default=5, show_default=True, help="Fixes shown.")
@click.option("--margin", type=click.FloatRange(min=0, max=0.9), default=0.05, show_default=True,
              help="Fraction of GPU memory and host RAM a fix keeps free.")
@click.option("--json", "as_json", is_flag=True, help="Print the diagnosis as JSON.")
@profiles_dir_option
@user_errors
def explain(files: tuple[Path, ...], arg_strings: tuple[str, ...], model: str | None, gpus: str | None,
            host_ram: int | None, seq_len: int | None, micro_batch: int | None, grad_accum: int | None,
            precision: str | None, images: int | None, image_size: tuple[int, int] | None,
            max_slice_nums: int | None, audio_seconds: float | None, zero_init: bool, top: int, margin: float,
            as_json: bool, profiles_dirs: tuple[Path, ...]) -> None:
    """Diagnose a training setup from its files: a DeepSpeed JSON, a launch script (MiniCPM-o's
    finetune_ds.sh) or argument string, a LLaMA-Factory YAML, an HF TrainingArguments JSON."""
    from planner.explain.diagnose import diagnose
    from planner.explain.from_files import build_setup, cluster_hints, fatal_problems, merge, read_files
    from planner.profile.catalog import load_catalog

    if not files and not arg_strings:
        raise UserError("give the training files to explain (a DeepSpeed JSON, a launch script, a LLaMA-Factory "
                        "YAML, a TrainingArguments JSON) or --args")
    catalog = load_catalog(profiles_dirs)
    readings = read_files(files, arg_strings)
    overrides: dict[str, tuple[Any, str]] = {}
    for name, value in (("seq_len", seq_len), ("micro_batch", micro_batch), ("grad_accum", grad_accum),
                        ("max_slice_nums", max_slice_nums)):
        if value is not None:
            overrides[name] = (value, FLAG_OF_SETTING[name])
    if precision is not None:
        overrides.update({k: (v, f"--precision {precision}") for k, v in PRECISION_SETTINGS[precision].items()})
    merged = merge(readings, overrides)
    fatal = fatal_problems(merged)
    if fatal:
        flags = sorted({FLAG_OF_SETTING[s] for p in fatal for s in p.settings if s in FLAG_OF_SETTING})
        hint = f" (settle it with {', '.join(flags)})" if flags else ""
        more = f" (and {len(fatal) - 1} more)" if len(fatal) > 1 else ""
        raise UserError(f"{fatal[0].text}{hint}{more}")
    spec, model_note = _model(model, merged, catalog)
    notes = list(catalog.notes) + ([model_note] if model_note else [])
    cluster = _cluster(gpus, cluster_hints(merged), catalog, host_ram, notes)
    workload = {k: v for k, v in (("images", images), ("image_size", image_size), ("audio_seconds", audio_seconds))
                if v is not None}
    setup = build_setup(merged, spec, cluster.world_size, zero_init, workload)
    setup.notes[:0] = notes
    built = {g.name for g in spec.groups} - set(setup.options.without)
    if setup.workload.images and not any(g.kind == "siglip_vision" and g.name in built for g in spec.groups):
        raise UserError(f"--images {setup.workload.images}: {spec.name} has no vision tower in this run")
    if setup.workload.audio_seconds and not any(g.kind == "whisper_encoder" and g.name in built for g in spec.groups):
        raise UserError(f"--audio-seconds: {spec.name} has no audio encoder in this run")
    from planner.cli.fitting import run_with_terms

    runtime = runtime_model(cluster)
    diagnosis = run_with_terms(lambda: diagnose(spec, cluster, setup, top=top, margin=margin, runtime=runtime),
                               setup.notes)
    from planner.cli import render_explain

    if as_json:
        click.echo(json.dumps(render_explain.explain_json(spec, cluster, merged, setup, diagnosis), indent=2))
    else:
        render_explain.console().print(render_explain.explain_view(spec, cluster, merged, setup, diagnosis))


def _model(name: str | None, merged: Any, catalog: Any) -> tuple[Any, str | None]:
    """The model: --model, else the files' model_name_or_path (a profile, a hub id, a local folder)."""
    from planner.explain.from_files import model_source
    from planner.profile.hf_config import find_config

    if name is not None:
        return load_model(name, catalog), None
    src = model_source(merged)
    if src is None:
        raise UserError("no file names the model (model_name_or_path): pass --model")
    value = str(src.value)
    if catalog.has_model(value):
        return load_model(value, catalog), f"model {value} from {src.file} ({src.key})"
    if "\x00" in value:  # possible in a JSON or YAML string; no file name holds one
        raise UserError(f"{src.file}: {src.key} {value!r} holds a NUL byte: it names neither a model profile "
                        "nor a folder; pass --model")
    try:
        as_written = Path(value).expanduser()
    except RuntimeError:  # ~user of a user this machine does not have
        as_written = Path(value)
    for candidate in (as_written, Path(src.file).parent / value):
        if not str(candidate).startswith("~") and find_config(candidate) is not None:
            return load_model(str(candidate), catalog), f"model from {candidate}, named by {src.file} ({src.key})"
    raise UserError(f"{src.file}: {src.key} {value!r} is neither a model profile, a hub id of one, nor a local "
                    "folder with config.json: pass --model")


def _cluster(gpus: str | None, hints: Any, catalog: Any, host_ram: int | None, notes: list[str]) -> Any:
    """--gpus (a bare GPU name takes its count from the launcher), else the detected GPUs."""
    from planner.errors import ProfileError
    from planner.profile.hardware import make_cluster

    counts = ""
    if hints.gpus_per_node:
        counts = (f"{hints.nodes}x" if hints.nodes and hints.nodes > 1 else "") + f"{hints.gpus_per_node}x"
    if gpus is None:
        try:
            cluster = make_cluster("auto", catalog, host_ram)
        except ProfileError as exc:
            seen = f" (the files launch {counts.rstrip('x')} per node)" if counts else ""
            raise UserError(f"no GPU type is known: no file names one and detection failed ({exc}); pass --gpus, "
                            f"e.g. --gpus 3090{seen}") from None
        if counts and hints.gpus_per_node != cluster.gpus_per_node:
            cluster = make_cluster(f"{counts}{cluster.gpu.name}", catalog, host_ram)
    elif counts and not _COUNTED.match(gpus):
        cluster = make_cluster(f"{counts}{gpus}", catalog, host_ram)
        notes.append(f"{cluster.gpus_per_node} GPU(s) per node from {hints.source}")
    else:
        cluster = make_cluster(gpus, catalog, host_ram)
        if hints.world_size and hints.world_size != cluster.world_size:
            notes.append(f"the files launch {hints.world_size} process(es) ({hints.source}); "
                         f"estimated for {cluster.world_size} as --gpus says")
    if cluster.note:
        notes.append(cluster.note)
    return cluster
