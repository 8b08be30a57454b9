"""The LLaMA-Factory YAMLs memplan writes, through LLaMA-Factory's own argument parser.

LLaMA-Factory cannot live in the test environment (it pins deepspeed<=0.18.4 and checks
transformers<=5.6.0), so this runs only where ``MEMPLAN_LLAMAFACTORY_PYTHON`` names the python of
a venv that has it (docs/trainer-keys.md shows how to make one); CI skips it.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from planner.workload.options import Precision
from planner.writers import write_plan_folder
from tests.search.test_tune import PLANS

LF_PYTHON = os.environ.get("MEMPLAN_LLAMAFACTORY_PYTHON")
CHECKER = Path(__file__).resolve().parents[2] / "tools" / "check_llamafactory.py"

pytestmark = pytest.mark.skipif(not LF_PYTHON, reason="MEMPLAN_LLAMAFACTORY_PYTHON is not set")


@pytest.mark.parametrize("plan", PLANS, ids=lambda p: f"{p.cluster.gpus}:{p.candidate}")
def test_llamafactory_accepts_what_we_write(plan, tmp_path: Path):
    write_plan_folder(plan, tmp_path / "plan")
    yaml_path = tmp_path / "plan" / "llamafactory.yaml"
    if plan.options.precision is Precision.PURE_BF16 and plan.zero3:
        assert not yaml_path.exists()  # LLaMA-Factory refuses it; memplan does not write it
        return
    run = subprocess.run([LF_PYTHON, str(CHECKER), str(yaml_path), "--world-size", str(plan.cluster.world_size),
                          "--hidden-size", str(plan.model.hidden_size)], cwd=tmp_path / "plan",
                         env=os.environ | {"DISABLE_VERSION_CHECK": "1"}, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0 and "ok" in run.stdout, run.stdout + run.stderr
