"""What a vision-language training step runs (for planner.judge.trace and planner.judge.fit): the
real ``AutoModelForImageTextToText`` model with both stacks cut to the kept layers, the language
model's LoRA targets, and each family's inputs as its processor (and LLaMA-Factory's collator)
hands them to the model.

Inputs per family (transformers 5.25; docs/any-architecture.md, "Vision-language models"):

* LLaVA (processing_llava.py, image_processing_clip.py): ``pixel_values`` [images, 3, H, W] at
  the center crop; each image is ``image_token_index`` repeated in ``input_ids``.
* Qwen2-VL, Qwen2.5-VL (image_processing_qwen2_vl.py): each image flattened into ``t*h*w``
  patches of ``channels * temporal_patch_size * patch**2`` values, ``pixel_values``
  [sum of patches, ...] with ``image_grid_thw`` [images, 3]; ``position_ids`` [3, B, S] as
  LLaMA-Factory's collator computes them (``get_rope_index``). The tower's index tensors
  (``cu_seqlens``, rotary position ids, Qwen2.5-VL's window index) are computed by transformers'
  own ``vision_utils`` helpers from the real grid and passed as the precomputed kwargs
  transformers accepts for graph capture: on fake tensors they cannot be computed from data.
* Gemma 3 (processing_gemma3.py): ``pixel_values`` [images, 3, 896, 896] and the processor's
  ``token_type_ids`` [B, S] (1 on image tokens), which turn on the bidirectional image mask.

Values do not change a fake-tensor step's memory (there are none): what must match the real
step is every shape, which these inputs have. torch and transformers are imported inside
functions only.
"""

from __future__ import annotations

from typing import Any

from planner.judge.protocol import VLM_FAMILIES, TraceRequest
from planner.profile.hf_groups import VISION_ATTRS

VISION_DEPTH_KEYS = ("depth", "num_hidden_layers")
"""The vision config's layer count: Qwen-VL's ``depth``, CLIP's and SigLIP's ``num_hidden_layers``."""
VISION_INDEX_LISTS = ("fullatt_block_indexes",)
"""Vision config fields that list layer indices (Qwen2.5-VL's full-attention blocks): renumbered
with the kept layers."""
INDEX_CONSTANT_LIMIT = 1 << 16
"""Elements of an integer CPU tensor the trace keeps as a real value (``vlm_fake_mode``): the
tower's index tensors, whose ``.tolist()`` splits attention per image and per window."""
TRAINER_DTYPE = {"pure-bf16": "bfloat16"}
"""HF Trainer casts floating inputs to the DeepSpeed engine's dtype (``_prepare_input``); under
plain PyTorch (AMP or fp32) pixel values stay the processor's fp32."""


def vision_depth_key(vision_config: Any) -> str:
    """The vision config's layer-count field."""
    return next(k for k in VISION_DEPTH_KEYS if isinstance(getattr(vision_config, k, None), int))


def vision_layer_types(vision_config: Any, n_layers: int) -> list[str] | None:  # noqa: ANN401
    """Each vision layer's attention where the module alone does not show it: Qwen2.5-VL's blocks
    are alike, the tower's forward gives the ones at ``fullatt_block_indexes`` the whole image
    and the others windows. None where every layer's module says what it does."""
    full = getattr(vision_config, "fullatt_block_indexes", None)
    if not full:
        return None
    return ["full attention" if i in full else "window attention" for i in range(n_layers)]


def vlm_config(req_config: dict, keep_text: tuple[int, ...], keep_vision: tuple[int, ...]):  # noqa: ANN201
    """The transformers config of ``req_config``, each stack built only as deep as its last kept
    layer (per-layer lists cut to match), so each kept layer is built as the full model builds it.

    Raises:
        ValueError: a kept index beyond a stack's depth, or a family the judge has no inputs for.
    """
    from transformers import AutoConfig

    cfg = dict(req_config)
    for key in ("torch_dtype", "dtype", "architectures"):
        cfg.pop(key, None)
    mtype = cfg.pop("model_type")
    if mtype not in VLM_FAMILIES:
        raise ValueError(f"the judge builds the inputs of {', '.join(VLM_FAMILIES)}; not of {mtype!r}")
    config = AutoConfig.for_model(mtype, **cfg)
    text = config.get_text_config()
    _cut(text, "num_hidden_layers", keep_text)
    _cut(config.vision_config, vision_depth_key(config.vision_config), keep_vision)
    return config


