"""Trainability and LoRA against peft on a real (meta-device) composite model."""

from __future__ import annotations

import pytest

from planner.errors import ProfileError
from planner.profile.architectures import build_tensors
from planner.profile.catalog import Group, ModelSpec
from planner.workload.inventory import Origin, trainable_inventory
from planner.workload.options import LoraOptions, TrainingOptions

LLM = dict(
    model_type="qwen2",
    vocab_size=1000,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=False,
)
VPM = dict(
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=2,
    num_attention_heads=4,
    patch_size=14,
    image_size=56,
    vision_use_head=False,
)


def _spec() -> ModelSpec:
    return ModelSpec(
        "tiny-mm",
        "test",
        (
            Group("llm", "decoder", tuple(build_tensors("decoder", LLM)), LLM),
            Group("vpm", "siglip_vision", tuple(build_tensors("siglip_vision", VPM)), VPM),
        ),
    )


def _real():
    """The same composite as a torch module, like MiniCPM's (attributes llm and vpm)."""
    import torch
    import transformers

    class Composite(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.llm = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**LLM))
            self.vpm = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**{k: v for k, v in VPM.items()}))

    with torch.device("meta"):
        return Composite()


def _counts(model) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trained


def _ours(options: TrainingOptions) -> tuple[int, int]:
    params = trainable_inventory(_spec(), options)
    return sum(p.numel for p in params), sum(p.numel for p in params if p.trainable)


@pytest.mark.parametrize(
    ("targets", "save"),
    [
        (("q_proj", "k_proj", "v_proj", "o_proj"), ()),
        (("q_proj", "v_proj"), ("llm.embed_tokens",)),
        (("all-linear",), ("vpm",)),
    ],
)
def test_lora_matches_peft(targets, save):
    """MiniCPM's finetune.py style: LoRA on the LLM only, modules_to_save copied and trained."""
    import peft

    model = _real()
    if targets == ("all-linear",):
        target = r"llm\.model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj"
    else:
        target = r"llm\.model\.layers\.\d+\.self_attn\.(" + "|".join(targets) + ")"
    modules_to_save = [{"llm.embed_tokens": "embed_tokens", "vpm": "vpm"}[s] for s in save] or None
    wrapped = peft.get_peft_model(
        model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=target, modules_to_save=modules_to_save)
    )
    ours = _ours(TrainingOptions(lora=LoraOptions(rank=8, targets=targets), train=save or None))
    assert ours == _counts(wrapped)


def test_freeze_and_train_selections_match_requires_grad():
    model = _real()
    model.vpm.requires_grad_(False)
    model.llm.model.embed_tokens.requires_grad_(False)
    ours = _ours(TrainingOptions(freeze=("vpm", "llm.embed_tokens")))
    assert ours == _counts(model)
    ours_train = _ours(TrainingOptions(train=("llm.layers", "llm.norm", "llm.lm_head")))
    assert ours_train == ours


def test_without_drops_groups_and_bad_names_list_choices():
    params = trainable_inventory(_spec(), TrainingOptions(without=("vpm",)))
    assert {p.group for p in params} == {"llm"}
    assert all(p.origin == Origin.BASE for p in params)
    with pytest.raises(ProfileError, match="did you mean vpm"):
        trainable_inventory(_spec(), TrainingOptions(freeze=("vpn",)))
    with pytest.raises(ProfileError, match="no part"):
        trainable_inventory(_spec(), TrainingOptions(freeze=("llm.attention",)))
    with pytest.raises(ProfileError, match="matches no linear"):
        trainable_inventory(_spec(), TrainingOptions(lora=LoraOptions(rank=4, targets=("query_key_value",))))
