"""Each trainer's rules: its defaults, how its flags map to precision, optimizer and what trains.

Part of the readers (`planner.explain.from_files` applies them). MiniCPM-o's finetune.py, LLaMA-Factory
0.9.5 and HF Trainer, each rule citing the code it mirrors (docs/trainer-keys.md has the sources).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from planner.errors import ProfileError
from planner.explain.merged import Merged
from planner.explain.readers import Problem
from planner.profile.catalog import ModelSpec
from planner.workload.options import Attention, Engine, LoraOptions, Optimizer, Precision

HF_DEFAULTS: dict[str, tuple[Any, str]] = {
    "micro_batch": (8, "per_device_train_batch_size"),
    "grad_accum": (1, "gradient_accumulation_steps"),
    "bf16": (False, "bf16"),
    "fp16": (False, "fp16"),
    "gradient_checkpointing": (False, "gradient_checkpointing"),
    "optim": ("adamw_torch_fused", "optim"),
    "learning_rate": (5e-5, "learning_rate"),
    "weight_decay": (0.0, "weight_decay"),
    "max_grad_norm": (1.0, "max_grad_norm"),
    "adam_epsilon": (1e-8, "adam_epsilon"),
    "adam_betas": ([0.9, 0.999], "adam_beta1, adam_beta2"),
}
"""transformers ``TrainingArguments`` defaults (5.24; ``optim`` with torch >= 2.8)."""

MINICPM_DEFAULTS: dict[str, tuple[Any, str]] = {
    **HF_DEFAULTS,
    "optim": ("adamw_torch", "optim"),
    "seq_len": (2048, "--model_max_length"),
    "max_slice_nums": (9, "--max_slice_nums"),
    "tune_vision": (True, "--tune_vision"),
    "tune_llm": (True, "--tune_llm"),
    "use_lora": (False, "--use_lora"),
    "lora_rank": (64, "--lora_r"),
    "lora_dropout": (0.05, "--lora_dropout"),
    "lora_target": (r"llm\..*layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj)", "--lora_target_modules"),
}
"""MiniCPM-o finetune.py's own defaults (finetune.py:L41-L70, docs/trainer-keys.md 3.1)."""

LF_DEFAULTS: dict[str, tuple[Any, str]] = {
    **HF_DEFAULTS,
    "seq_len": (2048, "cutoff_len"),
    "finetuning_type": ("lora", "finetuning_type"),
    "lora_rank": (8, "lora_rank"),
    "lora_dropout": (0.0, "lora_dropout"),
    "lora_target": ("all", "lora_target"),
    "freeze_vision_tower": (True, "freeze_vision_tower"),
    "freeze_multi_modal_projector": (True, "freeze_multi_modal_projector"),
    "freeze_language_model": (False, "freeze_language_model"),
    "pure_bf16": (False, "pure_bf16"),
    "disable_gradient_checkpointing": (False, "disable_gradient_checkpointing"),
    "flash_attn": ("auto", "flash_attn"),
    "image_max_pixels": (589824, "image_max_pixels"),
}
"""LLaMA-Factory 0.9.5 defaults (hparams/*.py, docs/trainer-keys.md 4.2)."""

DEFAULTS = {"minicpm": MINICPM_DEFAULTS, "llamafactory": LF_DEFAULTS, "hf": HF_DEFAULTS}
TRAINER_NAMES = {"minicpm": "MiniCPM's finetune.py", "llamafactory": "LLaMA-Factory", "hf": "HF Trainer"}

MINICPM_NOT_BUILT = ("apm", "audio_projection_layer", "tts")
"""finetune.py loads with ``init_audio=False, init_tts=False``: these are never built."""

LF_MINICPMO_ROLES = {"vpm": "vision", "apm": "vision", "audio_projection_layer": "vision", "tts": "vision",
                     "resampler": "projector", "llm": "language"}
"""LLaMA-Factory's composite model ``minicpmo`` (model_utils/visual.py): vision keys vpm, apm,
audio_projection_layer, tts; projector resampler; language llm."""
LF_ROLE_OF_KIND = {"decoder": "language", "siglip_vision": "vision", "whisper_encoder": "vision",
                   "chattts": "vision", "resampler": "projector", "mlp_projector": "projector",
                   "vision_tower": "vision", "projector": "projector"}  # a config.json's (profile.hf_groups)

LF_FLASH_ATTN = {"auto": Attention.SDPA, "sdpa": Attention.SDPA, "disabled": Attention.EAGER,
                 "fa2": Attention.FLASH_ATTENTION_2}
