"""The planning core runs without torch; what needs the ``train`` extra says so in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TINY = {"model_type": "qwen2", "vocab_size": 512, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "architectures": ["Qwen2ForCausalLM"]}


def _memplan_without_torch(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """memplan in a process where ``import torch`` fails as it does where torch is not installed."""
    blocked = tmp_path / "blocked"
    for name in ("torch", "transformers"):
        (blocked / name).mkdir(parents=True, exist_ok=True)
        (blocked / name / "__init__.py").write_text(f"raise ModuleNotFoundError(\"No module named '{name}'\")\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocked), str(Path(__file__).resolve().parents[2])])}
    code = "import sys; from planner.cli import main; main(sys.argv[1:])"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)


def test_estimate_and_tune_run_without_torch(tmp_path: Path):
    est = _memplan_without_torch(tmp_path, "estimate", "--gpus", "2x3090", "--host-ram", "64GiB", "--json")
    assert est.returncode == 0, est.stderr
    assert json.loads(est.stdout)["host"]["tensor_bytes"] == 154_467_317_760  # the reference case, as in test_cli
    tune = _memplan_without_torch(tmp_path, "tune", "--gpus", "2x3090", "--host-ram", "64GiB", "--out", "p")
    assert tune.returncode == 0, tune.stderr
    assert (tmp_path / "p" / "plan.json").is_file()


@pytest.mark.parametrize(("args", "what"), [
    (["trace", "--model", "qwen2.5-0.5b"], "memplan trace"),
    (["estimate", "--model", "m/config.json", "--gpus", "2x3090", "--host-ram", "64GiB"],
     "reading a local config.json"),
    (["train", "p"], "memplan train"),
])
def test_what_needs_torch_says_so_in_one_line(tmp_path: Path, args: list[str], what: str):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(TINY))
    out = _memplan_without_torch(tmp_path, *args)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert lines[0].startswith(f"memplan: error: {what} needs torch") and "pip install 'memplan[train]'" in lines[0]
