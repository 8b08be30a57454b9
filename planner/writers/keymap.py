"""The key map: every plan setting, and the key each trainer calls it by.

Sixth stage of the flow (plan -> **writers**). `settings` turns a plan into one flat dict of
values; `KEYMAP` says under which key each value goes into a DeepSpeed JSON, HF
``TrainingArguments``, a LLaMA-Factory YAML and MiniCPM-o's ``finetune.py`` flags. Every writer
reads values only through this table, so two files can never disagree about a batch size, and
`memplan explain` reads the same table backwards. docs/trainer-keys.md cites each key's source.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from planner.plan import Plan
from planner.workload.options import Engine, Offload, Optimizer, Precision, ZeroStage


@dataclass(frozen=True)
class Key:
    """One setting and its name in each trainer's files (None: that trainer has no such key).

    Attributes:
        setting: our name, a key of `settings`.
        deepspeed: dotted path in the DeepSpeed JSON.
        hf: ``TrainingArguments`` field.
        llamafactory: LLaMA-Factory YAML key.
        minicpm: MiniCPM-o ``finetune.py`` flag, without the dashes.
        auto: HF Trainer fills it when the DeepSpeed JSON says ``"auto"``
            (transformers integrations/deepspeed.py, ``trainer_config_process`` / ``_finalize``).
    """

    setting: str
    deepspeed: str | None = None
    hf: str | None = None
    llamafactory: str | None = None
    minicpm: str | None = None
    auto: bool = False


KEYMAP: tuple[Key, ...] = (
    # what runs, on what data, where it writes
    Key("model_name_or_path", llamafactory="model_name_or_path", minicpm="model_name_or_path"),
    Key("data_path", minicpm="data_path"),
    Key("output_dir", hf="output_dir", llamafactory="output_dir", minicpm="output_dir"),
    # batch
    Key("micro_batch", "train_micro_batch_size_per_gpu", "per_device_train_batch_size",
        "per_device_train_batch_size", "per_device_train_batch_size", auto=True),
    Key("grad_accum", "gradient_accumulation_steps", "gradient_accumulation_steps",
        "gradient_accumulation_steps", "gradient_accumulation_steps", auto=True),
    Key("global_batch", "train_batch_size", auto=True),
    # sample content
    Key("seq_len", llamafactory="cutoff_len", minicpm="model_max_length"),
    Key("max_slice_nums", minicpm="max_slice_nums"),
    # precision
    Key("bf16", "bf16.enabled", "bf16", "bf16", "bf16", auto=True),
    Key("fp16", "fp16.enabled", "fp16", "fp16", "fp16", auto=True),
    Key("pure_bf16", llamafactory="pure_bf16"),
    Key("bf16_master_weights_and_grads", "bf16.bf16_master_weights_and_grads"),
    Key("bf16_optimizer_states", "bf16.bf16_optimizer_states"),
    # memory levers of the step
    # transformers 5 renamed gradient_checkpointing[_kwargs] to activation_checkpointing[_kwargs] (the old
    # names are deprecated aliases); MiniCPM's script runs on its pinned transformers 4.x.
    Key("gradient_checkpointing", hf="activation_checkpointing", minicpm="gradient_checkpointing"),
    Key("gradient_checkpointing_kwargs", hf="activation_checkpointing_kwargs"),
    Key("disable_gradient_checkpointing", llamafactory="disable_gradient_checkpointing"),
    Key("flash_attn", llamafactory="flash_attn"),
    # DeepSpeed ZeRO
    Key("deepspeed", hf="deepspeed", llamafactory="deepspeed", minicpm="deepspeed"),
    Key("zero_stage", "zero_optimization.stage"),
    Key("offload_optimizer", "zero_optimization.offload_optimizer.device"),
    Key("offload_optimizer_pin_memory", "zero_optimization.offload_optimizer.pin_memory"),
    Key("offload_optimizer_nvme_path", "zero_optimization.offload_optimizer.nvme_path"),
    Key("offload_param", "zero_optimization.offload_param.device"),
    Key("offload_param_pin_memory", "zero_optimization.offload_param.pin_memory"),
    Key("offload_param_nvme_path", "zero_optimization.offload_param.nvme_path"),
    Key("overlap_comm", "zero_optimization.overlap_comm"),
    Key("contiguous_gradients", "zero_optimization.contiguous_gradients"),
    Key("reduce_bucket_size", "zero_optimization.reduce_bucket_size", auto=True),
    Key("stage3_prefetch_bucket_size", "zero_optimization.stage3_prefetch_bucket_size", auto=True),
    Key("stage3_param_persistence_threshold", "zero_optimization.stage3_param_persistence_threshold", auto=True),
    Key("stage3_max_live_parameters", "zero_optimization.stage3_max_live_parameters"),
    Key("stage3_max_reuse_distance", "zero_optimization.stage3_max_reuse_distance"),
    Key("sub_group_size", "zero_optimization.sub_group_size"),
    Key("stage3_gather_16bit_weights_on_model_save", "zero_optimization.stage3_gather_16bit_weights_on_model_save"),
    # optimizer and schedule
    Key("optimizer_type", "optimizer.type"),
    Key("optim", hf="optim", llamafactory="optim", minicpm="optim"),
    Key("learning_rate", "optimizer.params.lr", "learning_rate", "learning_rate", "learning_rate", auto=True),
    Key("adam_betas", "optimizer.params.betas", auto=True),
    Key("adam_epsilon", "optimizer.params.eps", "adam_epsilon", auto=True),
    Key("weight_decay", "optimizer.params.weight_decay", "weight_decay", "weight_decay", "weight_decay", auto=True),
    Key("max_grad_norm", "gradient_clipping", "max_grad_norm", "max_grad_norm", "max_grad_norm", auto=True),
    Key("lr_scheduler_type", hf="lr_scheduler_type", llamafactory="lr_scheduler_type", minicpm="lr_scheduler_type"),
    # transformers 5 folds warmup_ratio into warmup_steps (a float below 1 is a ratio); MiniCPM's script
    # (transformers 4.44) and LLaMA-Factory 0.9 still take warmup_ratio.
    Key("warmup_ratio", hf="warmup_steps", llamafactory="warmup_ratio", minicpm="warmup_ratio"),
    Key("num_train_epochs", hf="num_train_epochs", llamafactory="num_train_epochs", minicpm="num_train_epochs"),
    Key("max_steps", hf="max_steps", llamafactory="max_steps", minicpm="max_steps"),
    Key("logging_steps", hf="logging_steps", llamafactory="logging_steps", minicpm="logging_steps"),
    Key("save_strategy", hf="save_strategy", llamafactory="save_strategy", minicpm="save_strategy"),
    Key("save_steps", hf="save_steps", llamafactory="save_steps", minicpm="save_steps"),
    Key("save_total_limit", hf="save_total_limit", llamafactory="save_total_limit", minicpm="save_total_limit"),
    Key("seed", hf="seed", llamafactory="seed", minicpm="seed"),
    Key("report_to", hf="report_to", llamafactory="report_to", minicpm="report_to"),
    Key("remove_unused_columns", hf="remove_unused_columns", minicpm="remove_unused_columns"),
    # what trains
    Key("finetuning_type", llamafactory="finetuning_type"),
    Key("use_lora", minicpm="use_lora"),
    Key("lora_rank", llamafactory="lora_rank", minicpm="lora_r"),
    Key("lora_alpha", llamafactory="lora_alpha", minicpm="lora_alpha"),
    Key("lora_dropout", llamafactory="lora_dropout", minicpm="lora_dropout"),
    Key("lora_target", llamafactory="lora_target", minicpm="lora_target_modules"),
    Key("lora_modules_to_save", llamafactory="additional_target"),
    Key("tune_vision", minicpm="tune_vision"),
    Key("tune_llm", minicpm="tune_llm"),
    Key("freeze_vision_tower", llamafactory="freeze_vision_tower"),
    Key("freeze_multi_modal_projector", llamafactory="freeze_multi_modal_projector"),
    Key("freeze_language_model", llamafactory="freeze_language_model"),
)

BY_SETTING = {k.setting: k for k in KEYMAP}

DS_OFFLOAD_NONE = "none"

HF_OPTIM = {
    Optimizer.ADAMW: "adamw_torch_fused",
    Optimizer.ADAMW_FUSED: "adamw_torch_fused",
    Optimizer.ADAMW_FOREACH: "adamw_torch",
    Optimizer.ADAMW_FORLOOP: "adamw_torch",
    Optimizer.ADAMW_8BIT: "adamw_bnb_8bit",
    Optimizer.ADAFACTOR: "adafactor",
    Optimizer.SGD: "sgd",
}
"""Our optimizer -> transformers ``OptimizerNames`` (``adamw_torch`` is torch.optim.AdamW with
its default foreach implementation on a GPU; forloop has no name of its own)."""

ADAM_BETAS = (0.9, 0.999)
ADAM_EPSILON = 1e-8
"""HF ``TrainingArguments`` defaults (adam_beta1, adam_beta2, adam_epsilon); written into the
DeepSpeed optimizer block so explicit values match what HF would fill in for "auto"."""

STAGE3_MAX_REUSE_DISTANCE = 1_000_000_000
"""MiniCPM-o's ds_config_zero3.json (DeepSpeed's default is the same, 1e9)."""


ROLE_OF_KIND = {
    "decoder": "llm",
    "siglip_vision": "vision",
    "whisper_encoder": "vision",
    "chattts": "vision",
    "resampler": "projector",
    "mlp_projector": "projector",
    "vision_tower": "vision",  # a config.json's vision tower (profile.hf_groups)
    "projector": "projector",  # and its projector
}
"""What MiniCPM's and LLaMA-Factory's freeze flags call a group of each kind. LLaMA-Factory's
MiniCPM-o registration puts vpm, apm and tts in its "vision tower" set and the resampler as its
projector (docs/trainer-keys.md); MiniCPM's ``--tune_vision`` covers vpm."""


