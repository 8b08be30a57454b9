"""The real parsers the written files must pass: DeepSpeed's config class, HF's TrainingArguments
and HF Trainer's own resolution of DeepSpeed "auto" values (shared by the tune and explain tests).
"""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any
from unittest import mock


def deepspeed_parse(config: dict[str, Any], world_size: int) -> Any:
    """DeepSpeed's own ``DeepSpeedConfig`` on ``config`` as rank 0 of ``world_size`` would parse
    it (its batch-size arithmetic asks torch.distributed for the world size; we answer)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed.comm as dist
    from deepspeed.runtime.config import DeepSpeedConfig

    with mock.patch.object(dist, "get_rank", return_value=0), \
            mock.patch.object(dist, "get_world_size", return_value=world_size):
        return DeepSpeedConfig(config)


def training_arguments(args: dict[str, Any], plan_dir: str | None = None) -> Any:
    """``TrainingArguments`` from a training_args.json dict, through HF's own parser, without
    touching DeepSpeed (its ``deepspeed`` field is checked separately). The files are for a GPU
    machine: HF's check that bf16 runs on this machine's GPU is answered yes."""
    from transformers import HfArgumentParser, TrainingArguments

    doc = {k: v for k, v in args.items() if k != "deepspeed"}
    with mock.patch("transformers.training_args.is_torch_bf16_gpu_available", return_value=True):
        (parsed,) = HfArgumentParser(TrainingArguments).parse_dict(doc, allow_extra_keys=False)
    return parsed


def hf_resolve(ds_config: dict[str, Any], args: Any, world_size: int, hidden_size: int,
               num_training_steps: int = 100) -> dict[str, Any]:
    """What HF Trainer makes of a DeepSpeed config: ``trainer_config_process`` and
    ``trainer_config_finalize`` (transformers integrations/deepspeed.py) fill "auto" values and
    raise on explicit values that disagree with the TrainingArguments."""
    import copy

    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    class _Args:
        def __init__(self, inner: Any) -> None:
            self._inner = inner

        def __getattr__(self, name: str) -> Any:
            return getattr(self._inner, name)

        @property
        def world_size(self) -> int:
            return world_size

    hf = HfTrainerDeepSpeedConfig(copy.deepcopy(ds_config))
    wrapped = _Args(args)
    hf.trainer_config_process(wrapped)
    model = SimpleNamespace(config=SimpleNamespace(hidden_size=hidden_size))
    hf.trainer_config_finalize(wrapped, model, num_training_steps)
    return hf.config
