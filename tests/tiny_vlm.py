"""Small vision-language ``config.json`` files, the published LLaVA-1.5 one, and a tiny model that
ships its own code, for tests that read a model from a local folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TEXT = {"vocab_size": 512, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2}
MROPE = {"type": "mrope", "mrope_section": [1, 1, 2]}  # head_dim 8: sections add up to 8 / 2

TINY_VLMS: dict[str, dict[str, Any]] = {
    "llava": {
        "model_type": "llava", "architectures": ["LlavaForConditionalGeneration"], "tie_word_embeddings": False,
        "text_config": {"model_type": "llama", **TEXT},
        "vision_config": {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                          "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 336, "patch_size": 14,
                          "projection_dim": 32},
        "vision_feature_select_strategy": "default", "vision_feature_layer": -2,
    },
    "qwen2_vl": {
        "model_type": "qwen2_vl", "text_config": {"model_type": "qwen2_vl_text", **TEXT, "rope_scaling": MROPE},
        "vision_config": {"depth": 2, "embed_dim": 32, "hidden_size": 32, "mlp_ratio": 2, "num_heads": 4,
                          "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
    },
    "qwen2_5_vl": {
        "model_type": "qwen2_5_vl", "text_config": {"model_type": "qwen2_5_vl_text", **TEXT, "rope_scaling": MROPE},
        "vision_config": {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "out_hidden_size": 32,
                          "num_heads": 4, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
                          "window_size": 112, "fullatt_block_indexes": [1]},
    },
    "qwen3_vl": {
        "model_type": "qwen3_vl",
        "text_config": {"model_type": "qwen3_vl_text", **TEXT, "head_dim": 8,
                        "rope_scaling": {"rope_type": "default", "mrope_section": [1, 1, 2],
                                         "mrope_interleaved": True}},
        "vision_config": {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "out_hidden_size": 32,
                          "num_heads": 4, "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
                          "num_position_embeddings": 64, "deepstack_visual_indexes": [1]},
    },
    "gemma3": {
        "model_type": "gemma3", "text_config": {"model_type": "gemma3_text", **TEXT, "head_dim": 8},
        "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                          "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 896, "patch_size": 14},
        "mm_tokens_per_image": 256,
    },
    "idefics3": {
        "model_type": "idefics3", "text_config": {"model_type": "llama", **TEXT},
        "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                          "num_attention_heads": 4, "image_size": 364, "patch_size": 14},
        "scale_factor": 2,
    },
    "internvl": {  # grouped and counted; no image rule yet
        "model_type": "internvl", "text_config": {"model_type": "qwen2", **TEXT},
        "vision_config": {"model_type": "internvl_vision", "hidden_size": 32, "intermediate_size": 64,
                          "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": [448, 448],
                          "patch_size": [14, 14]},
    },
}
"""One tiny config per vision-language family memplan groups (the sizes a test builds in well
under a second)."""

LLAVA_15_7B = {
    "architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100, "image_token_index": 32000,
    "model_type": "llava", "pad_token_id": 32001, "projector_hidden_act": "gelu",
    "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
                    "max_position_embeddings": 4096, "model_type": "llama", "rms_norm_eps": 1e-05,
                    "torch_dtype": "float16", "vocab_size": 32064},
    "tie_word_embeddings": False, "torch_dtype": "float16", "transformers_version": "4.36.0.dev0",
    "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                      "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24,
                      "patch_size": 14, "projection_dim": 768, "vocab_size": 32000},
    "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064,
}
"""llava-hf/llava-1.5-7b-hf's config.json as published: the text model gives only a few fields
(the rest are LlamaConfig's defaults, Vicuna-7B's sizes)."""


def write_model(folder: Path, config: dict[str, Any], **files: str) -> Path:
    """``config`` as ``folder/config.json`` and each ``name=text`` as a file beside it; returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


REMOTE_CONFIG = {
    "model_type": "tinyremote", "architectures": ["TinyForCausalLM"], "vocab_size": 64, "hidden_size": 16,
    "num_hidden_layers": 2,
    "auto_map": {"AutoConfig": "configuration_tiny.TinyConfig",
                 "AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM"},
}
REMOTE_FILES = {
    "configuration_tiny.py": '''from transformers import PretrainedConfig


class TinyConfig(PretrainedConfig):
    model_type = "tinyremote"

    def __init__(self, vocab_size=64, hidden_size=16, num_hidden_layers=2, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        super().__init__(**kwargs)
''',
    "tiny_layers.py": '''from torch import nn


class Block(nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.proj = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden)
''',
    "modeling_tiny.py": '''import os
from pathlib import Path

from torch import nn
from transformers import PreTrainedModel

from .configuration_tiny import TinyConfig
from .tiny_layers import Block


class TinyModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config.hidden_size) for _ in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(config.hidden_size)


class TinyForCausalLM(PreTrainedModel):
    config_class = TinyConfig

    def __init__(self, config):
        super().__init__(config)
        if os.environ.get("TINY_REMOTE_MARKER"):  # lets a test see that this code ran
            Path(os.environ["TINY_REMOTE_MARKER"]).write_text("ran")
        self.vpm = nn.Sequential(nn.Conv2d(3, config.hidden_size, 4, 4), Block(config.hidden_size))
        self.resampler = nn.Linear(config.hidden_size, config.hidden_size)
        self.model = TinyModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens
''',
}
"""A model that ships its own code (config, modeling file, a relatively imported layer file): an
LLM with a vision tower ``vpm`` and a ``resampler``, as MiniCPM-V names them."""
