"""The built-in target's TrainingArguments: training_args.json, the command line and the DeepSpeed config merged.

Part of the train stage, used by `planner.train`. Also where a run without a GPU is set up: see
`training_arguments`.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
from pathlib import Path
from typing import Any

from planner.plan import Plan
from planner.workload.options import Precision

DS_AUTO_ON_OVERRIDE = {
    "per_device_train_batch_size": ("train_micro_batch_size_per_gpu", "train_batch_size"),
    "gradient_accumulation_steps": ("gradient_accumulation_steps", "train_batch_size"),
    "learning_rate": ("optimizer.params.lr", "scheduler.params.warmup_max_lr"),
    "weight_decay": ("optimizer.params.weight_decay",),
    "adam_beta1": ("optimizer.params.betas",),
    "adam_beta2": ("optimizer.params.betas",),
    "adam_epsilon": ("optimizer.params.eps",),
    "max_grad_norm": ("gradient_clipping",),
    "max_steps": ("scheduler.params.total_num_steps", "scheduler.params.warmup_num_steps"),
    "num_train_epochs": ("scheduler.params.total_num_steps", "scheduler.params.warmup_num_steps"),
    "warmup_ratio": ("scheduler.params.warmup_num_steps",),
    "warmup_steps": ("scheduler.params.warmup_num_steps",),
}
"""A TrainingArguments flag given on the command line -> the DeepSpeed keys that mirror it. Those
become "auto" so HF Trainer fills them from the new value instead of refusing the mismatch
(transformers integrations/deepspeed.py, ``trainer_config_process``)."""


class UsageError(ValueError):
    """A mistake on the command line or in the plan folder: one line, exit code 2."""


def _raise_usage(message: str) -> None:
    raise UsageError(message)


def hf_overrides(extra: list[str]) -> dict[str, Any]:
    """Only the TrainingArguments fields given as flags, typed by HF's own parser."""
    from transformers import HfArgumentParser, TrainingArguments

    hp = HfArgumentParser(TrainingArguments, allow_abbrev=False)
    hp.error = _raise_usage  # one line, no exit
    for action in hp._actions:
        action.default = argparse.SUPPRESS
    ns, unknown = hp.parse_known_args(extra)
    if unknown:
        raise UsageError(f"unrecognized arguments: {' '.join(unknown)} (see: python -m planner.train --help)")
    return vars(ns)


def read_json(path: Path, what: str) -> Any:
    """A JSON file of the plan folder.

    Raises:
        UsageError: missing, unreadable or not JSON.
    """
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{path} does not exist ({what}; write the folder with `memplan tune`)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: cannot read: {exc}") from None
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path}: not valid JSON: {exc.msg} (line {exc.lineno})") from None


def set_nested(doc: dict[str, Any], path: str, value: Any) -> None:
    """Replace the value at a dotted path of a DeepSpeed config, where the config has one."""
    *parents, leaf = path.split(".")
    for key in parents:
        doc = doc.get(key)
        if not isinstance(doc, dict):
            return
    if leaf in doc:
        doc[leaf] = value


def args_dict(plan: Plan, plan_dir: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """training_args.json with ``overrides`` (fields given on the command line) on top, the
    DeepSpeed config inlined as a dict.

    Raises:
        UsageError: a missing or unreadable file, or a DeepSpeed config for a plain-PyTorch plan.
    """
    cfg = read_json(plan_dir / "training_args.json", "HF TrainingArguments")
    if not isinstance(cfg, dict):
        raise UsageError(f"{plan_dir / 'training_args.json'}: expected a JSON object of TrainingArguments fields")
    cfg.update(overrides)
    ds_ref = cfg.get("deepspeed")
    if plan.deepspeed:
        ds_path = Path(ds_ref) if isinstance(ds_ref, str) else Path("ds_config.json")
        base = Path.cwd() if "deepspeed" in overrides else plan_dir  # a --deepspeed flag: where it is run
        ds = ds_ref if isinstance(ds_ref, dict) else read_json(base / ds_path, "the DeepSpeed config")
        for key in overrides:
            for path in DS_AUTO_ON_OVERRIDE.get(key, ()):
                set_nested(ds, path, "auto")
        cfg["deepspeed"] = ds
    elif ds_ref:
        raise UsageError("training_args.json names a DeepSpeed config but the plan runs plain PyTorch (engine torch)")
    if not plan.deepspeed and plan.options.precision is Precision.PURE_BF16:
        cfg["bf16"] = cfg["fp16"] = False  # bf16 weights, no autocast
    _warmup_compat(cfg)
    return cfg


def _warmup_compat(cfg: dict[str, Any]) -> None:
    """transformers 5 dropped ``warmup_ratio``: ``warmup_steps`` below 1 is the ratio now."""
    import dataclasses

    from transformers import TrainingArguments

    if "warmup_ratio" in cfg and "warmup_ratio" not in {f.name for f in dataclasses.fields(TrainingArguments)}:
        ratio = cfg.pop("warmup_ratio")
        if ratio and not cfg.get("warmup_steps"):
            if not 0 < ratio < 1:
                raise UsageError(f"warmup_ratio {ratio}: transformers 5 takes a warmup ratio below 1 only")
            cfg["warmup_steps"] = ratio


def single_process_env() -> None:
    """DeepSpeed wants a process group even for one process (HF docs: "Deployment in Notebooks")."""
    if "LOCAL_RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", str(port)))


def training_arguments(plan: Plan, cfg: dict[str, Any]) -> Any:
    """HF ``TrainingArguments`` from the merged dict; this sets up the process group, and with
    ZeRO-3 makes ``from_pretrained`` build under ``deepspeed.zero.Init`` from here on.

    Raises:
        UsageError: a field HF does not know, or a value it refuses.
    """
    import torch
    from transformers import HfArgumentParser, TrainingArguments

    if plan.deepspeed:
        single_process_env()
    if not torch.cuda.is_available():
        # accelerate gives DeepSpeed no process group without a GPU (every rank would be rank 0 of
        # 1): make its state with gloo first and have TrainingArguments use it. See planner.train.
        if plan.deepspeed:
            from accelerate import PartialState

            os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # as TrainingArguments does around it
            try:
                PartialState(backend="gloo")
            finally:
                del os.environ["ACCELERATE_USE_DEEPSPEED"]
            cfg["accelerator_config"] = {**(cfg.get("accelerator_config") or {}), "use_configured_state": True}
        else:
            cfg["use_cpu"] = True
    try:
        (args,) = HfArgumentParser(TrainingArguments).parse_dict(cfg)
    except ValueError as exc:  # unknown keys, a DeepSpeed value that contradicts a flag...
        raise UsageError("TrainingArguments: " + " ".join(str(exc).split())) from None
    return args
