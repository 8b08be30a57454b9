"""The real transformers model of a config.json, built on the meta device (no weights, no
download), its parameters listed and grouped.

Part of the profile stage; the one module of it that imports torch and transformers, and only
when a local config.json is not in the cache (`hf_config`). A transformers model is built with
the class transformers has for causal-LM training (``AutoModelForImageTextToText`` first for a
vision-language config, then ``AutoModelForCausalLM``), never a headless ``AutoModel``; a model
that ships its own code is built from the files in its folder, only when the user trusts them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from planner.errors import ProfileError, require_extra
from planner.profile.architectures import TensorKind
from planner.profile.catalog import Group
from planner.profile.hf_groups import RawParam, image_rule, make_groups
from planner.profile.remote_code import RemoteCode, remote_refusal


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _kind(module: object, pname: str) -> TensorKind:
    import torch.nn as nn

    if pname == "bias":
        return TensorKind.BIAS
    if isinstance(module, nn.Linear):
        return TensorKind.LINEAR
    if isinstance(module, nn.Embedding):
        return TensorKind.EMBEDDING
    if isinstance(module, nn.modules.conv._ConvNd):
        return TensorKind.CONV
    if "norm" in type(module).__name__.lower():
        return TensorKind.NORM
    return TensorKind.OTHER


def _import() -> tuple[Any, Any]:
    """torch and transformers, offline (a local folder needs nothing from the hub)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    require_extra("reading a local config.json", "torch", "transformers")
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    return torch, transformers


def _native_config(transformers: Any, raw: dict[str, Any], where: str) -> Any:
    """transformers' config class for ``raw``.

    Raises:
        ProfileError: an unknown model_type (with close matches), or a field transformers refuses.
    """
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    mtype = raw["model_type"]
    if mtype not in CONFIG_MAPPING_NAMES:
        import difflib

        near = difflib.get_close_matches(str(mtype), CONFIG_MAPPING_NAMES, n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(near)}? " if near else ""
        raise ProfileError(f"{where}: transformers {transformers.__version__} knows no model_type {mtype!r} "
                           f"({hint}a model with its own code names it in auto_map)")
    try:
        return transformers.AutoConfig.for_model(**raw)
    except Exception as exc:  # transformers and huggingface_hub raise many kinds for a bad field
        raise ProfileError(f"{where}: transformers cannot read it: {_first_line(exc)}") from None


def _native_model(torch: Any, transformers: Any, config: Any, where: str) -> Any:
    """The model transformers trains for this config, on the meta device.

    Raises:
        ProfileError: transformers has no causal-LM or image-text-to-text class for it, or fails
            to build it.
    """
    autos = [transformers.AutoModelForCausalLM]
    if "vision_config" in getattr(config, "sub_configs", {}):
        autos.insert(0, transformers.AutoModelForImageTextToText)
    errors = []
    for auto in autos:
        if type(config) not in auto._model_mapping:
            continue
        try:
            with torch.device("meta"):
                return auto.from_config(config)
        except Exception as exc:  # transformers raises many kinds for a config it cannot build
            errors.append(_first_line(exc))
    if errors:
        raise ProfileError(f"{where}: transformers cannot build model_type {config.model_type!r}: {errors[-1]}")
    raise ProfileError(f"{where}: memplan plans causal-LM fine-tuning, and transformers has no causal-LM or "
                       f"image-text-to-text class for model_type {config.model_type!r}")


def _remote_model(torch: Any, transformers: Any, code: RemoteCode, where: str) -> tuple[Any, Any]:
    """(config, model) built from the folder's own code, on the meta device.

    Raises:
        ProfileError: the code needs a package that is not installed, or fails to build.
    """
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    folder = str(code.folder)
    try:
        if code.config_ref:
            config_cls = get_class_from_dynamic_module(code.config_ref, folder, local_files_only=True)
            config = config_cls.from_pretrained(folder, local_files_only=True)
        else:
            config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
        model_cls = get_class_from_dynamic_module(code.model_ref, folder, local_files_only=True)
    except ImportError as exc:  # check_imports: "requires the following packages that were not found"
        raise ProfileError(f"{where}: its modeling code cannot be imported: {_first_line(exc)}") from None
    except Exception as exc:  # the user's code may raise anything while it is imported
        raise ProfileError(f"{where}: its own code ({code.model_ref}) fails to load: {type(exc).__name__}: "
                           f"{_first_line(exc)}") from None
    try:
        with torch.device("meta"):
            build = getattr(model_cls, "_from_config", None)
            model = build(config) if build is not None else model_cls(config)
    except Exception as exc:  # the user's code may raise anything on the meta device
        raise ProfileError(f"{where}: its own code ({code.model_ref}) fails to build on the meta device: "
                           f"{type(exc).__name__}: {_first_line(exc)}") from None
    return config, model


