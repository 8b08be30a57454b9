"""`memplan estimate`'s verdict through the command line: FITS only when every byte is modelled,
UNKNOWN (``fits: null``) with what is missing and the modelled part as a lower bound, DOES NOT FIT
when the modelled part alone is over; MiniCPM's media and training dummies modelled; sequences
past learned positions refused (GPT-2), past a RoPE model's trained length warned (Qwen2), from
real config.json files."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from planner.cli import main
from tests.hostile import assert_refused
from tests.tiny_configs import TINY_GPT2, TINY_QWEN2, write_config

EIGHT_BIT_GAP = ["activations of llm (model_type 'gpt2'): the optimizer bitsandbytes.optim.AdamW8bit is not traced"]
"""GPT-2 has no simulator: its step memory comes from traced steps (`estimate.generic`), and the
tracer does not run bitsandbytes' 8-bit AdamW, so that step is genuinely not modelled."""


def run(*args: str):
    return CliRunner(env={"COLUMNS": "200"}).invoke(main, list(args), catch_exceptions=False)


def estimate_json(*args: str) -> dict:
    result = run("estimate", *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def gpt2_8bit(tmp_path: Path, host_ram: str) -> tuple[str, ...]:
    """A GPT-2 config.json trained with 8-bit AdamW on one RTX 3090 (nothing is traced for it)."""
    model = str(write_config(tmp_path / "gpt2", TINY_GPT2))
    return ("--model", model, "--gpus", "1x3090", "--host-ram", host_ram, "--engine", "torch",
            "--optimizer", "adamw-8bit", "--seq-len", "128")


def test_unknown_in_text_and_json(tmp_path: Path):
    """GPT-2 with an 8-bit optimizer fits on its modelled part, but its step's activations are
    not modelled: UNKNOWN (``fits`` null) with what is missing, the GPU figure a lower bound; the
    exit status is still 0 (an estimate was made)."""
    args = gpt2_8bit(tmp_path, "64GiB")
    doc = estimate_json(*args)
    assert doc["fits"] is None and doc["verdict"] == "UNKNOWN" and doc["unmodeled"] == EIGHT_BIT_GAP
    assert doc["per_gpu"]["lower_bound"] is True and doc["host"]["lower_bound"] is False
    assert not any("activation" in n for n in doc["notes"])  # said once, as unmodeled, not as a note
    text = run("estimate", *args)
    assert text.exit_code == 0
    out = " ".join(text.output.split())
    assert "FITS" not in out.replace("DOES NOT FIT", "")
    assert all(f"not modelled: {gap}" in out for gap in EIGHT_BIT_GAP)
    assert "UNKNOWN: per GPU needs at least" in out and "(a lower bound)" in out


def test_modelled_part_alone_over_does_not_fit(tmp_path: Path):
    """A lower bound over its budget is certain: the same setup with 1 GiB of host RAM needs
    2.00 GiB of it on the modelled part alone (the host is all modelled), so it DOES NOT FIT."""
    args = gpt2_8bit(tmp_path, "1GiB")
    doc = estimate_json(*args)
    assert doc["fits"] is False and doc["verdict"] == "DOES NOT FIT" and doc["binding"] == "host"
    assert doc["unmodeled"] == EIGHT_BIT_GAP
    out = " ".join(run("estimate", *args).output.split())
    assert "DOES NOT FIT on the modelled part alone: host RAM per node needs 2.00 GiB of 1.00 GiB" in out


def test_minicpm_text_only_and_audio_are_modelled():
    """MiniCPM's training dummies (a 224x224 image when a sample has none, 1 s of audio when it
    has none) and the audio projection are modelled: text-only samples and samples with audio
    get a verdict, not UNKNOWN."""
    for media in (("--images", "0"), ("--audio-seconds", "10"), ("--images", "0", "--audio-seconds", "10")):
        doc = estimate_json("--model", "minicpm-o-2.6", "--gpus", "2x3090", "--host-ram", "256GiB", *media)
        assert doc["verdict"] == "FITS" and doc["unmodeled"] == [], media
    doc = estimate_json("--gpus", "2x3090", "--host-ram", "256GiB", "--images", "0")  # the reference, text only
    assert doc["verdict"] == "FITS" and doc["unmodeled"] == [] and doc["per_gpu"]["lower_bound"] is False


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
