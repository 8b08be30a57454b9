"""Recognising a file by its content and handing it to its reader: a DeepSpeed JSON, an HF
``TrainingArguments`` JSON, a LLaMA-Factory YAML (`planner.explain.readers`), or a launch script or
argument string (`planner.explain.scripts`).

Above both readers: the file is read once, checked (`planner.explain.inputs`), then dispatched.
"""

from __future__ import annotations

import re
from pathlib import Path

from planner.errors import ProfileError
from planner.explain.inputs import check_text, load_json, load_yaml, read_bounded
from planner.explain.keys import LF_MARKERS
from planner.explain.readers import Reading, read_deepspeed, read_llamafactory, read_training_args
from planner.explain.scripts import read_script

_SCRIPT_MARKERS = re.compile(r"finetune\.py|--model_max_length|--deepspeed|--per_device_train_batch_size|--tune_llm")


def read_file(path: str | Path) -> Reading:
    """Read one file, recognised by its content.

    Raises:
        ProfileError: the file cannot be read, is over a limit, is malformed, or is none of the four kinds.
    """
    path = Path(path)
    return read_text(read_bounded(path), str(path), folder=path.parent)


def read_text(text: str, name: str, folder: Path | None = None) -> Reading:
    """Read a file's text (``name`` says where it came from; ``folder`` resolves relative paths).

    Raises:
        ProfileError: malformed, over a limit, or none of the four kinds.
    """
    check_text(text, name)
    folder = folder or Path(".")
    stripped = text.lstrip()
    if stripped.startswith(("{", "[")) or name.endswith(".json"):
        doc = load_json(text, name)
        if not isinstance(doc, dict):
            raise ProfileError(f"{name}: a JSON {type(doc).__name__}, not an object of DeepSpeed or trainer keys")
        if _is_deepspeed(doc):
            return read_deepspeed(doc, name)
        if _is_training_args(doc):
            return read_training_args(doc, name, folder)
        raise ProfileError(f"{name}: a JSON object that is neither a DeepSpeed config (no zero_optimization or "
                           "train_micro_batch_size_per_gpu) nor TrainingArguments (no per_device_train_batch_size "
                           "or output_dir)")
    if _SCRIPT_MARKERS.search(text) and not name.endswith((".yaml", ".yml")):
        return read_script(text, name, folder)
    doc = load_yaml(text, name)
    if isinstance(doc, dict) and LF_MARKERS & set(doc):
        return read_llamafactory(doc, name, folder)
    if isinstance(doc, list):
        raise ProfileError(f"{name}: a YAML list, not a mapping of LLaMA-Factory keys")
    raise ProfileError(f"{name}: not a DeepSpeed JSON, TrainingArguments JSON, LLaMA-Factory YAML (stage, "
                       "finetuning_type, template) or a launch script (finetune.py, --model_max_length, --deepspeed)")


def _is_deepspeed(doc: dict) -> bool:
    return bool({"zero_optimization", "train_micro_batch_size_per_gpu", "train_batch_size"} & set(doc))


def _is_training_args(doc: dict) -> bool:
    return bool({"per_device_train_batch_size", "output_dir"} & set(doc))

