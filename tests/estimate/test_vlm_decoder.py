"""The LLM of a vision-language model read from a config.json is replayed as the same LLM alone:
its tensors sit under another module (``model.language_model``) but train, freeze and take LoRA
adapters by the same names."""

from __future__ import annotations

from pathlib import Path

import pytest

from planner.estimate.decoder import decoder_step_memory
from planner.profile.hf_config import model_from_config
from planner.workload.inventory import trainable_inventory
from planner.workload.options import LoraOptions, TrainingOptions
from tests.tiny_vlm import TINY_VLMS, write_model


@pytest.mark.parametrize("options", [
    TrainingOptions(),
    TrainingOptions(lora=LoraOptions(rank=4, targets=("all-linear",))),
    TrainingOptions(freeze=("llm.embed_tokens", "llm.layers")),
], ids=["full", "lora", "frozen-bottom"])
def test_the_llm_of_llava_is_replayed_as_llama(options: TrainingOptions, tmp_path: Path):
    llava = TINY_VLMS["llava"]
    vlm = model_from_config(write_model(tmp_path / "llava", llava))
    plain = model_from_config(write_model(tmp_path / "llama", {**llava["text_config"], "tie_word_embeddings": False}))
    assert vlm.group("llm").config["model_type"] == plain.group("llm").config["model_type"] == "llama"

    def replay(spec):
        params = [p for p in trainable_inventory(spec, options) if p.group == "llm"]
        return decoder_step_memory(spec.group("llm").config, params=params, micro_batch=2, seq_len=64,
                                   precision="amp-bf16", grad_ckpt=True)

    assert replay(vlm) == replay(plain)
