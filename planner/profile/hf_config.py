"""A model from a local Hugging Face ``config.json``: counted exactly by building the real
transformers class on the meta device (no weights, no download, no internet).

Part of the profile stage. The only profile code that imports torch and transformers, and only
when ``--model`` is a path.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from planner.errors import ProfileError, require_extra
from planner.profile.architectures import Part, TensorKind, TensorSpec, check_config_bounds
from planner.profile.catalog import Group, ModelSpec

_LAYER_RE = re.compile(r"\.(layers|h|blocks|layer)\.\d+\.")


def find_config(path: str | Path) -> Path | None:
    """``path`` itself if it is a file, ``path/config.json`` if it is a folder holding one, else None.

    Raises:
        ProfileError: ``path`` cannot name a file at all: a NUL byte in it, ``~user`` for a user
            who does not exist, a name the system refuses (too long), a folder it may not read.
    """
    shown = str(path)[:200]
    if "\0" in str(path):
        raise ProfileError(f"--model {shown!r}: a path cannot contain a NUL byte")
    try:
        p = Path(path).expanduser()
    except RuntimeError:  # "~nosuchuser/...": Path.expanduser cannot find that home folder
        raise ProfileError(f"--model {shown!r}: no such user's home folder for '~'") from None
    try:
        if p.is_file():
            return p
        if p.is_dir() and (p / "config.json").is_file():
            return p / "config.json"
    except OSError as exc:  # ENAMETOOLONG, EACCES...: is_file() re-raises all but 'not there'
        raise ProfileError(f"--model {shown!r}: cannot look there: {exc.strerror}") from None
    return None


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


def _part(name: str, llm_prefix: str) -> Part:
    rest = name[len(llm_prefix) :].lstrip(".") if llm_prefix else name
    if name.startswith("lm_head.") or rest.startswith("lm_head."):
        return Part.LM_HEAD
    if rest.startswith("embed_tokens.") or rest.startswith("wte."):
        return Part.EMBED_TOKENS
    if _LAYER_RE.search("." + rest):
        return Part.LAYERS
    return Part.NORM


MAX_CONFIG_BYTES = 4 * 2**20
"""A model's config.json is a few KiB (MiniCPM-o 2.6's, with its nested configs, 6 KiB); one over
4 MiB is not a config (bytes)."""


def _no_constant(name: str) -> float:
    raise json.JSONDecodeError(f"{name} is not strict JSON", name, 0)


def model_from_config(path: str | Path) -> ModelSpec:
    """Build the transformers model described by a config.json on the meta device and group its
    parameters.

    A causal LM becomes one ``llm`` group split into embed_tokens / layers / norm / lm_head
    parts. A model with other top-level modules (a vision tower, a projector) gets one group per
    top-level module besides the language model.

    Raises:
        ProfileError: the file is missing, is not JSON, or transformers cannot build it.
    """
    cfg_path = find_config(path)
    if cfg_path is None:
        raise ProfileError(f"--model {path}: no config.json there")
    try:
        if not cfg_path.is_file():
            raise ProfileError(f"{cfg_path}: not a regular file")
        with open(cfg_path, "rb") as fh:
            data = fh.read(MAX_CONFIG_BYTES + 1)
        if len(data) > MAX_CONFIG_BYTES:
            raise ProfileError(f"{cfg_path}: over {MAX_CONFIG_BYTES // 2**20} MiB, not a model's config.json")
        raw = json.loads(data.decode("utf-8"), parse_constant=_no_constant)
    except (OSError, UnicodeDecodeError, RecursionError) as exc:
        raise ProfileError(f"{cfg_path}: cannot read: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ProfileError(f"{cfg_path}: not valid JSON: {exc.msg} (line {exc.lineno})") from None
    if not isinstance(raw, dict) or "model_type" not in raw:
        raise ProfileError(f'{cfg_path}: not a Hugging Face config (no "model_type" field)')
    check_config_bounds(raw, f"{cfg_path}: ")  # before transformers builds 200,000 layers

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    require_extra("reading a local config.json", "torch", "transformers")
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    try:
        config = transformers.AutoConfig.for_model(**raw)
    except Exception as exc:  # transformers and huggingface_hub raise many kinds for a bad field
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ProfileError(f"{cfg_path}: transformers cannot read it: {first}") from None
    model = None
    errors = []
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModelForImageTextToText, transformers.AutoModel):
        try:
            with torch.device("meta"):
                model = auto.from_config(config)
            break
        except Exception as exc:  # transformers raises many kinds for a config it cannot build
            errors.append(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    if model is None:
        raise ProfileError(f"{cfg_path}: transformers cannot build model_type {raw['model_type']!r}: {errors[-1]}")
    return _group_model(model, raw, str(cfg_path))


def _group_model(model, raw: dict, source: str) -> ModelSpec:
    modules = dict(model.named_modules())
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    llm_prefix = ""
    if emb is not None:
        for name, mod in modules.items():
            if mod is emb:
                llm_prefix = name.rsplit(".", 1)[0] if "." in name else ""
                break
    by_group: dict[str, list[TensorSpec]] = {}
    for name, param in model.named_parameters():  # tied duplicates are listed once
        mod_name, _, pname = name.rpartition(".")
        if emb is not None and (name.startswith(llm_prefix + ".") or llm_prefix == "" or name.startswith("lm_head.")):
            group, part = "llm", _part(name, llm_prefix)
        else:
            top = name.split(".")
            # Skip a wrapper level such as ``model.`` in ``model.vision_tower.x``.
            group = top[1] if top[0] == "model" and len(top) > 2 else top[0]
            part = Part.WHOLE
        kind = _kind(modules.get(mod_name), pname)
        by_group.setdefault(group, []).append(TensorSpec(name, tuple(param.shape), kind, part, param.requires_grad))
    text_cfg = raw.get("text_config", raw)
    if "model_type" not in text_cfg:  # a nested text_config names its own type
        text_cfg = {**text_cfg, "model_type": raw["model_type"]}
    groups = []
    for gname, tensors in by_group.items():
        kind = "decoder" if gname == "llm" else "module"
        # The LLM keeps its config fields: the activation model reads them.
        cfg = {k: v for k, v in text_cfg.items() if not isinstance(v, dict)} if gname == "llm" else {}
        groups.append(Group(gname, kind, tuple(tensors), cfg))
    name = raw.get("_name_or_path") or Path(source).parent.name
    return ModelSpec(str(name), source, tuple(groups), None)
