"""End to end on the CPU: `memplan tune --launch` plans a tiny random Qwen2, writes its files and
trains it for real through DeepSpeed on two ranks (gloo); then the written launch.sh trains it
again. Both runs use only what tune wrote (DeepSpeed JSON, TrainingArguments, plan.json)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from planner.cli import main
from planner.plan import Plan
from tests.train.test_train import REPO, TRAIN_TIMEOUT_S, _losses, tiny  # noqa: F401  (tiny is a fixture)

pytestmark = pytest.mark.judge

STEPS = 4
TRAINER_FLAGS = ["--max_steps", str(STEPS), "--lr_scheduler_type", "constant", "--warmup_steps", "0",
                 "--save_strategy", "no"]


@pytest.fixture()
def cpu_env(monkeypatch):
    for key, value in {"DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
                       "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
                       "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}.items():
        monkeypatch.setenv(key, value)


def test_tune_launch_trains_with_what_it_wrote(tmp_path: Path, tiny: Path, cpu_env):  # noqa: F811
    plan_dir, data = tmp_path / "plan", tiny.parent / "data.jsonl"
    # fp32: HF TrainingArguments refuse bf16 on a machine without a bf16 GPU (the CPU here).
    result = CliRunner().invoke(main, [
        "tune", "--model", str(tiny / "config.json"), "--gpus", "2x3090", "--host-ram", "64GiB",
        "--engine", "deepspeed", "--precision", "fp32", "--global-batch", "4", "--seq-len", "64",
        "--min-seq-len", "64", "--data", str(data), "--learning-rate", "1e-3", "--output-dir",
        str(tmp_path / "out"), "--out", str(plan_dir), "--launch", "--", *TRAINER_FLAGS])
    assert result.exit_code == 0, result.output[-4000:]
    plan = Plan.read(plan_dir / "plan.json")
    assert plan.deepspeed and plan.model.path == str(tiny.resolve())
    (attempt,) = sorted((plan_dir / "attempts").iterdir())
    record = json.loads((attempt / "result.json").read_text())
    assert record["returncode"] == 0 and record["failure"] is None
    assert record["reported"]["steps"] == str(STEPS)
    assert json.loads((attempt / "command.json").read_text())["argv"][:2] == ["torchrun", "--standalone"]
    assert (attempt / "ds_config.json").read_text() == (plan_dir / "ds_config.json").read_text()
    losses = _losses((attempt / "output.log").read_text())
    assert len(losses) == STEPS and losses[-1] < losses[0], losses
    assert float(record["reported"]["final_loss"]) == pytest.approx(losses[-1], rel=1e-3)

    # The written launch.sh, run as a user would, trains the same plan again.
    run = subprocess.run(["bash", str(plan_dir / "launch.sh"), *TRAINER_FLAGS], cwd=tmp_path,
                         env=os.environ | {"DATA": str(data)}, capture_output=True, text=True,
                         timeout=TRAIN_TIMEOUT_S)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    again = _losses(run.stdout)
    assert len(again) == STEPS and again[-1] < again[0], again
    assert "memplan-train: " in run.stdout