def _llm_prefix(model: Any) -> str | None:
    """The module path holding the input embedding (the LLM body), or None."""
    try:
        emb = model.get_input_embeddings()
    except Exception:  # a remote model may not implement it
        return None
    for name, module in model.named_modules():
        if module is emb:
            return name.rsplit(".", 1)[0] if "." in name else ""
    return None


def _text_config(transformers: Any, model: Any, config: Any, prefix: str | None) -> dict[str, Any]:
    """The LLM's config fields, with the model_type of the class that really runs it.

    A remote model's LLM may carry the whole model's config (MiniCPM-V's ``Qwen2ForCausalLM(config)``
    with model_type ``minicpmv``): the class name gives its transformers model_type back.
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES

    text = config.get_text_config()
    cfg = text.to_dict()
    types_of: dict[str, set[str]] = {}
    for names in (MODEL_MAPPING_NAMES, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        for mtype, cls in names.items():
            if isinstance(cls, str):
                types_of.setdefault(cls, set()).add(mtype)
    path = prefix.split(".") if prefix else []
    for depth in range(len(path), -1, -1):
        try:
            module = model.get_submodule(".".join(path[:depth]))
        except AttributeError:
            continue
        mtypes = types_of.get(type(module).__name__)
        if mtypes:
            own = getattr(module, "config", None)
            if own is not None and own is not config and hasattr(own, "to_dict"):
                cfg = own.to_dict()
            if cfg.get("model_type") not in mtypes:
                cfg["model_type"] = sorted(mtypes)[0]
            break
    return cfg


def build_groups(cfg_path: Path, raw: dict[str, Any], code: RemoteCode | None, trust_remote_code: bool,
                 processor: dict[str, Any] | None, processor_name: str) -> tuple[Group, ...]:
    """The groups of the model ``raw`` describes, from the real class on the meta device.

    Args:
        cfg_path: the config.json (for messages).
        raw: its content.
        code: the code its ``auto_map`` names when the user trusts it (``--trust-remote-code``), else None.
        trust_remote_code: the user passed ``--trust-remote-code``.
        processor: the folder's preprocessor_config.json, or None.
        processor_name: that file's path, for messages and the image rule's source.

    Raises:
        ProfileError: one line: torch or transformers missing, remote code without the flag,
            an unknown model_type, a field transformers refuses, a model it cannot build.
    """
    where = str(cfg_path)
    torch, transformers = _import()
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if "auto_map" in raw and not trust_remote_code and raw["model_type"] not in CONFIG_MAPPING_NAMES:
        raise ProfileError(remote_refusal(where, raw))
    remote = code is not None  # trusted: transformers runs the folder's code even for a type it ships
    if remote:
        config, model = _remote_model(torch, transformers, code, where)
    else:
        config = _native_config(transformers, raw, where)
        model = _native_model(torch, transformers, config, where)
    modules = dict(model.named_modules())
    params = []
    for name, param in model.named_parameters():  # tied duplicates are listed once
        mod_name, _, pname = name.rpartition(".")
        params.append(RawParam(name, tuple(param.shape), _kind(modules.get(mod_name), pname), param.requires_grad))
    prefix = _llm_prefix(model)
    full = config.to_dict()
    rule = None if remote else image_rule(raw["model_type"], full, processor, processor_name)
    vision = full.get("vision_config") if isinstance(full.get("vision_config"), dict) else None
    return make_groups(params, prefix, remote, _text_config(transformers, model, config, prefix), vision, rule,
                       None if remote else raw)
