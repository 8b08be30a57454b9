"""``memplan estimate --model DIR`` for vision-language models, models that ship their own code, and
what is refused, through the CLI; and a cached config.json estimated without torch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cli.test_light_core import _memplan_without_torch
from tests.hostile import assert_refused, run_cli
from tests.tiny_vlm import REMOTE_CONFIG, REMOTE_FILES, TINY_VLMS, write_model

HOST = ["--gpus", "1x4090", "--host-ram", "64GiB"]


def _estimate(folder: Path, *args: str) -> dict:
    out = run_cli(["estimate", "--model", str(folder), *HOST, "--json", *args], folder.parent, seconds=120)
    assert out.exit_code == 0, out.stderr
    return json.loads(out.stdout)


def test_images_for_llava(tmp_path: Path):
    """--images and --image-size work as for MiniCPM: each image's LLM tokens count inside the
    context, and the tower that runs on them is named as not modelled."""
    folder = write_model(tmp_path / "llava", TINY_VLMS["llava"])
    doc = _estimate(folder, "--images", "2", "--image-size", "640x480", "--seq-len", "2048")
    assert doc["workload"]["images"] == 2 and doc["workload"]["vision"]["family"] == "llava"
    assert any(n.startswith("images: 2 per sample; LLaVA") and "576 LLM tokens" in n for n in doc["notes"])
    assert [g["name"] for g in doc["groups"]][:3] == ["llm", "vision_tower", "multi_modal_projector"]
    # The tower and the projector run on the images: the whole step is traced on reduced copies
    # of the real model (tests/cli/test_vlm_traced.py judges the figures), nothing is unmodelled.
    assert not [u for u in doc["unmodeled"] if "activations of" in u], doc["unmodeled"]
    assert doc["verdict"] != "UNKNOWN"
    default = _estimate(folder, "--seq-len", "2048")  # one image per sample where a tower is built
    assert default["workload"]["images"] == 1
    text_only = _estimate(folder, "--images", "0")
    assert "activations of vision_tower" not in " ".join(text_only["unmodeled"])


def test_a_frozen_tower_that_runs_is_still_counted(tmp_path: Path):
    folder = write_model(tmp_path / "q", TINY_VLMS["qwen2_vl"])
    doc = _estimate(folder, "--freeze", "vision_tower,multi_modal_projector", "--image-size", "448x448")
    groups = {g["name"]: g for g in doc["groups"]}
    assert groups["vision_tower"]["trainable_params"] == 0
    assert not [u for u in doc["unmodeled"] if "activations of" in u], doc["unmodeled"]  # frozen, run, traced
    assert any("448x448 resized to 448x448" in n and "258 LLM tokens" in n for n in doc["notes"])  # 32x32/4 + 2


@pytest.mark.parametrize(("family", "args", "match"), [
    ("llava", ["--images", "2"], r"--images 2 take 2 x 576 = 1,152 LLM tokens, more than --seq-len 1,024"),
    ("idefics3", ["--images", "1"], r"--images 1 take 1 x 2913 = 2,913 LLM tokens"),
    ("internvl", ["--images", "1"], r"no image-token rule for .* vision tower vision_tower \(internvl_vision\)"),
    ("qwen2_vl", ["--image-size", "9000x40", "--seq-len", "8192"], r"aspect ratio over 200"),
])
def test_images_a_model_cannot_take_are_one_line(family: str, args: list[str], match: str, tmp_path: Path):
    write_model(tmp_path / "m", TINY_VLMS[family])
    assert_refused(["estimate", "--model", "m", *HOST, *args], tmp_path, match)


def _remote(root: Path, **drop: bool) -> Path:
    return write_model(root / "tiny", REMOTE_CONFIG, **{k: v for k, v in REMOTE_FILES.items() if k not in drop})


@pytest.mark.parametrize(("setup", "extra", "match"), [
    (lambda root: write_model(root / "m", {"model_type": "bert", "architectures": ["BertForMaskedLM"]}), [],
     r"memplan plans causal-LM fine-tuning; 'bert' is an encoder-only model \(BertForMaskedLM\)"),
    (lambda root: write_model(root / "m", {"model_type": "t5", "is_encoder_decoder": True}), [],
     r"'t5' is an encoder-decoder model"),
    (lambda root: write_model(root / "m", {"model_type": "lava"}), [], r"knows no model_type 'lava'"),
    (lambda root: write_model(root / "m", {**TINY_VLMS["llava"], "text_config": 7}), [],
     r"text_config must be an object"),
    (lambda root: write_model(root / "m", {**TINY_VLMS["gemma3"], "vision_config": None}), [],
     r"a gemma3 config needs its vision_config"),
    (lambda root: _remote(root), [], r"only with --trust-remote-code"),
    (lambda root: _remote(root, **{"modeling_tiny.py": True}), ["--trust-remote-code"],
     r"names modeling_tiny\.py, which is not in"),
    (lambda root: _remote(root, **{"tiny_layers.py": True}), ["--trust-remote-code"],
     r"modeling_tiny\.py imports tiny_layers\.py, which is not in"),
])
def test_bad_local_models_are_one_line_exit_2(setup, extra: list[str], match: str, tmp_path: Path):
    folder = setup(tmp_path)
    assert_refused(["estimate", "--model", folder.name, *HOST, *extra], tmp_path, match, seconds=120)


def test_trust_remote_code_builds_from_the_folder(tmp_path: Path):
    folder = _remote(tmp_path)
    doc = _estimate(folder, "--trust-remote-code", "--images", "0")
    assert [g["name"] for g in doc["groups"]][:3] == ["llm", "vpm", "resampler"]
    assert_refused(["estimate", "--model", "tiny", *HOST, "--trust-remote-code", "--images", "1"], tmp_path,
                   r"no image-token rule for .* vision tower vpm;")


def test_a_cached_config_is_estimated_without_torch(tmp_path: Path):
    """Once read, the same config.json is estimated where torch and transformers cannot be imported."""
    folder = write_model(tmp_path / "m", TINY_VLMS["llava"])
    first = _estimate(folder, "--seq-len", "2048")
    out = _memplan_without_torch(tmp_path, "estimate", "--model", "m", *HOST, "--json", "--seq-len", "2048")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["groups"] == first["groups"]
