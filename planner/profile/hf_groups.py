"""A model read from a config.json, grouped as trainers freeze it: the language model (``llm``),
the vision tower and the projector, and each vision-language family's image rule.

Part of the profile stage; pure (names, shapes and config dicts in, groups out), so it is tested
without torch. `hf_build` lists the real model's parameters on the meta device and hands them
here. The groups of a transformers vision-language model are named for the roles LLaMA-Factory
freezes (``freeze_vision_tower``, ``freeze_multi_modal_projector``, ``freeze_language_model``;
model_utils/visual.py registers the module keys of each family); a model built from its own
remote code keeps its own attribute names (MiniCPM's ``vpm`` and ``resampler``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from planner.errors import ProfileError
from planner.profile.architectures import Part, TensorKind, TensorSpec
from planner.profile.catalog import Group

LLM_GROUP = "llm"
"""The language model's group, as in every shipped profile."""
TOWER_GROUP = "vision_tower"
"""LLaMA-Factory's ``freeze_vision_tower`` role."""
PROJECTOR_GROUP = "multi_modal_projector"
"""LLaMA-Factory's ``freeze_multi_modal_projector`` role."""
VISION_TOWER_KIND = "vision_tower"
"""The kind of a vision tower read from a config.json (no activation model yet)."""
PROJECTOR_KIND = "projector"
"""The kind of the projector between a vision tower and the LLM, read from a config.json."""

VISION_ATTRS = frozenset({"vision_tower", "visual", "vision_model", "vpm", "vision_encoder", "vision_embed_tokens"})
"""Module attributes that hold a vision tower: LLaVA, Gemma 3, InternVL, PaliGemma (``vision_tower``),
Qwen2/2.5/3-VL (``visual``), Idefics3 and InternVL2's remote code (``vision_model``), MiniCPM-V/-o
(``vpm``), Phi-3.5-vision (``model.vision_embed_tokens``: its CLIP ``img_processor`` and the
``glb_GN``/``sub_GN`` separators; its ``img_projection`` is the projector)."""
PROJECTOR_ATTRS = frozenset({"multi_modal_projector", "connector", "merger", "deepstack_merger_list", "mlp1",
                             "resampler", "mm_projector", "img_projection"})
"""Module attributes that project vision features into the LLM: LLaVA, Gemma 3, InternVL
(``multi_modal_projector``), Idefics3 (``connector``), Qwen-VL's ``visual.merger`` (and Qwen3-VL's
``deepstack_merger_list``), InternVL2 (``mlp1``), MiniCPM (``resampler``), Phi-3.5-vision
(``img_projection``). A projector inside a tower (``visual.merger``) is the projector, as
LLaMA-Factory's ``projector_key`` has it."""

_LAYER_RE = re.compile(r"\.(layers|h|blocks|layer)\.\d+\.")


def _part(name: str, llm_prefix: str) -> Part:
    """Where an LLM tensor sits: embed_tokens, layers, norm or lm_head."""
    rest = name[len(llm_prefix) :].lstrip(".") if llm_prefix else name
    if name.startswith("lm_head.") or rest.startswith("lm_head.") or ".lm_head." in f".{name}":
        return Part.LM_HEAD
    if rest.startswith("embed_tokens.") or rest.startswith("wte."):
        return Part.EMBED_TOKENS
    if _LAYER_RE.search("." + rest):
        return Part.LAYERS
    return Part.NORM


@dataclass(frozen=True)
class RawParam:
    """One parameter as the meta-device model lists it."""

    name: str
    shape: tuple[int, ...]
    kind: TensorKind
    requires_grad: bool


def _role(name: str) -> tuple[str, str, str] | None:
    """(role, attribute, module path) of a vision or projector tensor, or None.

    The first vision or projector attribute on the path decides, except that a projector inside
    a tower (``model.visual.merger``) is the projector.
    """
    parts = name.split(".")[:-1]
    for i, attr in enumerate(parts):
        if attr in PROJECTOR_ATTRS:
            return PROJECTOR_KIND, attr, ".".join(parts[: i + 1])
        if attr in VISION_ATTRS:
            for j in range(i + 1, len(parts)):
                if parts[j] in PROJECTOR_ATTRS:
                    return PROJECTOR_KIND, parts[j], ".".join(parts[: j + 1])
            return VISION_TOWER_KIND, attr, ".".join(parts[: i + 1])
    return None


def group_of(name: str) -> str:
    """The group of a parameter of a transformers vision-language model, as ``group_params``
    names them: the tower, the projector, or (anything else) the language model."""
    role = _role(name)
    if role is None:
        return LLM_GROUP
    return TOWER_GROUP if role[0] == VISION_TOWER_KIND else PROJECTOR_GROUP


