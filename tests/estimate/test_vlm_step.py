"""A vision-language model's step traced whole (planner.estimate.generic, "vision-language"): which
steps take that route, the setup its traces are keyed by, what cannot be traced and why, and that
a text model's key is what it was. Pure: the terms themselves are judged in
tests/cli/test_vlm_traced.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from planner.estimate import estimate, generic
from planner.estimate.fitted import FitSpec
from planner.profile.catalog import load_catalog
from planner.profile.hardware import make_cluster
from planner.profile.hf_config import model_from_config
from planner.profile.hf_groups import VLM_CONFIG
from planner.workload.inventory import Workload, trainable_inventory
from planner.workload.options import Attention, Engine, LoraOptions, Precision, TrainingOptions
from planner.workload.vision import vision_rule
from tests.tiny_vlm import TINY_VLMS, write_model

OPTS = dict(engine=Engine.TORCH, precision=Precision.AMP_BF16, attn=Attention.SDPA)


def _model(family: str, tmp_path: Path):  # noqa: ANN202
    return model_from_config(write_model(tmp_path / family, TINY_VLMS[family]))


def _workload(model, images: int, size: tuple[int, int] = (640, 480)) -> Workload:  # noqa: ANN001
    return Workload(micro_batch=1, seq_len=4096, images=images, image_size=size, vision=vision_rule(model))


def test_the_tower_carries_the_config_the_judge_builds(tmp_path: Path) -> None:
    cfg = _model("llava", tmp_path).group("vision_tower").config[VLM_CONFIG]
    assert cfg["model_type"] == "llava" and cfg["vision_config"]["image_size"] == 336
    assert "architectures" not in cfg  # names, versions and storage dtypes do not change a step


@pytest.mark.parametrize(("family", "images", "whole"), [
    ("llava", 2, True), ("llava", 0, False),  # text only: Llama's simulator
    ("qwen2_vl", 0, True),  # qwen2_vl_text has no causal-LM class: its text step runs inside the VLM
    ("gemma3", 1, True), ("idefics3", 1, False), ("qwen3_vl", 1, False),
])
def test_which_steps_are_traced_whole(family: str, images: int, whole: bool, tmp_path: Path) -> None:
    model = _model(family, tmp_path)
    step = generic.vlm_step(model, _workload(model, images))
    assert (step is not None) == whole
    if whole:
        assert step.groups == ("llm", "vision_tower", "multi_modal_projector")


def test_the_key_holds_the_images_and_what_is_frozen(tmp_path: Path) -> None:
    model = _model("qwen2_vl", tmp_path)
    workload = _workload(model, 2)
    opts = TrainingOptions(**OPTS, freeze=("vision_tower",))
    step = generic.vlm_step(model, workload)
    spec = generic.vlm_fit_spec(step, trainable_inventory(model, opts), opts, workload, model.groups)
    # smart_resize: 640x480 -> 644x476 (multiples of 28), the size the tower sees.
    assert (spec.images, spec.image_size, spec.frozen_groups) == (2, (644, 476), ("vision_tower",))
    lora = TrainingOptions(**OPTS, lora=LoraOptions(rank=8))
    spec = generic.vlm_fit_spec(step, trainable_inventory(model, lora), lora, workload, model.groups)
    assert (spec.lora["r"], spec.lora["targets"]) == (8, ["k_proj", "o_proj", "q_proj", "v_proj"])
    assert spec.frozen_groups == ("multi_modal_projector", "vision_tower")


@pytest.mark.parametrize(("options", "why"), [
    (dict(lora=LoraOptions(rank=8, targets=("qkv",), groups=("vision_tower",))), "LoRA inside vision_tower"),
    (dict(lora=LoraOptions(rank=8), train=("llm", "multi_modal_projector")), "modules_to_save"),
])
def test_what_is_not_traced_says_why(options: dict, why: str, tmp_path: Path) -> None:
    model = _model("qwen2_vl", tmp_path)
    opts = TrainingOptions(**OPTS, **options)
    workload = _workload(model, 1)
    est = estimate(model, make_cluster("1x3090", load_catalog(), 64 * 2**30), opts, workload)
    assert est.fits is None
    assert any(why in str(u) for u in est.unmodeled), est.unmodeled


def test_an_untraced_family_is_unknown_with_its_reason(tmp_path: Path) -> None:
    model = _model("idefics3", tmp_path)
    est = estimate(model, make_cluster("1x3090", load_catalog(), 64 * 2**30), TrainingOptions(**OPTS),
                   _workload(model, 1))
    gaps = [str(u) for u in est.unmodeled if "vision_tower" in str(u)]
    assert gaps and "fake-tensor trace cannot run" in gaps[0]


def test_a_text_models_key_is_unchanged() -> None:
    """The vision-language fields enter the key only where set: text terms cached before stay valid."""
    spec = FitSpec("amp-bf16", "sdpa", False, "adamw-fused", True)
    assert spec.key() == ('{"attn":"sdpa","clip":true,"frozen_layer_names":[],"frozen_parts":[],"grad_ckpt":false,'
                          '"lora":null,"optimizer":"adamw-fused","precision":"amp-bf16"}')
