"""What the traced step runs (for planner.judge.trace): the model with fake parameters, the encoder's
inputs and step wrapper, the tracked loss and the optimizer."""

from __future__ import annotations

from typing import Any

from planner.judge.protocol import TraceRequest
from planner.judge.vlm import lora_targets, renumber_index_lists, stack_cuts, vlm_config


def fake_from_meta(model: Any, dev: str, precision: str) -> None:
    """Replace a meta model's parameters and buffers, in place, by fake tensors on ``dev``: one new
    tensor per distinct meta tensor (``module._apply`` would untie shared parameters). pure-bf16
    converts floating parameters and buffers as ``model.to(torch.bfloat16)`` does."""
    import torch

    dtype = torch.bfloat16 if precision == "pure-bf16" else None
    new: dict[int, Any] = {}
    keep = []  # the meta tensors stay alive until done, so ids are not reused
    for mod in model.modules():
        for store, is_param in ((mod._parameters, True), (mod._buffers, False)):
            for name, t in list(store.items()):
                if t is None:
                    continue
                if id(t) not in new:
                    keep.append(t)
                    fake = torch.empty_like(t, device=dev, dtype=dtype if t.is_floating_point() and dtype else t.dtype)
                    new[id(t)] = torch.nn.Parameter(fake, requires_grad=t.requires_grad) if is_param else fake
                store[name] = new[id(t)]


def _build_model(req: TraceRequest, dev: str):
    """The model with fake parameters on ``dev``; tied parameters stay tied."""
    import torch

    vlm = req.model_kind == "image_text_to_text"
    with torch.device("meta"):
        model = _meta_model(req)
        if vlm:
            keep_vlm_layers(model, req.keep_layers, req.keep_vision_layers)
        elif req.keep_layers:
            keep_layers(model, req.keep_layers)
        if req.lora is not None:
            # peft wraps the meta model before the fake tensors are made (it cannot move fake CPU
            # adapters to the fake CUDA device); with checkpointing already on it calls
            # enable_input_require_grads itself, as HF Trainer's peft path does.
            if req.grad_ckpt:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            targets = lora_targets(model, req.lora["targets"]) if vlm else None
            model = _peft_wrap(model, req.lora, targets)
    fake_from_meta(model, dev, req.precision)
    for name, p in model.named_parameters():
        if any(name.startswith(prefix) for prefix in req.frozen_prefixes):
            p.requires_grad_(False)
    if req.grad_ckpt and req.lora is None and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def _peft_wrap(model, lora: dict, names: list[str] | None = None):  # noqa: ANN001, ANN202
    """``get_peft_model`` with LoRA adapters as memplan's trainers configure them (dropout 0);
    ``names``: the full module names to adapt instead of ``lora["targets"]``."""
    from peft import LoraConfig, get_peft_model

    targets = lora["targets"]
    target_modules = names if names is not None else "all-linear" if list(targets) == ["all-linear"] \
        else list(targets)
    cfg = LoraConfig(r=int(lora["r"]), lora_alpha=int(lora.get("alpha", 2 * int(lora["r"]))),
                     lora_dropout=float(lora.get("dropout", 0.0)), target_modules=target_modules)
    return get_peft_model(model, cfg)


def decoder_stack(model, n_layers: int):  # noqa: ANN001, ANN201
    """(name, ModuleList) of the model's stack of ``n_layers`` decoder layers: the first
    ``nn.ModuleList`` of that length in module order (``model.layers``, ``transformer.h``,
    ``model.language_model.layers``...), or (None, None)."""
    import torch

    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) == n_layers and n_layers > 0:
            return name, mod
    return None, None


def keep_layers(model, keep: tuple[int, ...]) -> None:  # noqa: ANN001
    """Cut the decoder stack down to the layers ``keep`` (indices of the full model) in place
    (``keep_in_stack``)."""
    config = model.config
    n_built = config.num_hidden_layers
    _, stack = decoder_stack(model, n_built)
    if stack is None:
        raise RuntimeError(f"no stack of {n_built} decoder layers found in {type(model).__name__}")
    keep_in_stack(stack, keep, [config])


def keep_vlm_layers(model, keep_text: tuple[int, ...], keep_vision: tuple[int, ...]) -> None:  # noqa: ANN001
    """Cut a vision-language model's text and vision stacks to the kept layers in place
    (``keep_in_stack``), Qwen2.5-VL's full-attention indices renumbered with them."""
    cuts = stack_cuts(model)
    for keep, which in ((keep_text, "text"), (keep_vision, "vision")):
        if keep:
            stack, configs, depth_key = cuts[which]
            keep_in_stack(stack, keep, configs, depth_key)
    if keep_vision:
        renumber_index_lists(model, cuts["vision"][1], keep_vision)


def keep_in_stack(stack, keep: tuple[int, ...], configs: list, depth_key: str = "num_hidden_layers") -> None:  # noqa: ANN001
    """Cut ``stack`` (an ``nn.ModuleList``) down to the layers ``keep`` in place: each kept layer
    stays as the full model built it; each config's layer count (``depth_key``) and per-layer
    lists follow, and every ``layer_idx`` is renumbered (caches and masks index by it)."""
    n_built = len(stack)
    kept = [stack[i] for i in keep]
    for new, layer in enumerate(kept):
        for mod in layer.modules():
            if isinstance(getattr(mod, "layer_idx", None), int):
                mod.layer_idx = new
    while len(stack):
        del stack[len(stack) - 1]
    for layer in kept:
        stack.append(layer)
    for config in configs:
        for key, value in list(vars(config).items()):
            if isinstance(value, list) and len(value) == n_built and key != "architectures":
                setattr(config, key, [value[i] for i in keep])
        setattr(config, depth_key, len(keep))


