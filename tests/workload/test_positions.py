"""Learned absolute positions found in the parameter inventory of real transformers classes (built
on the meta device from small config.json files), and the RoPE warning."""

from __future__ import annotations

from pathlib import Path

import pytest

from planner.errors import ProfileError
from planner.profile.catalog import build_model, load_catalog
from planner.profile.hf_config import model_from_config
from planner.workload.positions import check_positions, learned_positions
from tests.tiny_configs import TINY_GPT2, TINY_QWEN2, write_config

SMALL = {"vocab_size": 128, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4,
         "intermediate_size": 64, "ffn_dim": 64, "word_embed_proj_dim": 32}


@pytest.mark.parametrize("fields, tensor, positions", [
    # GPT2Model.wpe: nn.Embedding(n_positions, n_embd)
    (TINY_GPT2, "transformer.wpe.weight", 256),
    # OPTLearnedPositionalEmbedding: max_position_embeddings + 2 rows (offset 2), 512 tokens
    ({**SMALL, "model_type": "opt", "architectures": ["OPTForCausalLM"], "max_position_embeddings": 512},
     "model.decoder.embed_positions.weight", 512),
    # RoBERTa: 514 rows, position ids from pad_token_id + 1 = 2, so 512 tokens
    ({**SMALL, "model_type": "roberta", "architectures": ["RobertaForCausalLM"], "is_decoder": True,
      "max_position_embeddings": 514, "pad_token_id": 1}, "roberta.embeddings.position_embeddings.weight", 512),
])
def test_learned_tables_of_real_classes(tmp_path: Path, fields: dict, tensor: str, positions: int):
    model = model_from_config(write_config(tmp_path / fields["model_type"], fields))
    learned = learned_positions(model)
    assert learned is not None and (learned.tensor, learned.positions) == (tensor, positions)
    assert check_positions(model, positions) == []
    with pytest.raises(ProfileError, match=f"--seq-len {positions + 1}: .* for {positions} tokens only"):
        check_positions(model, positions + 1)


def test_rope_models_and_encoder_tables():
    """RoPE decoders have no table: past their trained length they are warned, never refused.
    MiniCPM-o's position tables (SigLIP patches, Whisper frames) are the encoders', not the LLM's."""
    catalog = load_catalog(())
    minicpm = build_model(catalog.model("minicpm-o-2.6"))
    assert learned_positions(minicpm) is None
    assert check_positions(minicpm, 32768) == []
    (warning,) = check_positions(minicpm, 32769)
    assert "past minicpm-o-2.6's trained length (max_position_embeddings 32768, RoPE)" in warning


def test_local_rope_config(tmp_path: Path):
    model = model_from_config(write_config(tmp_path / "qwen", TINY_QWEN2))
    assert learned_positions(model) is None
    assert len(check_positions(model, 513)) == 1 and check_positions(model, 512) == []
