"""`memplan explain` on a setup memplan does not model fully (an HF Trainer setup of a Qwen2
config.json that trains with attention dropout, which the decoder model leaves out): it says
UNKNOWN and names what is missing instead of "no fix needed"; when the modelled part alone is
over, fixes are still searched, and a setup that leaves something out is never offered as one."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from planner.cli import main
from tests.tiny_configs import TINY_QWEN2, write_config

DATA = Path(__file__).parents[1] / "data" / "explain"
DROPOUT_GAP = "dropout (attention_dropout 0.1) of llm: not modelled"


def explain(tmp_path: Path, host_ram: str, *more: str) -> str:
    model = str(write_config(tmp_path / "qwen", TINY_QWEN2, attention_dropout=0.1))
    args = ["explain", str(DATA / "training_args.json"), str(DATA / "ds_zero2_offload.json"), "--model", model,
            "--gpus", "3090", "--host-ram", host_ram, "--seq-len", "512", *more]
    result = CliRunner(env={"COLUMNS": "200"}).invoke(main, args)
    assert result.exit_code == 0, result.output
    return result.output


def test_unknown_is_said_not_no_fix_needed(tmp_path: Path):
    screen = " ".join(explain(tmp_path, "256GiB").split())
    assert "no fix needed" not in screen and "it fits as written" not in screen
    assert f"not modelled: {DROPOUT_GAP}" in screen
    assert "UNKNOWN as written: memplan does not model one part of this step (not modelled, above)" in screen
    doc = json.loads(explain(tmp_path, "256GiB", "--json"))
    assert doc["fits"] is None and doc["verdict"] == "UNKNOWN" and doc["unmodeled"] == [DROPOUT_GAP]
    assert doc["per_gpu"]["lower_bound"] is True and doc["fixes"] == []


def test_over_on_the_modelled_part_searches_fixes_but_offers_no_unknown_one(tmp_path: Path):
    """1 GiB of host RAM is over on the modelled part alone: DOES NOT FIT, and the fixes are
    searched (more host RAM, other setups, more GPUs); every setup found still trains the same
    config with dropout, so none is offered."""
    screen = " ".join(explain(tmp_path, "1GiB").split())
    assert "DOES NOT FIT on the modelled part alone: host RAM per node needs 2.00 GiB of 1.00 GiB" in screen
    assert "a setup that leaves out what is not modelled here is never a fix" in screen
    doc = json.loads(explain(tmp_path, "1GiB", "--json"))
    assert doc["fits"] is False and doc["verdict"] == "DOES NOT FIT" and doc["fixes"] == []