def _cut(config: Any, depth_key: str, keep: tuple[int, ...]) -> None:
    """Build ``config``'s stack only as deep as ``keep``'s last layer."""
    if not keep:
        return
    n_full = int(getattr(config, depth_key))
    n_built = keep[-1] + 1
    if n_built > n_full:
        raise ValueError(f"keep names layer {n_built - 1} of a {n_full}-layer stack")
    for key, value in list(vars(config).items()):
        if isinstance(value, list) and len(value) == n_full and key != "architectures":
            setattr(config, key, value[:n_built])
    setattr(config, depth_key, n_built)


def module_prefix(model: Any, attrs: frozenset[str]) -> str:
    """The path of the first module whose attribute name is one of ``attrs`` (``model.visual``)."""
    for name, _ in model.named_modules():
        if name.rsplit(".", 1)[-1] in attrs:
            return name
    raise ValueError(f"{type(model).__name__}: no module named {' or '.join(sorted(attrs))}")


def llm_prefix(model: Any) -> str:
    """The path of the language model: the input embedding's parent (``model.language_model``)."""
    emb = model.get_input_embeddings()
    name = next(n for n, m in model.named_modules() if m is emb)
    return name.rsplit(".", 1)[0] if "." in name else ""


def stack_under(model: Any, prefix: str, n_layers: int) -> tuple[str | None, Any]:
    """(name, ModuleList) of the first stack of ``n_layers`` layers under ``prefix``, or (None, None)."""
    import torch

    for name, mod in model.named_modules():
        if (name.startswith(prefix + ".") and isinstance(mod, torch.nn.ModuleList) and len(mod) == n_layers
                and n_layers > 0):
            return name, mod
    return None, None


def stacks(model: Any) -> dict[str, tuple[str, Any]]:
    """The model's two stacks: ``text`` and ``vision`` -> (name, ModuleList) at the built depth.

    Raises:
        ValueError: a stack not found.
    """
    config = model.config
    out = {}
    for which, prefix, n in (
        ("text", llm_prefix(model), config.get_text_config().num_hidden_layers),
        ("vision", module_prefix(model, VISION_ATTRS), getattr(config.vision_config,
                                                                vision_depth_key(config.vision_config))),
    ):
        name, stack = stack_under(model, prefix, int(n))
        if stack is None:
            raise ValueError(f"{type(model).__name__}: no stack of {n} {which} layers under {prefix}")
        out[which] = (name, stack)
    return out


def marked_layers(model: Any, images: int) -> list[Any]:
    """The layers whose moments the trace tells apart (``planner.judge.tracker``), in the order
    ``planner.judge.fit.FitPlan.copy_kinds`` gives their kinds: the text stack's, then the vision
    stack's where the tower runs (with images)."""
    found = stacks(model)
    return [*found["text"][1], *(found["vision"][1] if images else ())]


def stack_cuts(model: Any) -> dict[str, tuple[Any, list[Any], str]]:
    """What cutting each stack touches: ``text``/``vision`` -> (ModuleList, the configs that
    describe it, their layer-count field); ``planner.judge.models.keep_vlm_layers`` cuts them."""
    out = {}
    for which, (name, stack) in stacks(model).items():
        configs = _stack_configs(model, name, which)
        out[which] = (stack, configs, "num_hidden_layers" if which == "text" else vision_depth_key(configs[0]))
    return out


def renumber_index_lists(model: Any, configs: list[Any], keep_vision: tuple[int, ...]) -> None:
    """Qwen2.5-VL's ``fullatt_block_indexes`` (on its configs and the module that loops over the
    blocks) as positions among the kept vision layers."""
    for obj in [*configs, *model.modules()]:
        for key in VISION_INDEX_LISTS:
            old = getattr(obj, key, None)
            if isinstance(old, list | tuple):
                setattr(obj, key, [new for new, i in enumerate(keep_vision) if i in old])


def _stack_configs(model: Any, stack_name: str, which: str) -> list[Any]:
    """The configs that describe one stack: the model's sub-config for it and the config of every
    module above the stack (a submodule built with ``_from_config`` holds its own copy)."""
    out: list[Any] = []
    parts = stack_name.split(".")
    for depth in range(len(parts)):
        cfg = getattr(model.get_submodule(".".join(parts[:depth])), "config", None)
        if cfg is None:
            continue
        if hasattr(cfg, "vision_config"):  # the whole model's config: the stack's own part of it
            cfg = cfg.vision_config if which == "vision" else cfg.get_text_config()
        if not any(cfg is c for c in out):
            out.append(cfg)
    return out


