"""`memplan estimate`'s verdict through the command line: FITS only when every byte is modelled,
UNKNOWN (``fits: null``) with what is missing and the modelled part as a lower bound, DOES NOT FIT
when the modelled part alone is over; sequences past learned positions refused (GPT-2), past a
RoPE model's trained length warned (Qwen2), from real config.json files."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from planner.cli import main
from tests.hostile import assert_refused
from tests.tiny_configs import TINY_GPT2, TINY_QWEN2, write_config

DUMMY_GAPS = [
    "activations of vpm (siglip_vision, on a dummy 224x224 image when a sample has none): no activation model",
    "activations of resampler (resampler, on a dummy 224x224 image when a sample has none): no activation model",
]
"""Text-only samples on MiniCPM: its training forward runs a dummy image through the (frozen)
vision tower and the resampler, which no simulator here models."""


def run(*args: str):
    return CliRunner(env={"COLUMNS": "200"}).invoke(main, list(args), catch_exceptions=False)


def estimate_json(*args: str) -> dict:
    result = run("estimate", *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_unknown_in_text_and_json():
    """MiniCPM-o with text-only samples fits on its modelled part, but the dummy image's forward
    through the vision tower is not modelled: UNKNOWN (``fits`` null) with what is missing, the GPU
    figure a lower bound; the exit status is still 0 (an estimate was made)."""
    args = ("--gpus", "2x3090", "--host-ram", "256GiB", "--images", "0")
    doc = estimate_json(*args)
    assert doc["fits"] is None and doc["verdict"] == "UNKNOWN" and doc["unmodeled"] == DUMMY_GAPS
    assert doc["per_gpu"]["lower_bound"] is True and doc["host"]["lower_bound"] is False
    assert not any("activation" in n for n in doc["notes"])  # said once, as unmodeled, not as a note
    text = run("estimate", *args)
    assert text.exit_code == 0
    out = " ".join(text.output.split())
    assert "FITS" not in out.replace("DOES NOT FIT", "")
    assert all(f"not modelled: {gap}" in out for gap in DUMMY_GAPS)
    assert "UNKNOWN: per GPU needs at least" in out and "GiB (a lower bound)" in out


def test_modelled_part_alone_over_does_not_fit():
    """A lower bound over its budget is certain: the same setup with 64 GiB of host RAM needs
    147.86 GiB of it on the modelled part alone (the host is all modelled), so it DOES NOT FIT."""
    args = ("--gpus", "2x3090", "--host-ram", "64GiB", "--images", "0")
    doc = estimate_json(*args)
    assert doc["fits"] is False and doc["verdict"] == "DOES NOT FIT" and doc["binding"] == "host"
    assert doc["unmodeled"] == DUMMY_GAPS
    out = " ".join(run("estimate", *args).output.split())
    assert "DOES NOT FIT on the modelled part alone: host RAM per node needs 147.86 GiB of 64.00 GiB" in out


def test_reference_case_still_fits():
    """MiniCPM-o 2.6 as finetune.py builds it is modelled through: FITS with 256 GiB, as before."""
    doc = estimate_json("--gpus", "2x3090", "--host-ram", "256GiB")
    assert doc["fits"] is True and doc["verdict"] == "FITS" and doc["unmodeled"] == []
    assert doc["per_gpu"]["lower_bound"] is False and doc["host"]["lower_bound"] is False
    out = " ".join(run("estimate", "--gpus", "2x3090", "--host-ram", "256GiB").output.split())
    assert "FITS: host RAM per node is the binding budget" in out and "not modelled" not in out


def test_sequence_past_learned_positions_is_refused(tmp_path: Path):
    """GPT-2's ``wpe`` has one row per position: 257 tokens cannot run on a 256-row table."""
    model = str(write_config(tmp_path / "gpt2", TINY_GPT2))
    assert_refused(["estimate", "--model", model, "--gpus", "1x3090", "--host-ram", "64GiB", "--seq-len", "257"],
                   tmp_path, r"--seq-len 257: gpt2 has learned absolute positions for 256 tokens only "
                             r"\(transformer\.wpe\.weight\)")
    assert estimate_json("--model", model, "--gpus", "1x3090", "--host-ram", "64GiB", "--seq-len", "256")


def test_rope_past_its_trained_length_is_a_warning(tmp_path: Path):
    """A RoPE model runs past ``max_position_embeddings``: a note, not an error, and the verdict
    is unchanged (the step is modelled)."""
    model = str(write_config(tmp_path / "qwen", TINY_QWEN2))
    common = ("--model", model, "--gpus", "1x3090", "--host-ram", "64GiB")
    doc = estimate_json(*common, "--seq-len", "1024")
    warned = [n for n in doc["notes"] if "max_position_embeddings 512" in n]
    assert len(warned) == 1 and warned[0].startswith("--seq-len 1024 is past qwen's trained length")
    assert doc["verdict"] == "FITS" and doc["unmodeled"] == []
    assert not [n for n in estimate_json(*common, "--seq-len", "512")["notes"] if "trained length" in n]