def _meta_model(req: TraceRequest):
    """The fp32 model of ``req.model_kind`` on the current (meta) device."""
    import importlib

    import torch

    cfg = dict(req.model_config)
    for key in ("torch_dtype", "dtype", "architectures"):
        cfg.pop(key, None)
    if req.model_kind == "module":
        mod_name, fn_name = req.module_factory.split(":", 1)
        return getattr(importlib.import_module(mod_name), fn_name)(cfg)
    if req.model_kind == "image_text_to_text":
        from transformers import AutoModelForImageTextToText

        config = vlm_config(cfg, req.keep_layers, req.keep_vision_layers)
        return AutoModelForImageTextToText.from_config(config, attn_implementation=req.attn, dtype=torch.float32)
    mtype = cfg.pop("model_type", None)
    if req.model_kind == "causal_lm":
        from transformers import AutoConfig, AutoModelForCausalLM

        if req.keep_layers:
            # Build only as deep as the last kept layer; per-layer lists follow the depth.
            n_full = int(cfg.get("num_hidden_layers", cfg.get("n_layer", 0)) or 0)
            n_built = req.keep_layers[-1] + 1
            if n_full and n_built > n_full:
                raise ValueError(f"keep_layers names layer {n_built - 1} of a {n_full}-layer model")
            for key, value in list(cfg.items()):
                if isinstance(value, list) and n_full and len(value) == n_full:
                    cfg[key] = value[:n_built]
            cfg["num_hidden_layers"] = n_built
            cfg.pop("n_layer", None)
        config = AutoConfig.for_model(mtype, **cfg)
        config._attn_implementation = req.attn
        return AutoModelForCausalLM.from_config(config, attn_implementation=req.attn, dtype=torch.float32)
    if req.model_kind == "siglip_vision":
        from transformers import SiglipVisionConfig, SiglipVisionModel

        # MiniCPM's navit SigLIP returns last_hidden_state without the pooling head.
        cfg.setdefault("vision_use_head", False)
        return SiglipVisionModel._from_config(SiglipVisionConfig(**cfg), attn_implementation=req.attn,
                                              dtype=torch.float32)
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    return WhisperEncoder._from_config(WhisperConfig(**cfg), attn_implementation=req.attn, dtype=torch.float32)


def _encoder_inputs(req: TraceRequest, model, dev: str) -> dict:  # noqa: ANN001
    """Keyword inputs of one encoder step: the whole batch (``micro_batch`` crops or pieces)."""
    import torch

    dtype = torch.bfloat16 if req.precision == "pure-bf16" else torch.float32
    n = req.micro_batch
    if req.model_kind == "module":
        return dict(model.memplan_inputs(n, dev, dtype))
    cfg = model.config
    if req.model_kind == "siglip_vision":
        side = cfg.image_size
        return {"pixel_values": torch.zeros((n, cfg.num_channels, side, side), dtype=dtype, device=dev)}
    frames = 2 * cfg.max_source_positions  # conv2 has stride 2; WhisperEncoder.forward checks the length
    return {"input_features": torch.zeros((n, cfg.num_mel_bins, frames), dtype=dtype, device=dev)}


def _encoder_step(req: TraceRequest, model):  # noqa: ANN001, ANN202
    """A root module around the encoder that runs it over the batch, in chunks of
    ``encoder_chunk`` whose outputs are concatenated as MiniCPM's ``get_vllm_embedding`` does,
    and computes the consumer loss ``output.mean()``. Its forward returns the loss and the
    references a real caller still holds at that point (chunk outputs, output). MemTracker
    allows a submodule, not the root, to run several times in one step."""
    import torch

    class EncoderStep(torch.nn.Module):
        def __init__(self, tower) -> None:  # noqa: ANN001
            super().__init__()
            self.tower = tower

        def forward(self, **inputs):  # noqa: ANN003, ANN202
            n = req.micro_batch
            chunk = req.encoder_chunk or n
            outs = []
            for start in range(0, n, chunk):
                part = {k: v[start:start + chunk] if isinstance(v, torch.Tensor) and v.dim() and v.size(0) == n
                        else v for k, v in inputs.items()}
                res = self.tower(**part)
                outs.append(res if isinstance(res, torch.Tensor) else res.last_hidden_state)
                del res
            out = torch.cat(outs) if len(outs) > 1 else outs[0]
            return out.mean(), (outs, out)

    return EncoderStep(model)


def _find_layers(model):  # noqa: ANN001, ANN202
    """The model's stack of transformer layers (for progress messages), or None."""
    for path in ("model.layers", "encoder.layers", "layers"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if obj is not None and hasattr(obj, "__len__"):
            return obj
    return None


def _wrap_loss(model) -> None:  # noqa: ANN001
    """Run the model's loss function inside a submodule ``loss`` so MemTracker tracks it."""
    import torch

    fn = model.loss_function

    class Loss(torch.nn.Module):
        def forward(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            return fn(*args, **kwargs)

    loss = Loss()
    model.add_module("loss", loss)

    def call_loss(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        return loss(*args, **kwargs)

    model.loss_function = call_loss  # a plain function: nn.Module.__setattr__ would not call the setter for a module


def _make_optimizer(req: TraceRequest, params):  # noqa: ANN001
    import torch

    if req.optimizer == "none" or not params:
        return None
    if req.optimizer.startswith("adamw"):
        kind = req.optimizer.split("-")[1]
        return torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0, foreach=kind == "foreach", fused=kind == "fused")
    if req.optimizer == "sgd":
        return torch.optim.SGD(params, lr=1e-5, momentum=0.9, foreach=False)
    from transformers.optimization import Adafactor

    return Adafactor(params, lr=1e-5, scale_parameter=False, relative_step=False, warmup_init=False)