"""LLaMA-Factory ``flash_attn`` -> attention (model_utils/attention.py; ``auto`` keeps the model's
default, sdpa for the LLMs memplan profiles)."""

HF_OPTIMS = {
    "adamw_torch_fused": Optimizer.ADAMW_FUSED,
    "adamw_torch": Optimizer.ADAMW_FOREACH,
    "adamw_bnb_8bit": Optimizer.ADAMW_8BIT,
    "adamw_8bit": Optimizer.ADAMW_8BIT,
    "paged_adamw_8bit": Optimizer.ADAMW_8BIT,
    "adafactor": Optimizer.ADAFACTOR,
    "sgd": Optimizer.SGD,
}
"""HF ``optim`` -> our optimizer (the inverse of keymap.HF_OPTIM; plain-PyTorch fused AdamW is our
default ``adamw``)."""


def precision_of(merged: Merged, engine: Engine, notes: list[str]) -> Precision:
    v = merged.value
    if v("pure_bf16") is True:
        return Precision.PURE_BF16
    if engine is Engine.DEEPSPEED and v("bf16_master_weights_and_grads") is True:
        if v("bf16_optimizer_states") is not True:
            notes.append("bf16_master_weights_and_grads without bf16_optimizer_states: estimated as pure bf16 "
                         "(memplan keeps the optimizer states in bf16 too)")
        return Precision.PURE_BF16
    if v("bf16") is True:
        if engine is Engine.TORCH and merged.trainer == "minicpm":
            notes.append("finetune.py loads the weights in bf16 (torch_dtype) and without DeepSpeed nothing keeps "
                         "an fp32 copy: estimated as pure bf16")
            return Precision.PURE_BF16
        return Precision.AMP_BF16
    if v("fp16") is True:
        return Precision.AMP_FP16
    return Precision.FP32


def optimizer_of(merged: Merged, engine: Engine, offloaded: bool, problems: list[Problem]) -> Optimizer:
    block = merged.value("optimizer_type")
    if engine is Engine.DEEPSPEED and block is not None:
        kind = str(block).lower()
        if kind in ("adamw", "adam"):
            return Optimizer.ADAMW
        if kind == "sgd":
            return Optimizer.SGD
        problems.append(Problem(f"DeepSpeed optimizer {block!r} is not modelled; estimated as AdamW"))
        return Optimizer.ADAMW
    optim = str(merged.value("optim", "adamw_torch_fused"))
    found = HF_OPTIMS.get(optim)
    if found is None:
        problems.append(Problem(f"optim {optim!r} is not modelled; estimated as AdamW"))
        found = Optimizer.ADAMW
    if found is Optimizer.ADAMW_FUSED and engine is Engine.TORCH:
        found = Optimizer.ADAMW
    if offloaded and found in (Optimizer.ADAMW_FUSED, Optimizer.ADAMW_FOREACH, Optimizer.ADAMW_FORLOOP):
        problems.append(Problem(f"optim {optim} with an offloaded optimizer: estimated as DeepSpeed's CPU Adam "
                                "(the same fp32 states on the host)"))
        found = Optimizer.ADAMW
    return found


def lora_targets(pattern: str, model: ModelSpec, groups: Sequence[str], problems: list[Problem]) -> tuple[str, ...]:
    """Leaf names a finetune.py ``--lora_target_modules`` regex selects. peft full-matches a string
    against each module's full name (``llm.model.layers.0.self_attn.q_proj``); a pattern that
    matches none makes peft fail, and is read as the leaf names it lists."""
    try:
        rx = re.compile(pattern)
    except re.error as exc:
        raise ProfileError(f"--lora_target_modules {pattern!r}: not a regular expression ({exc})") from None
    leaves: dict[str, None] = {}
    for g in model.groups:
        if g.name not in groups:
            continue
        for t in g.tensors:
            module = t.name.rsplit(".", 1)[0]
            if rx.fullmatch(f"{g.name}.{module}"):
                leaves[module.rsplit(".", 1)[-1]] = None
    if leaves:
        return tuple(leaves)
    named = tuple(dict.fromkeys(re.findall(r"[A-Za-z_][A-Za-z0-9_]*_proj|[A-Za-z_]+_fc\d?|fc\d", pattern)))
    problems.append(Problem(f"--lora_target_modules {pattern!r} matches no module by peft's rule (a full match "
                            f"of the whole name, e.g. llm.model.layers.0.self_attn.q_proj): finetune.py would "
                            f"stop with 'Target modules ... not found'; read as {', '.join(named) or 'nothing'}"))
    if not named:
        raise ProfileError(f"--lora_target_modules {pattern!r} names no linear layer")
    return named


