"""Small real Hugging Face ``config.json`` files for tests that load a model by path (built by the
real transformers class on the meta device)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TINY_GPT2 = {
    "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": 512, "n_positions": 256,
    "n_embd": 64, "n_layer": 2, "n_head": 4,
}
"""GPT-2 (learned absolute positions, ``transformer.wpe`` of 256 rows; no activation model here)."""

TINY_QWEN2 = {
    "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "vocab_size": 512, "hidden_size": 32,
    "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 512, "rope_theta": 10000.0, "tie_word_embeddings": True,
}
"""Qwen2 (RoPE, trained for 512 positions; modelled)."""


def write_config(folder: Path, fields: dict[str, Any], **changes: Any) -> Path:
    """``fields`` updated with ``changes``, written to ``folder/config.json``; returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**fields, **changes}))
    return folder
