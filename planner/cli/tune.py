"""``memplan tune``: search what fits, rank it by speed, write the chosen plan's files.

The edge of the flow: parse the request, call `search.search`, `plan.make_plan` and
`writers.write_plan_folder`, render. docs/tune.md documents the flags, the ranking and the files.
"""

from __future__ import annotations

import time
from pathlib import Path

import click

from planner.cli.common import (
    FiniteFloat,
    PassThroughCommand,
    UserError,
    json_text,
    lora_dropout_note,
    lora_dropout_option,
    make_cluster_noted,
    parse_image_size,
    parse_names,
    parse_out_dir,
    parse_size_arg,
    profiles_dir_option,
    runtime_model,
    trust_remote_code_option,
    user_errors,
)
from planner.cli.launch import launch_options
from planner.profile.load import load_model
from planner.workload.options import Precision
from planner.workload.reference import DEFAULT_MODEL

TUNE_EPILOG = """\b
Examples:
  memplan tune --gpus 2x3090 --host-ram 64GiB
  memplan tune --model minicpm-o-2.6 --gpus 2x3090 --host-ram 256GiB --target minicpm \\
      --without apm,audio_projection_layer,tts --freeze vpm --max-slice-nums 1 --out plan-256g
  memplan tune --model qwen2.5-7b --gpus 4xa100-80gb --global-batch 64 --must-train llm --json
"""


@click.command(cls=PassThroughCommand, epilog=TUNE_EPILOG)
@click.option("--model", default=None, help=f"Profile name, hub id or local config.json. [default: {DEFAULT_MODEL}]")
@click.option("--gpus", default=None, help="GPUS like 2x3090, 2x8xh100, or auto. [default: auto, else 2x3090]")
@click.option("--host-ram", callback=parse_size_arg, help="Host RAM per node, e.g. 64GiB. [default: this machine's]")
@click.option("--nvme", callback=parse_size_arg, help="NVMe space per node for ZeRO-Infinity offload. [default: none]")
@click.option("--target", type=click.Choice(["builtin", "minicpm", "llamafactory"]), default="builtin",
              show_default=True, help="The trainer that will run the plan: only setups it can express are chosen.")
@click.option("--engine", type=click.Choice(["torch", "deepspeed"]), default=None,
              help="Only this engine (plain PyTorch DDP, or DeepSpeed with ZeRO 1-3). [default: both]")
@click.option("--train", multiple=True, callback=parse_names, help="Request: train only these groups/parts.")
@click.option("--freeze", multiple=True, callback=parse_names, help="Request: freeze these groups/parts.")
@click.option("--without", multiple=True, callback=parse_names, help="Groups the training script never builds.")
@click.option("--must-train", multiple=True, callback=parse_names,
              help="Groups/parts trained fully in every candidate (no LoRA, no freezing).")
@click.option("--lora-rank", type=click.IntRange(min=1), default=None, help="Request LoRA of this rank.")
@lora_dropout_option
@click.option("--precision", type=click.Choice([p.value for p in Precision]), default=None,
              help="Insist on this precision. [default: the search chooses]")
@click.option("--seq-len", type=click.IntRange(min=2), default=1024, show_default=True,
              help="Requested context per sample (image and audio tokens included).")
@click.option("--min-seq-len", type=click.IntRange(min=2), default=None,
              help="Shortest context the search may fall back to. [default: half of --seq-len]")
@click.option("--images", type=click.IntRange(min=0), default=None,
              help="Images per sample. [default: 1 with a vision tower]")
@click.option("--image-size", callback=parse_image_size, help="WxH in pixels. [default: 1344x1344]")
@click.option("--max-slice-nums", type=click.IntRange(min=1), default=None,
              help="Requested slice cap per image. [default: 9; 1 for the reference setup]")
@click.option("--min-slices", type=click.IntRange(min=1), default=None,
              help="Fewest slices the search may fall back to. [default: 1]")
@click.option("--audio-seconds", type=FiniteFloat(min=0), default=0.0, show_default=True)
@click.option("--global-batch", type=click.IntRange(min=1), default=None,
              help="Samples per optimizer step, all GPUs. [default: 16, rounded up to a multiple of the GPUs]")
@click.option("--margin", type=click.FloatRange(min=0, max=0.9), default=0.05, show_default=True,
              help="Fraction of GPU memory and host RAM kept free.")
@click.option("--top", type=click.IntRange(min=1), default=5, show_default=True, help="Candidates shown.")
@click.option("--out", "out_dir", callback=parse_out_dir, default="memplan-plan", show_default=True,
              help="Folder for plan.json, the configs and the launch scripts.")
@click.option("--force", is_flag=True, help="Overwrite the files of an earlier plan in --out.")
@click.option("--data", default="data/train.json", show_default=True, help="Training data for the written configs.")
@click.option("--model-path", default=None, help="Where trainers load the weights from. [default: the hub id]")
@click.option("--learning-rate", type=FiniteFloat(min=0, min_open=True), default=None,
              help="[default: 1e-5 full, 1e-4 LoRA]")