def lora_dropout(merged: Merged) -> float:
    """The run's ``lora_dropout`` (the file's, else its trainer's default), a probability.

    Raises:
        ProfileError: outside [0, 1) (peft's ``nn.Dropout`` refuses it), one line naming the file.
    """
    got = merged.settings["lora_dropout"]
    p = float(got.value)
    if not 0 <= p < 1:
        raise ProfileError(f"{got.file}: {got.key} {p:g}: a dropout probability is at least 0 and below 1")
    return p


def minicpm_groups(merged: Merged, model: ModelSpec, problems: list[Problem]) -> dict[str, Any]:
    """finetune.py: no audio or TTS; --tune_vision / --tune_llm freeze whole modules; the resampler
    always trains; LoRA also trains embed_tokens and the resampler (and vpm with --tune_vision)."""
    v = merged.value
    names = {g.name for g in model.groups}
    without = tuple(g for g in MINICPM_NOT_BUILT if g in names)
    if v("use_lora"):
        lora_groups = tuple(g for g in ("llm",) if g in names)
        targets = lora_targets(str(v("lora_target")), model, lora_groups, problems)
        train = tuple(t for t in ("llm.embed_tokens", "resampler") if t.split(".")[0] in names)
        if v("tune_vision") and "vpm" in names:
            train += ("vpm",)
        if v("lora_layers_to_transform") is not None:
            problems.append(Problem("--lora_layers_to_transform: adapters in some layers only; every layer counted"))
        return dict(without=without, train=train, lora=LoraOptions(rank=v("lora_rank"), targets=targets,
                                                                   groups=lora_groups, dropout=lora_dropout(merged)))
    freeze = tuple(g for g, flag in (("vpm", "tune_vision"), ("llm", "tune_llm")) if g in names and not v(flag))
    return dict(without=without, freeze=freeze)


def llamafactory_groups(merged: Merged, model: ModelSpec, problems: list[Problem]) -> dict[str, Any]:
    """LLaMA-Factory: full tuning freezes the roles its freeze_* flags name; LoRA puts adapters in
    every role not frozen and trains only them and ``additional_target`` (model/adapter.py)."""
    v = merged.value
    minicpmo = "tts" in {g.name for g in model.groups}
    roles = {g.name: (LF_MINICPMO_ROLES.get(g.name) if minicpmo else None) or LF_ROLE_OF_KIND.get(g.kind, "language")
             for g in model.groups}
    without = ("tts",) if minicpmo else ()  # model/patcher.py: init_audio True, init_tts False for minicpmo
    frozen_roles = {role for role, flag in (("vision", "freeze_vision_tower"), ("projector",
                    "freeze_multi_modal_projector"), ("language", "freeze_language_model")) if v(flag)}
    if len(set(roles.values())) == 1:
        frozen_roles = set()  # not a composite model: LLaMA-Factory's freeze flags do not apply
    kind = v("finetuning_type")
    if kind == "full":
        freeze = tuple(g for g, r in roles.items() if r in frozen_roles and g not in without)
        return dict(without=without, freeze=freeze)
    if kind != "lora":
        raise ProfileError(f"finetuning_type {kind!r}: memplan estimates full and lora only (freeze trains "
                           f"the last {v('freeze_trainable_layers', 2)} layers, which its groups cannot express)")
    groups = tuple(g for g, r in roles.items() if r not in frozen_roles and g not in without)
    target = str(v("lora_target"))
    targets = ("all-linear",) if target == "all" else tuple(t.strip() for t in target.split(",") if t.strip())
    extra = v("lora_modules_to_save") or v("additional_target")  # the key map's name, or the raw key
    train: tuple[str, ...] | None = None
    if extra:
        names = [t.strip() for t in str(extra).split(",") if t.strip()]
        part_of = {"embed_tokens": "llm.embed_tokens", "lm_head": "llm.lm_head"}
        train = tuple(part_of.get(n, n) for n in names)
    projectors = [g for g, r in roles.items() if r == "projector" and g not in without]
    if "projector" not in frozen_roles and projectors and not set(projectors) <= set(train or ()):
        problems.append(Problem("LLaMA-Factory's LoRA trains the projector only through adapters that match "
                                "lora_target or additional_target; freeze_multi_modal_projector false alone "
                                "does not train it fully"))
    return dict(without=without, train=train, lora=LoraOptions(rank=v("lora_rank"), targets=targets, groups=groups,
                                                               dropout=lora_dropout(merged)))
