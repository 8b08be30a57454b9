"""The decoder config as the step replay reads it: the HF fields that size activations, and the buffers they imply.

Estimate stage; pure arithmetic (no torch, no I/O). Read by ``planner.estimate.decoder`` and its
modules (``planner.estimate.decoder_modules``). Docs: docs/activations.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from planner.errors import ProfileError
from planner.estimate.ledger import FP32, block_bytes
from planner.profile.architectures import decoder_tensors


@dataclass(frozen=True)
class DecoderDims:
    """The config fields that size a decoder's activations (HF ``config.json`` names)."""

    model_type: str
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    hidden_act: str
    sliding_window: int | None

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> DecoderDims:
        """Read the fields (defaults as the transformers config classes set them)."""
        names = {t.name for t in decoder_tensors(cfg)}  # validates model_type and required fields
        heads = cfg["num_attention_heads"]
        mtype = cfg["model_type"]
        act_default = "gelu_pytorch_tanh" if mtype == "gemma" else "silu"
        act = cfg.get("hidden_act", act_default)
        if mtype == "gemma" and act == "gelu":  # GemmaConfig.__post_init__ maps legacy "gelu"
            act = "gelu_pytorch_tanh"
        if act not in ("silu", "gelu_pytorch_tanh", "gelu"):
            raise ProfileError(f"hidden_act {act!r} is not modeled (silu, gelu_pytorch_tanh, gelu)")
        # Sliding-window attention (a mask once s >= window): Qwen2/Qwen3 only with
        # use_sliding_window (Qwen2Config.__post_init__); Mistral defaults to 4096 when the field
        # is absent (MistralConfig); Phi-3 reads it as given; Llama and Gemma have none.
        window = cfg.get("sliding_window")
        if mtype in ("qwen2", "qwen3") and not cfg.get("use_sliding_window", False):
            window = None
        elif mtype in ("llama", "gemma"):
            window = None
        elif mtype == "mistral" and "sliding_window" not in cfg:
            window = 4096
        return cls(
            model_type=mtype,
            vocab=cfg["vocab_size"],
            hidden=cfg["hidden_size"],
            intermediate=cfg["intermediate_size"],
            layers=cfg["num_hidden_layers"],
            heads=heads,
            kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            tied="lm_head.weight" not in names,
            hidden_act=act,
            sliding_window=window,
        )


def decoder_buffer_bytes(cfg: Mapping[str, Any], weight_item: int = FP32) -> int:
    """Bytes of a decoder's buffers on the GPU: the rotary embedding's ``inv_freq`` and
    ``original_inv_freq`` ([hd/2] fp32, converted with the module), and Gemma's ``embed_scale``
    (0-dim). Non-persistent, so they are not in the parameter inventory; constant all step."""
    dims = DecoderDims.from_config(cfg)
    rotary = 2 * block_bytes((dims.head_dim // 2) * weight_item)
    return rotary + (block_bytes(weight_item) if dims.model_type == "gemma" else 0)