@click.option("--epochs", type=FiniteFloat(min=0, min_open=True), default=1.0, show_default=True)
@click.option("--output-dir", default="output", show_default=True, help="Where the trainer writes checkpoints.")
@click.option("--json", "as_json", is_flag=True, help="Print candidates, the chosen plan and fixes as JSON.")
@click.option("--launch", "launch_run", is_flag=True, help="Run the plan once written (see memplan launch).")
@launch_options
@profiles_dir_option
@trust_remote_code_option
@user_errors
def tune(model: str | None, gpus: str | None, host_ram: int | None, nvme: int | None, target: str, engine: str | None,
         train: tuple[str, ...] | None, freeze: tuple[str, ...] | None, without: tuple[str, ...] | None,
         must_train: tuple[str, ...] | None, lora_rank: int | None, lora_dropout: float, precision: str | None,
         seq_len: int,
         min_seq_len: int | None, images: int | None, image_size: tuple[int, int] | None,
         max_slice_nums: int | None, min_slices: int | None, audio_seconds: float, global_batch: int | None,
         margin: float, top: int, out_dir: Path, force: bool, data: str, model_path: str | None,
         learning_rate: float | None, epochs: float, output_dir: str, as_json: bool, launch_run: bool,
         script: Path | None, hostfile: Path | None, max_retries: int, dry_run: bool, extra: tuple[str, ...],
         profiles_dirs: tuple[Path, ...], trust_remote_code: bool) -> None:
    """Search the setups that fit, rank them by expected speed, and write the best one's
    DeepSpeed config, trainer arguments and launch scripts into --out."""
    from planner.plan import FULL_LEARNING_RATE, LORA_LEARNING_RATE, TrainerSettings, make_plan
    from planner.profile.catalog import load_catalog
    from planner.search.fixes import fixes
    from planner.search.search import search
    from planner.search.space import Constraints, Request, SearchSpace
    from planner.workload.options import LoraOptions
    from planner.workload.reference import default_images, minicpm_not_built, select
    from planner.workload.vision import vision_rule
    from planner.writers import write_plan_folder

    if extra and not launch_run:  # before anything is searched or written
        raise UserError(f"unexpected arguments {' '.join(extra)!r} (trainer flags go after -- with --launch)")
    for name, value in (("--data", data), ("--output-dir", output_dir), ("--model-path", model_path)):
        if value is not None and (value.strip() == "" or "\x00" in value):
            raise UserError(f"{name}: needs a path (no empty text, no NUL byte)")
    catalog = load_catalog(profiles_dirs)
    notes: list[str] = list(catalog.notes)
    sel = select(model, train, freeze, without, lora_rank, max_slice_nums)
    notes += [sel.note] if sel.note else []
    spec = load_model(sel.model, catalog, trust_remote_code=trust_remote_code)
    if model_path is None and model is not None and not catalog.has_model(model):
        from planner.profile.hf_config import find_config

        config = find_config(model)
        if config is not None:  # a local model: the trainers load the weights from its folder
            model_path = str(config.resolve().parent)
    groups_out = sel.without
    if target == "minicpm" and without is None and sel.note is None:
        groups_out = minicpm_not_built(spec)  # setups MiniCPM's finetune.py can run build no audio or TTS
    cluster = make_cluster_noted(gpus, catalog, host_ram, notes)
    images = default_images(spec, groups_out, images)
    request = Request(
        seq_len=seq_len, images=images, image_size=image_size, max_slice_nums=sel.max_slice_nums or 9,
        audio_seconds=audio_seconds, vision=vision_rule(spec, groups_out) if images else None,
        train=sel.train, freeze=sel.freeze, without=groups_out,
        lora=LoraOptions(rank=lora_rank, dropout=lora_dropout) if lora_rank else None, lora_dropout=lora_dropout,
        precision=precision, global_batch=global_batch,
    )
    constraints = Constraints(must_train=must_train or (), min_seq_len=min_seq_len, min_slice_nums=min_slices,
                              margin=margin, nvme_bytes=nvme or 0, target=target)
    space = SearchSpace()
    if engine is not None:
        space = space.model_copy(update={"engines": tuple(e for e in space.engines if e[0].value == engine)})
    started = time.perf_counter()
    from planner.cli.fitting import run_with_terms

    fit_notes: list[str] = []
    runtime = runtime_model(cluster)
    result = run_with_terms(lambda: search(spec, cluster, request, constraints, space, top=top, runtime=runtime),
                            fit_notes)
    notes += fit_notes
    seconds = time.perf_counter() - started  # the search alone: docs/tune.md's speed target
    notes += [n for n in result.notes if n not in notes]  # what the search substituted or skipped, and why
    repair = fixes(spec, cluster, request, constraints, space, result, runtime)
    chosen = result.chosen
    files = []
    if chosen is not None:
        notes += [n for n in (lora_dropout_note(click.get_current_context(), chosen.options.lora),) if n]
        lr = learning_rate or (LORA_LEARNING_RATE if chosen.options.lora else FULL_LEARNING_RATE)
        trainer = TrainerSettings(data_path=data, output_dir=output_dir, learning_rate=lr, num_train_epochs=epochs)
        plan = make_plan(spec, model_path, cluster, chosen, result.global_batch, request, constraints, trainer,
                         tuple(notes), space=space)
        files = write_plan_folder(plan, out_dir, force=force)
    from planner.cli import render, render_tune

    if as_json:
        click.echo(json_text(render_tune.tune_json(result, repair, files, out_dir, seconds, notes)))
    else:
        title = f"{spec.name} on {cluster.label}, host RAM {render.gib(cluster.host_ram_bytes)} per node"
        render.console().print(render_tune.tune_view(result, repair, files, out_dir, seconds, notes, title, top))
    if chosen is None:
        raise SystemExit(1)
    if launch_run or dry_run:
        from planner.cli.launch import run_plan

        raise SystemExit(run_plan(out_dir, target, script, hostfile, None, max_retries, dry_run, extra))