def _is_llm(name: str, llm_prefix: str) -> bool:
    """Under the language model's module, or its lm_head (which sits beside the module that
    holds the embedding, or above it: ``lm_head``, ``llm.lm_head``, ``language_model.lm_head``)."""
    if llm_prefix == "" or name.startswith(llm_prefix + "."):
        return True
    ancestors = llm_prefix.split(".")
    for i in range(len(ancestors)):
        above = ".".join(ancestors[:i])
        if name.startswith(f"{above}.lm_head." if above else "lm_head."):
            return True
    return False


def group_params(params: Iterable[RawParam], llm_prefix: str | None, remote: bool) -> dict[str, tuple[str, list]]:
    """Group name -> (kind, tensors), the LLM first.

    Args:
        params: the model's parameters, tied duplicates listed once.
        llm_prefix: the module path of the LLM body (the input embedding's parent: ``""`` for a
            plain causal LM, ``model.language_model`` for LLaVA); None when there is none.
        remote: built from the folder's own code: groups keep its attribute names (``vpm``).
    """
    groups: dict[str, tuple[str, list]] = {LLM_GROUP: ("decoder", [])} if llm_prefix is not None else {}
    modules: dict[str, set[str]] = {}
    for p in params:
        role = _role(p.name)
        if role is not None:
            kind, attr, path = role
            group = attr if remote else (TOWER_GROUP if kind == VISION_TOWER_KIND else PROJECTOR_GROUP)
            part = Part.WHOLE
            modules.setdefault(group, set()).add(path)
        elif llm_prefix is not None and _is_llm(p.name, llm_prefix):
            group, kind, part = LLM_GROUP, "decoder", _part(p.name, llm_prefix)
        else:
            top = p.name.split(".")
            group = top[1] if top[0] == "model" and len(top) > 2 else top[0]  # skip a "model." wrapper
            kind, part = "module", Part.WHOLE
        groups.setdefault(group, (kind, []))[1].append(TensorSpec(p.name, p.shape, p.kind, part, p.requires_grad))
    return {name: (kind, tensors) for name, (kind, tensors) in groups.items() if tensors}


def llm_config(text_cfg: Mapping[str, Any], tied: bool) -> dict[str, Any]:
    """The LLM group's config: the text model's fields (transformers' resolved values, so a
    ``text_config`` that gives only a few fields still has every size), its own ``model_type``,
    and ``tie_word_embeddings`` as the built model has it (no separate lm_head tensor)."""
    skip = ("transformers_version", "architectures", "_name_or_path", "auto_map")
    cfg = {k: v for k, v in text_cfg.items() if not isinstance(v, dict) and k not in skip}
    cfg["tie_word_embeddings"] = tied
    return cfg


def make_groups(params: list[RawParam], llm_prefix: str | None, remote: bool, text_cfg: Mapping[str, Any],
                vision_cfg: Mapping[str, Any] | None, rule: dict[str, Any] | None,
                model_cfg: Mapping[str, Any] | None = None) -> tuple[Group, ...]:
    """The model's groups with their configs: the LLM's text config, the tower's vision
    ``model_type`` and image rule, the module paths of each tower and projector, and on the
    tower the whole model's config (``VLM_CONFIG``: what a traced step builds) when given."""
    out = []
    for name, (kind, tensors) in group_params(params, llm_prefix, remote).items():
        if kind == "decoder":
            tied = not any(t.part is Part.LM_HEAD for t in tensors)
            cfg = llm_config(text_cfg, tied)
        elif kind in (VISION_TOWER_KIND, PROJECTOR_KIND):
            cfg = {"modules": sorted({_module_path(t.name) for t in tensors})}
            if kind == VISION_TOWER_KIND and vision_cfg:
                cfg["model_type"] = vision_cfg.get("model_type", "")
                if rule is not None:
                    cfg["image_rule"] = rule
                if model_cfg is not None:
                    cfg[VLM_CONFIG] = clean_config(model_cfg)
        else:
            cfg = {}
        out.append(Group(name, kind, tuple(tensors), cfg))
    return tuple(out)


VLM_CONFIG = "vlm_config"
"""The tower group's config key holding the whole vision-language config.json (cleaned), from which
``planner.judge.fit`` builds the real model to trace its step."""
_NOISE = ("transformers_version", "_name_or_path", "architectures", "auto_map", "torch_dtype", "dtype")


def clean_config(raw: Mapping[str, Any]) -> dict[str, Any]:
    """A config.json as the judge builds it: without the fields that name files, versions or a
    storage dtype (at any depth of its sub-configs), so copies of one model share traced terms."""
    return {k: clean_config(v) if isinstance(v, dict) else v for k, v in raw.items() if k not in _NOISE}


