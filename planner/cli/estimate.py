"""``memplan estimate``: the ledger of one training setup, per GPU and per host. The edge of the flow."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from planner.cli.common import (
    FiniteFloat,
    UserError,
    json_text,
    lora_dropout_note,
    lora_dropout_option,
    make_cluster_noted,
    parse_image_size,
    parse_names,
    parse_size_arg,
    profiles_dir_option,
    runtime_model,
    trust_remote_code_option,
    user_errors,
)
from planner.profile.load import load_model
from planner.workload.options import Precision
from planner.workload.reference import DEFAULT_MODEL

ESTIMATE_EPILOG = """\b
Examples:
  memplan estimate
  memplan estimate --model minicpm-o-2.6 --gpus 2x3090 --host-ram 64GiB \\
      --without apm,audio_projection_layer,tts --freeze vpm --offload-optimizer none
  memplan estimate --model qwen2.5-7b --gpus 4xa100-80g --engine torch --precision pure-bf16
  memplan estimate --model ./my-model/config.json --gpus 2x4090 --lora-rank 16 --json
  memplan estimate --model qwen2.5-7b --gpus 1x4090 --engine torch --lora-rank 8 --lora-dropout 0
"""


@click.command(epilog=ESTIMATE_EPILOG)
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
    type=click.Choice([p.value for p in Precision]),
    default=Precision.AMP_BF16.value,
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
@lora_dropout_option
@click.option(
    "--micro-batch", type=click.IntRange(min=1), default=1, show_default=True, help="Samples per GPU per micro-step."
)
@click.option(
    "--grad-accum", type=click.IntRange(min=1), default=1, show_default=True, help="Micro-steps per optimizer step."
)
@click.option(
    "--seq-len", type=click.IntRange(min=2), default=1024, show_default=True, help="Tokens per sample (context length)."
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
@trust_remote_code_option
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
    lora_dropout: float,
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
    trust_remote_code: bool,
) -> None:
    """Estimate the memory of one training setup, per GPU and per host."""
    from planner.estimate import estimate as run_estimate
    from planner.profile.catalog import load_catalog
    from planner.workload.inventory import Workload
    from planner.workload.options import LoraOptions, TrainingOptions
    from planner.workload.reference import default_images, select
    from planner.workload.vision import image_note, vision_rule

    catalog = load_catalog(profiles_dirs)
    notes = list(catalog.notes)
    sel = select(model, train, freeze, without, lora_rank, max_slice_nums)
    train, freeze, without, max_slice_nums = sel.train, sel.freeze, sel.without, sel.max_slice_nums
    notes += [sel.note] if sel.note else []
    spec = load_model(sel.model, catalog, trust_remote_code=trust_remote_code)
    cluster = make_cluster_noted(gpus, catalog, host_ram, notes)
    ctx = click.get_current_context()
    if not cluster.gpu.bf16 and ctx.get_parameter_source("precision") is click.core.ParameterSource.DEFAULT:
        precision = Precision.AMP_FP16.value  # the default amp-bf16 cannot run there; an explicit bf16 is refused
        notes.append(f"{cluster.gpu.full_name} has no bf16: planning amp-fp16 (--precision to choose)")
    if engine == "torch":  # the DeepSpeed defaults do not apply; explicit values are still checked
        default = click.core.ParameterSource.DEFAULT
        zero = "0" if ctx.get_parameter_source("zero") is default else zero
        if ctx.get_parameter_source("offload_optimizer") is default:
            offload_optimizer = "none"
        if ctx.get_parameter_source("offload_param") is default:
            offload_param = "none"
    lora = None
    default_source = click.core.ParameterSource.DEFAULT
    if lora_rank is not None:
        lora = LoraOptions(rank=lora_rank, **({"targets": lora_targets} if lora_targets else {}),
                           groups=lora_groups or (), dropout=lora_dropout)
        notes += [n for n in (lora_dropout_note(ctx, lora),) if n]
    elif lora_targets or lora_groups or ctx.get_parameter_source("lora_dropout") is not default_source:
        raise UserError("--lora-targets, --lora-groups and --lora-dropout need --lora-rank")
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
    images = default_images(spec, options.without, images, audio_seconds)
    workload = Workload(
        micro_batch=micro_batch,
        grad_accum=grad_accum,
        seq_len=seq_len,
        images=images,
        max_slice_nums=max_slice_nums or 9,
        audio_seconds=audio_seconds,
        vision=vision_rule(spec, options.without) if images else None,
        **({"image_size": image_size} if image_size else {}),
    )
    notes += [n for n in (image_note(images, workload.image_layout()),) if n]
    from planner.cli.fitting import run_with_terms

    runtime = runtime_model(cluster)
    est = run_with_terms(lambda: run_estimate(spec, cluster, options, workload, notes=notes, runtime=runtime), notes)
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