def roles(plan: Plan) -> dict[str, str]:
    """Role -> how it trains: ``full``, ``frozen``, ``lora`` or ``mixed`` (its groups differ, or
    one trains only in part)."""
    out: dict[str, set[str]] = {}
    for g in plan.groups:
        out.setdefault(ROLE_OF_KIND.get(g.kind, "llm"), set()).add(g.training)
    return {role: modes.pop() if len(modes) == 1 else "mixed" for role, modes in out.items()}


def _flag(mode: str | None, value_if_full: bool) -> bool | None:
    if mode in ("full", "frozen"):
        return (mode == "full") == value_if_full
    return None


def _modules_to_save(plan: Plan) -> str | None:
    names = [g.name for g in plan.groups if g.training == "full"]
    names += [t.partition(".")[2] for t in plan.options.train or () if "." in t]
    return ",".join(names) or None


def settings(plan: Plan) -> dict[str, Any]:
    """Every setting of the plan by our name (the first column of `KEYMAP`); None: not set, or
    not expressible by a role flag (a group trained in part: the writers say so)."""
    o, w, t, z = plan.options, plan.workload, plan.trainer, plan.zero
    ds = o.engine is Engine.DEEPSPEED
    stage3 = ds and o.zero is ZeroStage.PARAMETERS
    pure = o.precision is Precision.PURE_BF16
    half_ds_bf16 = o.precision in (Precision.AMP_BF16, Precision.PURE_BF16)
    role = roles(plan)
    ds_optimizer = ds and o.optimizer is Optimizer.ADAMW
    lora = o.lora
    nvme = t.nvme_path
    return {
        "model_name_or_path": plan.model.path,
        "data_path": t.data_path,
        "output_dir": t.output_dir,
        "micro_batch": w.micro_batch,
        "grad_accum": w.grad_accum,
        "global_batch": plan.global_batch,
        "seq_len": w.seq_len,
        "max_slice_nums": w.max_slice_nums if w.images else None,
        # HF's bf16 flag means autocast (or DeepSpeed's bf16 engine); plain-torch pure bf16 loads
        # bf16 weights and runs without autocast, so the flag is off there.
        "bf16": half_ds_bf16 if ds else o.precision is Precision.AMP_BF16,
        "fp16": o.precision is Precision.AMP_FP16,
        "pure_bf16": pure or None,
        "bf16_master_weights_and_grads": True if ds and pure else None,
        "bf16_optimizer_states": True if ds and pure else None,
        "gradient_checkpointing": o.grad_ckpt,
        "gradient_checkpointing_kwargs": {"use_reentrant": False} if o.grad_ckpt else None,
        "disable_gradient_checkpointing": not o.grad_ckpt,
        "flash_attn": {"sdpa": "sdpa", "eager": "disabled", "flash_attention_2": "fa2"}[o.attn.value],
        "deepspeed": "ds_config.json" if ds else None,
        "zero_stage": int(o.zero) if ds else None,
        "offload_optimizer": o.offload_optimizer.value if ds and o.zero >= ZeroStage.OPTIMIZER_STATES else None,
        "offload_optimizer_pin_memory": o.pin_memory if ds and o.offload_optimizer is not Offload.NONE else None,
        "offload_optimizer_nvme_path": nvme if o.offload_optimizer is Offload.NVME else None,
        "offload_param": o.offload_param.value if stage3 else None,
        "offload_param_pin_memory": o.pin_memory if stage3 and o.offload_param is not Offload.NONE else None,
        "offload_param_nvme_path": nvme if o.offload_param is Offload.NVME else None,
        "overlap_comm": (True if stage3 else z["overlap_comm"]) if ds and o.zero >= 1 else None,
        "contiguous_gradients": z["contiguous_gradients"] if ds and o.zero >= 1 else None,
        "reduce_bucket_size": z["reduce_bucket_size"] if ds and o.zero >= 1 else None,
        "stage3_prefetch_bucket_size": z["prefetch_bucket_size"] if stage3 else None,
        "stage3_param_persistence_threshold": z["param_persistence_threshold"] if stage3 else None,
        "stage3_max_live_parameters": z["max_live_parameters"] if stage3 else None,
        "stage3_max_reuse_distance": STAGE3_MAX_REUSE_DISTANCE if stage3 else None,
        "sub_group_size": z["sub_group_size"] if stage3 else None,
        "stage3_gather_16bit_weights_on_model_save": True if stage3 else None,
        # DeepSpeed builds its own AdamW (FusedAdam, or CPU Adam when offloaded) from an optimizer
        # block; other optimizers come from HF Trainer as a client optimizer, without the block.
        "optimizer_type": "AdamW" if ds_optimizer else None,
        "optim": HF_OPTIM[o.optimizer],
        "learning_rate": t.learning_rate,
        "adam_betas": list(ADAM_BETAS) if ds_optimizer else None,
        "adam_epsilon": ADAM_EPSILON,
        "weight_decay": t.weight_decay,
        "max_grad_norm": t.max_grad_norm,
        "lr_scheduler_type": t.lr_scheduler_type,
        "warmup_ratio": t.warmup_ratio,
        "num_train_epochs": t.num_train_epochs,
        "max_steps": t.max_steps,
        "logging_steps": t.logging_steps,
        "save_strategy": "steps",
        "save_steps": t.save_steps,
        "save_total_limit": t.save_total_limit,
        "seed": t.seed,
        "report_to": "none",
        "remove_unused_columns": False,
        "finetuning_type": "lora" if lora else "full",
        "use_lora": bool(lora),
        "lora_rank": lora.rank if lora else None,
        "lora_alpha": (t.lora_alpha or lora.rank) if lora else None,
        # the dropout the plan was estimated with (an adapter's dropped input and mask cost memory)
        "lora_dropout": lora.dropout if lora else None,
        "lora_target": ",".join(plan.lora_modules) if lora else None,
        # peft modules_to_save: what trains fully beside the adapters (LLaMA-Factory's
        # additional_target; its freeze_* flags do not make a module trainable under LoRA,
        # model/adapter.py). MiniCPM's finetune.py fixes its own list (embed_tokens, resampler).
        "lora_modules_to_save": _modules_to_save(plan) if lora else None,
        "tune_vision": _flag(role.get("vision"), True),
        # with LoRA the LLM's own weights stay frozen: finetune.py wants --tune_llm false then
        "tune_llm": False if role.get("llm") == "lora" else _flag(role.get("llm"), True),
        "freeze_vision_tower": _flag(role.get("vision"), False),
        "freeze_multi_modal_projector": _flag(role.get("projector"), False),
        "freeze_language_model": _flag(role.get("llm"), False),
    }