def _module_path(name: str) -> str:
    role = _role(name)
    return role[2] if role else name.rsplit(".", 1)[0]


# ---- image rules: each family's processor values, read from its config and preprocessor_config.json


def _int(value: Any, where: str, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ProfileError(f"{where}: {field} must be a positive whole number, got {value!r}")
    return value


def _square(value: Any, where: str, field: str) -> int | None:
    """A processor size given as ``336``, ``{"height": 336, "width": 336}`` or ``{"shortest_edge": 336}``."""
    if value is None:
        return None
    if isinstance(value, dict):
        if "height" in value or "width" in value:
            h, w = value.get("height"), value.get("width")
            if h != w:
                raise ProfileError(f"{where}: {field} {h}x{w}: memplan's rule takes a square crop only")
            return _int(h, where, field)
        return _int(value.get("shortest_edge"), where, field) if "shortest_edge" in value else None
    return _int(value, where, field)


QWEN_MIN_PIXELS = 56 * 56
"""Qwen2VLImageProcessor's class default ``size["shortest_edge"]`` (transformers 5.25)."""
QWEN_MAX_PIXELS = 28 * 28 * 1280
"""Qwen2VLImageProcessor's class default ``size["longest_edge"]`` (the published Qwen2-VL and
Qwen2.5-VL preprocessor_config.json raise it to 12,845,056)."""
IDEFICS3_LONGEST_EDGE = 4 * 364
"""Idefics3ImageProcessor's class default ``size["longest_edge"]``."""

QWEN_VL_TYPES = frozenset({"qwen2_vl", "qwen2_5_vl", "qwen3_vl"})


def image_rule(model_type: str, cfg: Mapping[str, Any], processor: Mapping[str, Any] | None,
               where: str) -> dict[str, Any] | None:
    """The family's image rule as JSON (`planner.workload.vision` computes with it), or None for a
    family memplan has none for.

    Args:
        model_type: the top-level ``model_type``.
        cfg: the resolved config as a dict (transformers' ``to_dict()``: defaults filled in).
        processor: the folder's preprocessor_config.json, or None (then the transformers image
            processor's class defaults, and the rule says so).
        where: the processor file's name, for messages.

    Raises:
        ProfileError: a processor or config value the rule needs is not a positive whole number.
    """
    vc = cfg.get("vision_config") or {}
    proc = processor or {}
    src = where if processor is not None else "transformers defaults"
    if model_type == "llava":
        crop = _square(proc.get("crop_size"), where, "crop_size") or _int(vc.get("image_size"), where, "image_size")
        return {"family": "llava", "crop_size": crop, "patch_size": _int(vc.get("patch_size"), where, "patch_size"),
                "drop_cls": cfg.get("vision_feature_select_strategy", "default") == "default", "processor": src}
    if model_type in QWEN_VL_TYPES:
        size = proc.get("size") if isinstance(proc.get("size"), dict) else {}
        low = proc.get("min_pixels", size.get("shortest_edge", QWEN_MIN_PIXELS))
        high = proc.get("max_pixels", size.get("longest_edge", QWEN_MAX_PIXELS))
        return {"family": "qwen2_vl", "patch_size": _int(vc.get("patch_size"), where, "patch_size"),
                "merge_size": _int(vc.get("spatial_merge_size"), where, "spatial_merge_size"),
                "min_pixels": _int(low, where, "min_pixels"), "max_pixels": _int(high, where, "max_pixels"),
                "processor": src}
    if model_type == "gemma3":
        if proc.get("do_pan_and_scan"):
            return None  # extra crops per image by aspect ratio: no rule yet
        return {"family": "gemma3", "image_size": _int(vc.get("image_size"), where, "image_size"),
                "patch_size": _int(vc.get("patch_size"), where, "patch_size"),
                "tokens_per_image": _int(cfg.get("mm_tokens_per_image"), where, "mm_tokens_per_image"),
                "processor": src}
    if model_type == "idefics3":
        tile = proc.get("max_image_size", {}).get("longest_edge") if isinstance(proc.get("max_image_size"), dict) \
            else None
        size = proc.get("size") if isinstance(proc.get("size"), dict) else {}
        return {"family": "idefics3", "image_size": _int(tile or vc.get("image_size"), where, "image_size"),
                "patch_size": _int(vc.get("patch_size"), where, "patch_size"),
                "scale_factor": _int(cfg.get("scale_factor"), where, "scale_factor"),
                "longest_edge": _int(size.get("longest_edge", IDEFICS3_LONGEST_EDGE), where, "size.longest_edge"),
                "split": proc.get("do_image_splitting", True) is not False, "processor": src}
    return None
