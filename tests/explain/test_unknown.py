"""`memplan explain` on a setup memplan does not model fully (MiniCPM-o's own launch script with
text-only samples: the dummy image through the vision tower is not modelled): it says UNKNOWN and
names what is missing instead of "no fix needed"; when the modelled part alone is over, fixes are
still searched, and a setup that leaves something out is never offered as one."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from planner.cli import main

SCRIPT = Path(__file__).parents[1] / "data" / "explain" / "finetune_ds.sh"
DUMMY_GAP = "activations of vpm (siglip_vision, on a dummy 224x224 image when a sample has none): no activation model"


def explain(host_ram: str, *more: str) -> str:
    args = ["explain", str(SCRIPT), "--gpus", "3090", "--host-ram", host_ram, "--images", "0", *more]
    result = CliRunner(env={"COLUMNS": "200"}).invoke(main, args)
    assert result.exit_code == 0, result.output
    return result.output


def test_unknown_is_said_not_no_fix_needed():
    screen = " ".join(explain("256GiB").split())
    assert "no fix needed" not in screen and "it fits as written" not in screen
    assert f"not modelled: {DUMMY_GAP}" in screen
    assert "UNKNOWN as written: memplan does not model 2 parts of this step (not modelled, above)" in screen
    assert "binding budget: host RAM per node, at its optimizer peak: 147.86 GiB of 256.00 GiB" in screen
    doc = json.loads(explain("256GiB", "--json"))
    assert doc["fits"] is None and doc["verdict"] == "UNKNOWN" and DUMMY_GAP in doc["unmodeled"]
    assert doc["per_gpu"]["lower_bound"] is True and doc["fixes"] == []


def test_over_on_the_modelled_part_searches_fixes_but_offers_no_unknown_one():
    """64 GiB of host RAM is over on the modelled part alone: DOES NOT FIT, and the fixes are
    searched (more host RAM, other setups, more GPUs); every setup found still runs the dummy
    image, so none is offered."""
    screen = " ".join(explain("64GiB").split())
    assert "DOES NOT FIT on the modelled part alone: host RAM per node needs 147.86 GiB" in screen
    assert "a setup that leaves out what is not modelled here is never a fix" in screen
    doc = json.loads(explain("64GiB", "--json"))
    assert doc["fits"] is False and doc["verdict"] == "DOES NOT FIT" and doc["fixes"] == []
