"""Writers: a plan as each trainer's configuration, every value taken through `keymap.KEYMAP`.

Pure functions ``plan -> dict`` (or a list of flags). A plan a trainer cannot express raises
`NotExpressible` with the reason; the folder writer leaves that file out and says why.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

from planner.plan import Plan
from planner.workload.options import Engine, Offload, Precision, ZeroStage
from planner.workload.reference import MINICPM_BUILDS
from planner.writers.keymap import KEYMAP, roles, settings

DS_STEPS_PER_PRINT = 10
"""DeepSpeed prints its own step log this often (its default 10)."""


LLAMAFACTORY_TEMPLATES = {
    "minicpm-o": "minicpm_o",
    "minicpm-v": "minicpm_v",
    "minicpm-llama3-v": "minicpm_v",
    "qwen2": "qwen",
    "qwen3": "qwen3",
    "llama": "llama3",
    "mistral": "mistral",
    "gemma": "gemma",
    "phi3": "phi",
}
"""Profile-name prefix or LLM model_type -> LLaMA-Factory chat template (its template.py)."""


class NotExpressible(ValueError):
    """The plan has a setting this trainer cannot be told."""


def _nest(doc: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    for p in parents:
        doc = doc.setdefault(p, {})
    doc[leaf] = value


def deepspeed_config(plan: Plan, auto: bool = False) -> dict[str, Any]:
    """The DeepSpeed JSON: explicit values, or with ``auto`` those HF Trainer fills in as "auto"
    (the same values once HF resolves them from training_args.json and the model's hidden size).

    Raises:
        NotExpressible: the plan runs without DeepSpeed.
    """
    if plan.options.engine is not Engine.DEEPSPEED:
        raise NotExpressible("the plan runs plain PyTorch (DDP), not DeepSpeed")
    values = settings(plan)
    doc: dict[str, Any] = {}
    for key in KEYMAP:
        if not key.deepspeed or values[key.setting] is None:
            continue
        if key.deepspeed.startswith("optimizer.") and values["optimizer_type"] is None:
            continue  # HF Trainer builds the optimizer and hands it to DeepSpeed: no block
        _nest(doc, key.deepspeed, "auto" if auto and key.auto else values[key.setting])
    doc["steps_per_print"] = DS_STEPS_PER_PRINT
    doc["wall_clock_breakdown"] = False
    return doc


def training_args(plan: Plan) -> dict[str, Any]:
    """HF ``TrainingArguments`` fields as JSON (``deepspeed`` is relative to the plan folder)."""
    values = settings(plan)
    return {key.hf: values[key.setting] for key in KEYMAP if key.hf and values[key.setting] is not None}


def _template(plan: Plan) -> str:
    name = plan.model.name.lower()
    for prefix, template in LLAMAFACTORY_TEMPLATES.items():
        if name.startswith(prefix):
            return template
    return LLAMAFACTORY_TEMPLATES.get(plan.model.model_type or "", "default")


def llamafactory_config(plan: Plan) -> dict[str, Any]:
    """A LLaMA-Factory training YAML (as a dict) for ``llamafactory-cli train``.

    Raises:
        NotExpressible: pure bf16 with ZeRO-3 (LLaMA-Factory refuses it), or groups trained in a
            way its three freeze flags cannot say.
    """
    o = plan.options
    if o.precision is Precision.PURE_BF16 and plan.zero3:
        raise NotExpressible("LLaMA-Factory refuses pure_bf16 together with DeepSpeed ZeRO-3")
    if o.offload_optimizer is Offload.NVME or o.offload_param is Offload.NVME:
        pass  # the DeepSpeed file carries it; LLaMA-Factory passes the file through
    mixed = [r for r, mode in roles(plan).items() if mode in ("mixed", "partial")]
    if mixed:
        raise NotExpressible(f"its freeze flags cannot train only part of the {', '.join(mixed)}")
    if o.lora is not None and roles(plan).get("llm") != "lora":
        raise NotExpressible("LoRA outside the language model")
    values = settings(plan)
    data = PurePosixPath(plan.trainer.data_path)
    doc: dict[str, Any] = {
        "model_name_or_path": values["model_name_or_path"],
        "trust_remote_code": True,
        "stage": "sft",
        "do_train": True,
        "template": _template(plan),
        "dataset": data.stem,
        "dataset_dir": str(data.parent),
    }
    for key in KEYMAP:
        if key.llamafactory and values[key.setting] is not None and key.llamafactory not in doc:
            doc[key.llamafactory] = values[key.setting]
    # pure_bf16 with DeepSpeed keeps bf16: true: HF Trainer requires DeepSpeed's bf16.enabled to
    # match it (checked by LLaMA-Factory's own parser, tests/writers/test_llamafactory.py); without
    # DeepSpeed the keymap already leaves HF's bf16 (autocast) off.
    return doc


def minicpm_flags(plan: Plan) -> list[str]:
    """The flags of MiniCPM-o / MiniCPM-V ``finetune.py`` (HF-style ``--key value``).

    Raises:
        NotExpressible: the script cannot run this plan: it needs DeepSpeed, builds exactly llm,
            vpm and resampler, always trains the resampler, and freezes whole modules only.
    """
    o = plan.options
    built = {g.name for g in plan.groups}
    if o.engine is not Engine.DEEPSPEED:
        raise NotExpressible("MiniCPM's script is launched with a DeepSpeed config")
    if built != MINICPM_BUILDS:
        raise NotExpressible(f"MiniCPM's finetune.py builds {', '.join(sorted(MINICPM_BUILDS))}; "
                             f"this plan builds {', '.join(sorted(built))}")
    modes = {g.name: g.training for g in plan.groups}
    if modes["resampler"] != "full":
        raise NotExpressible("MiniCPM's finetune.py always trains the resampler fully")
    if modes["vpm"] not in ("full", "frozen"):
        raise NotExpressible("MiniCPM's --tune_vision trains or freezes the whole vision tower")
    if o.lora is None and modes["llm"] not in ("full", "frozen"):
        raise NotExpressible("MiniCPM's --tune_llm trains or freezes the whole LLM")
    if o.lora is not None:
        # finetune.py with --use_lora: modules_to_save = embed_tokens and resampler.
        llm = next(g for g in plan.groups if g.name == "llm")
        if llm.training != "lora" or not _lora_keeps_embeddings(plan):
            raise NotExpressible("MiniCPM's LoRA also trains a full copy of llm.embed_tokens; "
                                 "this plan does not")
    if o.precision is Precision.PURE_BF16 and o.zero is ZeroStage.DISABLED:
        raise NotExpressible("pure bf16 needs ZeRO 1-3 in a DeepSpeed config")
    values = settings(plan)
    flags: list[str] = []
    for key in KEYMAP:
        value = values[key.setting]
        if not key.minicpm or value is None:
            continue
        if key.setting in ("lora_rank", "lora_alpha", "lora_dropout", "lora_target") and o.lora is None:
            continue
        if key.setting == "lora_target":
            # finetune.py passes a regex to peft (fullmatch on module names); scope it to the LLM's
            # layers as its default does, or the vision tower's q/k/v projections would match too.
            value = r"llm\..*layers\.\d+\..*\.(" + "|".join(value.split(",")) + ")"
        flags += [f"--{key.minicpm}", _flag_value(value)]
    flags += ["--llm_type", _llm_type(plan), "--do_train"]
    return flags


def _lora_keeps_embeddings(plan: Plan) -> bool:
    return plan.options.train is not None and "llm.embed_tokens" in plan.options.train


def _llm_type(plan: Plan) -> str:
    return "llama3" if (plan.model.model_type or "") == "llama" else "qwen"


def _flag_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
