"""A model from a local config.json: vision-language families grouped as trainers freeze them and
counted exactly (the real transformers class on the meta device is the judge), models that ship
their own code, what is refused, and the inventory cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from planner.errors import ProfileError
from planner.profile import cache
from planner.profile.architectures import Part
from planner.profile.hf_config import INVENTORY_VERSION, model_from_config
from planner.workload.inventory import trainable_inventory
from planner.workload.options import LoraOptions, TrainingOptions
from planner.workload.vision import vision_rule
from tests.tiny_vlm import LLAVA_15_7B, REMOTE_CONFIG, REMOTE_FILES, TINY_VLMS, write_model

ROOT = Path(__file__).resolve().parents[2]


def _real(cfg: dict):
    import torch
    import transformers

    with torch.device("meta"):
        return transformers.AutoModelForImageTextToText.from_config(transformers.AutoConfig.for_model(**cfg))


@pytest.mark.parametrize("family", sorted(TINY_VLMS))
def test_vlm_groups_match_the_real_class(family: str, tmp_path: Path):
    """Every parameter of the real class lands in exactly one group, with its shape; the LLM keeps
    its text config (its own model_type), the tower its image rule."""
    cfg = TINY_VLMS[family]
    spec = model_from_config(write_model(tmp_path / family, cfg))
    real = dict(_real(cfg).named_parameters())
    ours = {t.name: t for g in spec.groups for t in g.tensors}
    assert ours.keys() == real.keys()
    assert all(ours[n].shape == tuple(p.shape) for n, p in real.items())
    assert spec.params == sum(p.numel() for p in real.values())
    assert [g.name for g in spec.groups] == ["llm", "vision_tower", "multi_modal_projector"]
    assert [g.kind for g in spec.groups] == ["decoder", "vision_tower", "projector"]
    llm = spec.group("llm")
    assert llm.config["model_type"] == cfg["text_config"]["model_type"]
    assert llm.config["hidden_size"] == 32 and llm.config["num_hidden_layers"] == 2
    assert {t.part for t in llm.tensors} >= {Part.EMBED_TOKENS, Part.LAYERS, Part.NORM}
    assert llm.tied_lm_head == ("lm_head.weight" not in real)
    rule = vision_rule(spec)
    assert (rule.family if rule else None) == {"qwen2_5_vl": "qwen2_vl", "qwen3_vl": "qwen2_vl",
                                               "internvl": None}.get(family, family)


def test_qwen_vl_projector_is_the_merger(tmp_path: Path):
    """LLaMA-Factory's qwen2_vl registration: vision keys visual.patch_embed and visual.blocks,
    projector visual.merger (Qwen3-VL's deepstack mergers project too)."""
    spec = model_from_config(write_model(tmp_path / "q", TINY_VLMS["qwen3_vl"]))
    assert spec.group("multi_modal_projector").config["modules"] == ["model.visual.deepstack_merger_list",
                                                                      "model.visual.merger"]
    assert {t.name.split(".")[2] for t in spec.group("vision_tower").tensors} == {"patch_embed", "pos_embed", "blocks"}


def test_llava_15_as_published(tmp_path: Path):
    """The published config gives only a few text fields: the rest are LlamaConfig's defaults
    (Vicuna-7B's sizes). 7,063,427,072 parameters, as the model card's safetensors."""
    spec = model_from_config(write_model(tmp_path / "llava-1.5-7b-hf", LLAVA_15_7B))
    assert spec.params == 7_063_427_072
    assert [(g.name, g.params) for g in spec.groups] == [
        ("llm", 6_738_939_904), ("vision_tower", 303_507_456), ("multi_modal_projector", 20_979_712)]
    llm = spec.group("llm").config
    assert (llm["hidden_size"], llm["intermediate_size"], llm["num_hidden_layers"], llm["vocab_size"]) == (
        4096, 11008, 32, 32064)
    assert spec.hidden_size == 4096
    rule = vision_rule(spec)
    assert rule.layout(1344, 1344).llm_tokens == 576 and rule.processor == "transformers defaults"


@pytest.mark.parametrize(("freeze", "trained"), [
    (("vision_tower",), {"llm", "multi_modal_projector"}),  # freeze_vision_tower: true (LLaMA-Factory's default)
    (("vision_tower", "multi_modal_projector"), {"llm"}),
    (("llm",), {"vision_tower", "multi_modal_projector"}),  # freeze_language_model
])
def test_trainer_roles_select_the_groups(freeze: tuple[str, ...], trained: set[str], tmp_path: Path):
    spec = model_from_config(write_model(tmp_path / "m", TINY_VLMS["qwen2_vl"]))
    params = trainable_inventory(spec, TrainingOptions(freeze=freeze))
    assert {p.group for p in params if p.trainable} == trained
    lora = trainable_inventory(spec, TrainingOptions(lora=LoraOptions(rank=4)))  # adapters in the LLM only
    assert {p.group for p in lora if p.trainable} == {"llm"}


def test_roles_map_to_llamafactory_flags():
    from planner.explain.rules import LF_ROLE_OF_KIND
    from planner.writers.keymap import ROLE_OF_KIND

    assert (ROLE_OF_KIND["vision_tower"], ROLE_OF_KIND["projector"]) == ("vision", "projector")
    assert (LF_ROLE_OF_KIND["vision_tower"], LF_ROLE_OF_KIND["projector"]) == ("vision", "projector")


def test_processor_settings_beside_the_config_are_read(tmp_path: Path):
    folder = write_model(tmp_path / "q", TINY_VLMS["qwen2_vl"])
    (folder / "preprocessor_config.json").write_text(json.dumps({"min_pixels": 3136, "max_pixels": 12845056}))
    rule = vision_rule(model_from_config(folder))
    assert (rule.min_pixels, rule.max_pixels) == (3136, 12_845_056)
    assert rule.processor.endswith("preprocessor_config.json")
    (folder / "preprocessor_config.json").write_text(json.dumps({"size": {"shortest_edge": 0}}))
    with pytest.raises(ProfileError, match="min_pixels must be a positive whole number"):
        model_from_config(folder)


@pytest.mark.parametrize(("cfg", "message"), [
    ({"model_type": "bert", "architectures": ["BertForMaskedLM"]}, "'bert' is an encoder-only model"),
    ({"model_type": "roberta"}, "'roberta' is an encoder-only model"),
    ({"model_type": "t5", "is_encoder_decoder": True}, "'t5' is an encoder-decoder model"),
    ({"model_type": "my_seq2seq", "is_encoder_decoder": True}, "'my_seq2seq' is an encoder-decoder model"),
    ({"model_type": "qwen2", "architectures": ["Qwen2ForSequenceClassification"]}, "not a causal-LM head"),
])
def test_encoders_are_refused_never_estimated_as_another_model(cfg: dict, message: str, tmp_path: Path):
    with pytest.raises(ProfileError, match=message) as err:
        model_from_config(write_model(tmp_path / "m", cfg))
    assert str(err.value).count("\n") == 0 and "memplan plans causal-LM fine-tuning" in str(err.value)


@pytest.mark.parametrize(("cfg", "message"), [
    ({**TINY_VLMS["llava"], "text_config": "llama"}, "text_config must be an object"),
    ({**TINY_VLMS["llava"], "vision_config": [1, 2]}, "vision_config must be an object"),
    ({k: v for k, v in TINY_VLMS["llava"].items() if k != "vision_config"}, "needs its vision_config"),
    ({**TINY_VLMS["llava"], "text_config": {"model_type": "llama", "hidden_size": 30, "num_attention_heads": 4}},
     "cannot"),
    ({**TINY_VLMS["llava"], "text_config": {"model_type": "no_such_llm"}}, "transformers cannot read it"),
    ({"model_type": "qwen2_vll"}, "knows no model_type 'qwen2_vll' .did you mean qwen2_vl"),
])
def test_broken_nested_configs_are_one_line(cfg: dict, message: str, tmp_path: Path):
    with pytest.raises(ProfileError, match=message) as err:
        model_from_config(write_model(tmp_path / "m", cfg))
    assert "\n" not in str(err.value)


# ---- remote code


def test_remote_code_needs_the_flag_and_runs_nothing_without_it(tmp_path: Path, monkeypatch):
    folder = write_model(tmp_path / "tiny", REMOTE_CONFIG, **REMOTE_FILES)
    marker = tmp_path / "ran"
    monkeypatch.setenv("TINY_REMOTE_MARKER", str(marker))
    with pytest.raises(ProfileError, match=r"only with --trust-remote-code.*nothing is fetched") as err:
        model_from_config(folder)
    assert "(configuration_tiny.py, modeling_tiny.py)" in str(err.value)
    assert not marker.exists()
    spec = model_from_config(folder, trust_remote_code=True)
    assert marker.read_text() == "ran"
    # the folder's own names; kinds by role
    assert [(g.name, g.kind) for g in spec.groups] == [("llm", "decoder"), ("vpm", "vision_tower"),
                                                       ("resampler", "projector")]
    hidden, vocab = 16, 64
    block = hidden * hidden + hidden + 2 * hidden  # Linear and LayerNorm
    llm = vocab * hidden + 2 * block + 2 * hidden + vocab * hidden  # embed, 2 blocks, norm, lm_head
    assert spec.group("llm").params == llm
    assert spec.group("vpm").params == 3 * hidden * 16 + hidden + block  # Conv2d(3, 16, 4, 4) and a block
    assert spec.group("llm").config["model_type"] == "tinyremote"


@pytest.mark.parametrize(("missing", "message"), [
    ("modeling_tiny.py", "auto_map.AutoModelForCausalLM names modeling_tiny.py, which is not in"),
    ("configuration_tiny.py", "auto_map.AutoConfig names configuration_tiny.py, which is not in"),
    ("tiny_layers.py", "modeling_tiny.py imports tiny_layers.py, which is not in"),
])
def test_a_missing_code_file_is_named(missing: str, message: str, tmp_path: Path):
    files = {k: v for k, v in REMOTE_FILES.items() if k != missing}
    folder = write_model(tmp_path / "tiny", REMOTE_CONFIG, **files)
    with pytest.raises(ProfileError, match=message):
        model_from_config(folder, trust_remote_code=True)
    with pytest.raises(ProfileError, match="only with --trust-remote-code"):  # untrusted code is not looked at
        model_from_config(folder)


def test_code_from_another_repository_is_never_fetched(tmp_path: Path):
    cfg = {**REMOTE_CONFIG, "auto_map": {"AutoModelForCausalLM": "org/other--modeling_x.Model"}}
    with pytest.raises(ProfileError, match=r"points at another repository \('org/other'\).* never fetches it"):
        model_from_config(write_model(tmp_path / "m", cfg), trust_remote_code=True)


def test_a_native_model_type_with_auto_map_builds_natively_without_the_flag(tmp_path: Path):
    """As transformers does without trust_remote_code: Phi-3's published config still names its
    old code, and the class transformers ships builds it, whether the .py files were copied or not."""
    cfg = {**TINY_VLMS["llava"]["text_config"], "model_type": "llama",
           "auto_map": {"AutoModelForCausalLM": "modeling_gone.Model"}}
    assert model_from_config(write_model(tmp_path / "bare", cfg)).params > 0
    folder = write_model(tmp_path / "m", cfg, **{"modeling_gone.py": "raise RuntimeError('never run')\n"})
    assert model_from_config(folder).params > 0
    with pytest.raises(ProfileError, match="its own code .modeling_gone.Model. fails to load: RuntimeError: never run"):
        model_from_config(folder, trust_remote_code=True)  # trusted, transformers would run it too


# ---- the inventory cache


def _entries() -> list[Path]:
    folder = cache.cache_dir() / "inventory"
    return sorted(folder.glob("*.json")) if folder.is_dir() else []


def test_the_cached_inventory_equals_the_built_one(tmp_path: Path):
    folder = write_model(tmp_path / "llava", TINY_VLMS["llava"])
    built = model_from_config(folder)
    assert len(_entries()) == 1
    again = model_from_config(folder)
    assert again == built
    copy = write_model(tmp_path / "elsewhere", TINY_VLMS["llava"])  # keyed by bytes: the copy hits
    moved = model_from_config(copy / "config.json")
    assert moved.groups == built.groups and moved.source == str(copy / "config.json")
    assert len(_entries()) == 1


def test_a_corrupt_or_edited_entry_is_rebuilt(tmp_path: Path):
    folder = write_model(tmp_path / "m", TINY_VLMS["gemma3"])
    built = model_from_config(folder)
    [entry] = _entries()
    doc = json.loads(entry.read_text())
    doc["data"]["groups"][0]["tensors"][0][1] = [1, 1]  # edited: the checksum no longer matches
    entry.write_text(json.dumps(doc))
    assert model_from_config(folder) == built
    entry.write_text("{broken")
    assert model_from_config(folder) == built
    assert json.loads(entry.read_text())["version"] == INVENTORY_VERSION  # written again, whole


def test_an_edited_config_or_processor_is_a_new_entry(tmp_path: Path):
    folder = write_model(tmp_path / "m", TINY_VLMS["qwen2_vl"])
    model_from_config(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({"max_pixels": 12845056}))
    assert vision_rule(model_from_config(folder)).max_pixels == 12_845_056
    write_model(folder, {**TINY_VLMS["qwen2_vl"], "text_config": {**TINY_VLMS["qwen2_vl"]["text_config"],
                                                                  "num_hidden_layers": 3}})
    assert model_from_config(folder).group("llm").config["num_hidden_layers"] == 3
    assert len(_entries()) == 3


_SECOND_LOAD = """
import sys
from planner.profile.hf_config import model_from_config
spec = model_from_config(sys.argv[1], trust_remote_code=sys.argv[2] == "1")
print(spec.params, "torch" in sys.modules, "transformers" in sys.modules)
"""


@pytest.mark.parametrize("which", ["llava", "remote"])
def test_a_cached_config_needs_neither_torch_nor_transformers(which: str, tmp_path: Path):
    """The second load of the same config.json imports neither (a subprocess, so nothing this
    test process imported counts) and gives the same model."""
    if which == "remote":
        folder, trust = write_model(tmp_path / "tiny", REMOTE_CONFIG, **REMOTE_FILES), "1"
    else:
        folder, trust = write_model(tmp_path / "llava", TINY_VLMS["llava"]), "0"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    runs = [subprocess.run([sys.executable, "-c", _SECOND_LOAD, str(folder), trust], env=env, capture_output=True,
                           text=True, timeout=300, cwd=tmp_path) for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr
    first, second = (run.stdout.split() for run in runs)
    assert first[1:] == ["True", "True"] and second[1:] == ["False", "False"]
    assert first[0] == second[0] == str(model_from_config(folder, trust_remote_code=trust == "1").params)
