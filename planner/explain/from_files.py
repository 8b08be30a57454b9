"""From files to a setup: merge what the readers found, fill DeepSpeed's "auto" values as HF
Trainer would, apply each trainer's defaults and its rules, and build the `TrainingOptions`,
`Workload` and `ZeroSettings` the estimate takes.

Part of the readers (the edge of the flow, beside the writers). Precedence, highest first: the
command line, the files, the trainer's defaults (each one reported as such). A DeepSpeed value that
disagrees with the trainer arguments is what HF Trainer refuses at start; it is a fatal problem
unless a command-line flag settles it. docs/explain.md lists every rule with its source.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from planner.errors import ProfileError
from planner.estimate.states import (
    DS_MAX_LIVE_PARAMETERS,
    DS_MAX_REUSE_DISTANCE,
    DS_PERSISTENCE_THRESHOLD,
    DS_PREFETCH_BUCKET_SIZE,
    DS_REDUCE_BUCKET_SIZE,
    DS_SUB_GROUP_SIZE,
    ZeroSettings,
)
from planner.explain.inputs import check_text
from planner.explain.keys import AUTO, DS_AUTO
from planner.explain.merged import Merged
from planner.explain.readers import Problem, Reading, Setting
from planner.explain.recognise import read_file
from planner.explain.rules import (
    DEFAULTS,
    LF_FLASH_ATTN,
    TRAINER_NAMES,
    llamafactory_groups,
    minicpm_groups,
    optimizer_of,
    precision_of,
)
from planner.explain.scripts import read_script
from planner.profile.catalog import ModelSpec
from planner.workload.inventory import Workload
from planner.workload.options import Attention, Engine, Offload, TrainingOptions, ZeroStage

COMMAND_LINE = "(command line)"
DEFAULT = "(default)"

DEFAULT_SEQ_LEN = 1024
"""Context when no file names one (an HF Trainer script's data decides it): `memplan estimate`'s."""

DS_DEFAULTS: dict[str, Any] = {
    "zero_stage": 0, "offload_optimizer": "none", "offload_param": "none", "offload_optimizer_pin_memory": True,
    "offload_param_pin_memory": True, "contiguous_gradients": True, "sub_group_size": DS_SUB_GROUP_SIZE,
    "stage3_max_live_parameters": DS_MAX_LIVE_PARAMETERS,
}
"""DeepSpeed 0.19.8's defaults for keys a config leaves out (zero/config.py, offload_config.py)."""


@dataclass(frozen=True)
class ClusterHints:
    """What the files say about the cluster (none of them names the GPU type)."""

    nodes: int | None = None
    gpus_per_node: int | None = None
    world_size: int | None = None
    source: str = ""


@dataclass
class FileSetup:
    """The user's setup as the estimate takes it."""

    options: TrainingOptions
    workload: Workload
    zero: ZeroSettings
    trainer: str
    auto_buckets: tuple[str, ...] = ()
    """DeepSpeed bucket keys HF filled from the hidden size ("auto")."""
    explicit_ds: frozenset[str] = frozenset()
    """Settings the DeepSpeed file gives a value of its own (not "auto")."""
    notes: list[str] = field(default_factory=list)


def read_files(paths: Sequence[str | Path], arg_strings: Sequence[str] = ()) -> list[Reading]:
    """Read every file (and argument string), then the DeepSpeed files they name that were not given.

    Raises:
        ProfileError: a file is unreadable or malformed, or names a DeepSpeed file that does not exist.
    """
    readings = [read_file(p) for p in paths]
    for i, a in enumerate(arg_strings):
        check_text(a, f"--args #{i + 1}")
        readings.append(read_script(a, f"--args #{i + 1}"))
    readings += [r.inline_deepspeed for r in readings if r.inline_deepspeed is not None]
    if any(r.kind == "deepspeed" for r in readings):
        return readings
    given = {_resolved(p) for p in paths}
    for r in list(readings):
        ref = r.deepspeed_ref
        if ref is None or _resolved(ref) in given:
            continue
        if not Path(ref).exists():  # a FIFO or folder is there, and read_file says what it is
            raise ProfileError(f"{r.file}: {r.settings['deepspeed'].key} names {ref}, which is not there; "
                               "pass the DeepSpeed JSON as a FILE")
        ds = read_file(ref)
        ds.notes.append(f"{ds.file}: read because {r.file} names it ({r.settings['deepspeed'].key})")
        readings.append(ds)
        given.add(_resolved(ref))
    return readings


def _resolved(path: str | Path) -> Path:
    """``path`` made absolute, symlinks followed where they lead somewhere (a loop stays as written)."""
    try:
        return Path(path).resolve()
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop (Python 3.11's pathlib)
        return Path(path).absolute()


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float | int) and isinstance(b, float | int) and not isinstance(a, bool | str):
        return math.isclose(float(a), float(b), rel_tol=1e-9)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def merge(readings: Sequence[Reading], overrides: Mapping[str, tuple[Any, str]] | None = None) -> Merged:
    """Merge the readings: trainer arguments first, the DeepSpeed file checked against them and its
    "auto" values filled from them, the trainer's defaults for what no file says, then
    ``overrides`` (setting -> (value, flag)) from the command line.

    Raises:
        ProfileError: files for two trainers, two DeepSpeed files, or two files that disagree.
    """
    overrides = dict(overrides or {})
    trainers = {r.trainer for r in readings if r.trainer}
    if len(trainers) > 1:
        which = ", ".join(f"{r.file} ({TRAINER_NAMES[r.trainer]})" for r in readings if r.trainer)
        raise ProfileError(f"the files are for different trainers: {which}; explain one setup at a time")
    trainer = trainers.pop() if trainers else "hf"
    ds_files = [r for r in readings if r.kind == "deepspeed"]
    if len(ds_files) > 1:
        raise ProfileError(f"two DeepSpeed configs: {ds_files[0].file} and {ds_files[1].file}; pass one")
    merged = Merged(list(readings), trainer, {})
    s = merged.settings
    for r in readings:
        merged.problems += r.problems
        merged.notes += r.notes
        if r.kind == "deepspeed":
            continue
        for name, got in r.settings.items():
            old = s.get(name)
            if old is not None and not _same(old.value, got.value) and name not in overrides:
                raise ProfileError(f"{old.file} says {old.key} {old.value!r} but {got.file} says {got.key} "
                                   f"{got.value!r}; pass one setup (or settle it on the command line)")
            s.setdefault(name, got)
    defaults = DEFAULTS[trainer]
    has_args = any(r.kind != "deepspeed" for r in readings)
    for r in ds_files:
        for name, got in r.settings.items():
            old = s.get(name)
            if got.value == AUTO and name in DS_AUTO:
                if old is not None:
                    s[name] = Setting(name, old.value, old.file, old.key, f"fills {got.key} \"auto\" in {got.file}")
                elif name in defaults:
                    value, key = defaults[name]
                    s[name] = Setting(name, value, got.file, got.key,
                                      f"\"auto\", and no trainer argument read: HF fills {key}'s default {value!r}")
                else:
                    s[name] = got  # filled from the model or the world size once they are known
            elif old is not None and name in DS_AUTO and not _same(old.value, got.value):
                merged.problems.append(Problem(
                    f"{got.file} says {got.key} {got.value!r} but {old.file} says {old.key} {old.value!r}: HF Trainer "
                    "refuses to start ('Please correct the following DeepSpeed config values that mismatch "
                    "TrainingArguments values')", True, (name,)))
            elif old is None:
                if has_args and name in DS_AUTO and name in defaults and not _same(defaults[name][0], got.value):
                    value, key = defaults[name]
                    merged.problems.append(Problem(
                        f"{got.file} says {got.key} {got.value!r} but no trainer argument sets {key}, whose "
                        f"{TRAINER_NAMES[trainer]} default is {value!r}: HF Trainer refuses to start (mismatch)",
                        True, (name,)))
                s[name] = got
    for name, (value, key) in defaults.items():
        if name not in s:
            s[name] = Setting(name, value, DEFAULT, key, f"{TRAINER_NAMES[trainer]}'s default")
    for name, (value, flag) in overrides.items():
        s[name] = Setting(name, value, COMMAND_LINE, flag)
    settled = []
    for p in merged.problems:
        if p.fatal and p.settings and all(n in overrides for n in p.settings):
            settled.append(p)
            merged.notes.append(f"settled on the command line: {p.text}")
    merged.problems = [p for p in merged.problems if p not in settled]
    return merged


def fatal_problems(merged: Merged) -> list[Problem]:
    """The problems that stop the run as written and that no flag settled."""
    return [p for p in merged.problems if p.fatal]


def model_source(merged: Merged) -> Setting | None:
    """The ``model_name_or_path`` the files name, if any."""
    return merged.settings.get("model_name_or_path")


def cluster_hints(merged: Merged) -> ClusterHints:
    """Nodes and GPUs per node from the launcher (torchrun, deepspeed, accelerate), or the world
    size from an explicit DeepSpeed ``train_batch_size``."""
    s = merged.settings
    nodes, per_node, world = s.get("nnodes"), s.get("nproc_per_node"), s.get("world_size")
    if per_node is not None or world is not None:
        n = nodes.value if nodes is not None else 1
        if per_node is not None:
            return ClusterHints(n, per_node.value, n * per_node.value, f"{per_node.file}: {per_node.key}")
        return ClusterHints(n, world.value // n, world.value, f"{world.file}: {world.key}")
    tb, mb, ga = merged.value("global_batch"), merged.value("micro_batch"), merged.value("grad_accum")
    if isinstance(tb, int) and isinstance(mb, int) and isinstance(ga, int) and tb % (mb * ga) == 0:
        return ClusterHints(1, tb // (mb * ga), tb // (mb * ga), f"{s['global_batch'].file}: train_batch_size")
    return ClusterHints()


def _zero_settings(merged: Merged, model: ModelSpec, stage: ZeroStage) -> tuple[ZeroSettings, tuple[str, ...]]:
    """DeepSpeed's values: "auto" buckets from the hidden size (HF ``trainer_config_finalize``),
    left-out keys at DeepSpeed's defaults."""
    hidden = model.hidden_size
    auto_of = {"reduce_bucket_size": lambda h: h * h, "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
               "stage3_param_persistence_threshold": lambda h: 10 * h}
    defaults = {"reduce_bucket_size": DS_REDUCE_BUCKET_SIZE, "stage3_prefetch_bucket_size": DS_PREFETCH_BUCKET_SIZE,
                "stage3_param_persistence_threshold": DS_PERSISTENCE_THRESHOLD}
    values, autos = {}, []
    for key, rule in auto_of.items():
        got = merged.settings.get(key)
        if got is not None and got.value == AUTO:
            if hidden is None:
                raise ProfileError(f"{got.file}: {got.key} is \"auto\" but the model has no hidden_size to fill it "
                                   "(HF Trainer stops the same way)")
            values[key] = rule(hidden)
            autos.append(key)
            merged.settings[key] = Setting(key, values[key], got.file, got.key,
                                           f"\"auto\": HF fills it from hidden_size {hidden}")
        else:
            values[key] = got.value if got is not None else defaults[key]
    overlap = merged.value("overlap_comm")
    return ZeroSettings(
        reduce_bucket_size=values["reduce_bucket_size"],
        param_persistence_threshold=values["stage3_param_persistence_threshold"],
        overlap_comm=(stage is ZeroStage.PARAMETERS) if overlap is None else bool(overlap),
        contiguous_gradients=bool(merged.value("contiguous_gradients", True)),
        sub_group_size=merged.value("sub_group_size", DS_SUB_GROUP_SIZE),
        prefetch_bucket_size=values["stage3_prefetch_bucket_size"],
        max_live_parameters=merged.value("stage3_max_live_parameters", DS_MAX_LIVE_PARAMETERS),
        max_reuse_distance=merged.value("stage3_max_reuse_distance", DS_MAX_REUSE_DISTANCE),
    ), tuple(autos)


def build_setup(merged: Merged, model: ModelSpec, world_size: int, zero_init: bool = True,
                workload_overrides: Mapping[str, Any] | None = None) -> FileSetup:
    """The options, workload and DeepSpeed values of the merged settings for ``model``.

    Args:
        merged: the merged settings.
        model: the model they train.
        world_size: ranks in all (fills ``train_batch_size`` "auto" and checks an explicit one).
        zero_init: ZeRO-3 builds the model under ``deepspeed.zero.Init`` (true for
            ``from_pretrained`` after TrainingArguments exist, as finetune.py and LLaMA-Factory do).
        workload_overrides: Workload fields the command line sets (images, image_size, ...).

    Raises:
        ProfileError: a setting no trainer accepts, or a combination memplan does not model.
    """
    notes: list[str] = []
    problems: list[Problem] = []
    v = merged.value
    engine = Engine.DEEPSPEED if merged.deepspeed else Engine.TORCH
    for name, default in DS_DEFAULTS.items():
        got = merged.settings.get(name)
        if got is not None and got.value == AUTO:
            merged.settings[name] = Setting(name, default, got.file, got.key, got.note)
    stage = ZeroStage(v("zero_stage", 0)) if engine is Engine.DEEPSPEED else ZeroStage.DISABLED
    off_opt = Offload(v("offload_optimizer", "none")) if stage >= ZeroStage.OPTIMIZER_STATES else Offload.NONE
    off_param = Offload(v("offload_param", "none")) if stage is ZeroStage.PARAMETERS else Offload.NONE
    pins = [v(k) for k in ("offload_optimizer_pin_memory", "offload_param_pin_memory")]
    precision = precision_of(merged, engine, notes)
    optimizer = optimizer_of(merged, engine, off_opt is not Offload.NONE, problems)
    if merged.trainer == "llamafactory":
        grad_ckpt = not v("disable_gradient_checkpointing", False)
        flash = str(v("flash_attn", "auto"))
        if flash not in LF_FLASH_ATTN:
            raise ProfileError(f"flash_attn {flash!r}: LLaMA-Factory takes auto, disabled, sdpa or fa2 here "
                               "(fa3 stops with 'Unknown attention type')")
        attn = LF_FLASH_ATTN[flash]
        if v("quantization_bit") is not None:
            raise ProfileError(f"quantization_bit {v('quantization_bit')}: memplan does not estimate quantized "
                               "base weights (QLoRA)")
        stage_name = v("lf_stage", "sft")
        if stage_name not in ("sft", "pt"):
            problems.append(Problem(f"stage {stage_name}: its reference or reward models are not counted; "
                                    "estimated as sft"))
        groups = llamafactory_groups(merged, model, problems)
    else:
        grad_ckpt = bool(v("gradient_checkpointing", False))
        attn = Attention.SDPA
        if merged.trainer == "minicpm":
            groups = minicpm_groups(merged, model, problems)
        else:
            groups = {}
            notes.append("an HF Trainer setup says nothing about freezing: every parameter of the model is "
                         "estimated as trained")
    options = TrainingOptions(engine=engine, zero=stage, offload_optimizer=off_opt, offload_param=off_param,
                              precision=precision, optimizer=optimizer, grad_ckpt=grad_ckpt, attn=attn,
                              pin_memory=all(p is not False for p in pins), zero_init=zero_init, **groups)
    wl = dict(workload_overrides or {})
    built = {g.name for g in model.groups} - set(options.without)
    has_vision = any(g.kind == "siglip_vision" and g.name in built for g in model.groups)
    seq = merged.settings.get("seq_len")
    if seq is None:
        notes.append(f"no file gives the context length: estimated at {DEFAULT_SEQ_LEN} tokens (--seq-len)")
    if "images" not in wl:
        wl["images"] = 1 if has_vision and merged.trainer != "hf" else 0
        if wl["images"]:
            notes.append("one image per sample (--images to change)")
    if "image_size" not in wl and merged.trainer == "llamafactory" and wl["images"]:
        pixels = int(v("image_max_pixels"))
        if pixels < 1:
            got = merged.settings["image_max_pixels"]
            raise ProfileError(f"{got.file}: {got.key} {pixels}: LLaMA-Factory needs a positive pixel count")
        side = math.isqrt(pixels)
        wl["image_size"] = (side, side)
        notes.append(f"LLaMA-Factory resizes images to at most image_max_pixels {v('image_max_pixels')}: "
                     f"estimated as {side}x{side}")
    workload = Workload(micro_batch=v("micro_batch"), grad_accum=v("grad_accum"),
                        seq_len=seq.value if seq is not None else DEFAULT_SEQ_LEN,
                        max_slice_nums=v("max_slice_nums", 9), **wl)
    zero, autos = _zero_settings(merged, model, stage) if engine is Engine.DEEPSPEED else (ZeroSettings(), ())
    batch = workload.micro_batch * workload.grad_accum * world_size
    tb = merged.settings.get("global_batch")
    if tb is not None and tb.value == AUTO:
        merged.settings["global_batch"] = Setting("global_batch", batch, tb.file, tb.key,
                                                  f"\"auto\": HF fills {world_size} GPUs x micro-batch x accumulation")
    elif tb is not None and engine is Engine.DEEPSPEED and tb.value != batch:
        raise ProfileError(f"{tb.file}: {tb.key} {tb.value} is not micro-batch {workload.micro_batch} x "
                           f"accumulation {workload.grad_accum} x {world_size} GPUs = {batch} (DeepSpeed stops: "
                           "'Check batch related parameters')")
    merged.problems += problems
    explicit = frozenset(n for r in merged.readings if r.kind == "deepspeed" for n, got in r.settings.items()
                         if got.value != AUTO)
    return FileSetup(options, workload, zero, merged.trainer, autos, explicit, notes)