def lora_targets(model: Any, targets: list[str]) -> list[str]:
    """Full names of the language model's linears that get adapters: leaf names in ``targets``,
    or every linear with ``all-linear`` (the lm_head sits outside the language model)."""
    import torch

    prefix = llm_prefix(model) + "."
    every = list(targets) == ["all-linear"]
    return [name for name, mod in model.named_modules()
            if name.startswith(prefix) and isinstance(mod, torch.nn.Linear)
            and (every or name.rsplit(".", 1)[-1] in targets)]


def vlm_fake_mode():  # noqa: ANN201
    """A FakeTensorMode that keeps small integer CPU tensors as real values (constants), so the
    tower's per-image and per-window splits (``lengths.tolist()``) run as on real data. Only
    tensors made from real values are constants: every activation stays fake."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    class IndexConstantMode(FakeTensorMode):
        def may_turn_const(self, t) -> bool:  # noqa: ANN001
            small_index = (t.device.type == "cpu" and not t.is_floating_point() and t.numel() <= INDEX_CONSTANT_LIMIT
                           and not self.is_our_fake(t))
            return super().may_turn_const(t) or small_index

    return IndexConstantMode(allow_non_fake_inputs=True)


def vlm_inputs(req: TraceRequest, model: Any, dev: str, mode: Any) -> dict[str, Any]:
    """The keyword inputs of one step besides ``input_ids`` and ``labels`` (module docstring)."""
    import torch

    family = model.config.model_type
    b, s = req.micro_batch, req.seq_len
    out: dict[str, Any] = {}
    if family in ("qwen2_vl", "qwen2_5_vl"):
        out["position_ids"] = torch.zeros((3, b, s), dtype=torch.long, device=dev)
    if not req.images:
        return out
    n = b * req.images
    width, height = req.image_size
    vc = model.config.vision_config
    dtype = getattr(torch, TRAINER_DTYPE.get(req.precision, "float32"))
    if family in ("llava", "gemma3"):
        channels = getattr(vc, "num_channels", 3)
        out["pixel_values"] = torch.zeros((n, channels, height, width), dtype=dtype, device=dev)
        if family == "gemma3":
            out["token_type_ids"] = torch.zeros((b, s), dtype=torch.long, device=dev)
        return out
    return {**out, **_qwen_inputs(req, vc, family, n, dev, dtype, mode)}


def _qwen_inputs(req: TraceRequest, vc: Any, family: str, n: int, dev: str, dtype: Any,  # noqa: ANN401
                 mode: Any) -> dict[str, Any]:
    """Qwen-VL's flattened patches and grid, and the tower's index tensors (module docstring)."""
    import torch
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from transformers import vision_utils

    width, height = req.image_size
    p, m = vc.patch_size, vc.spatial_merge_size
    if height % (p * m) or width % (p * m):
        raise ValueError(f"Qwen-VL image {width}x{height}: sides must be multiples of {p * m} (smart_resize)")
    with unset_fake_temporarily():
        grid = torch.tensor([[1, height // p, width // p]] * n)
        real = {"image_cu_seqlens": vision_utils.get_vision_cu_seqlens(grid)}
        position_shape = tuple(vision_utils.get_vision_position_ids(grid[:1], m).shape)
        if family == "qwen2_5_vl":
            index, cu_window = vision_utils.get_vision_window_index(grid, m, vc.window_size, p)
            # window_index stays on the host in the real step too (vision_utils builds it there).
            real.update(image_window_index=index, image_cu_window_seqlens=cu_window)
    conv = mode.fake_tensor_converter
    out = {key: conv.from_real_tensor(mode, value, make_constant=True) for key, value in real.items()}
    out["image_grid_thw"] = conv.from_real_tensor(mode, grid, make_constant=True)
    patches = n * position_shape[0]
    out["image_position_ids"] = torch.zeros((patches, 2), dtype=torch.long, device=dev)
    per_patch = vc.in_channels * vc.temporal_patch_size * p * p
    out["pixel_values"] = torch.zeros((patches, per_patch), dtype=dtype, device=dev)
    return out
