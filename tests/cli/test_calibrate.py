"""``memplan calibrate`` through click's runner: the refusal without a GPU, and the whole run with
the fake device put in through the command's one test seam (``planner.cli.calibrate.open_device``)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

import planner.cli.calibrate as calibrate_cli
from planner.cli import main
from planner.profile.calibration import load_calibration
from tests.fake_gpu import CONTEXT_BASE, MIB, TFLOPS, WORKSPACE, FakeDevice


@pytest.fixture(autouse=True)
def _config(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMPLAN_CONFIG_DIR", str(tmp_path / "config"))
    return tmp_path / "config"


def run(*args: str):
    return CliRunner().invoke(main, ["calibrate", *args], catch_exceptions=False)


def _fake(monkeypatch, device: FakeDevice | None = None) -> FakeDevice:
    device = device or FakeDevice()
    monkeypatch.setattr(calibrate_cli, "open_device", lambda: device)
    return device


def test_refuses_without_a_gpu(monkeypatch, _config):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = run()
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("memplan: error: memplan calibrate measures a real GPU, and there "
                                                   "is none here"), result.stderr
    assert not _config.exists()  # nothing written


def test_run_writes_the_profile_and_prints_the_table(monkeypatch, _config):
    _fake(monkeypatch)
    result = run()
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert all(len(line) <= 80 for line in out.splitlines()), max(out.splitlines(), key=len)
    for label in ("q100m fp32 eager 512", "q0.5b bf16 sdpa 2k", "q100m amp sdpa 1k z3"):
        assert label in out
    path = _config / "calibration" / "rtx3090.toml"
    assert f"written to {path}" in out.replace("\n", "")
    assert "cuBLAS workspace                32.0 MiB" in out and f"{TFLOPS:.1f} TFLOP/s" in out
    assert "not measured (one GPU)" in out
    profile = load_calibration("rtx3090")
    assert profile.cuda_context_bytes == CONTEXT_BASE + 15 * MIB and profile.cublas_workspace_bytes == WORKSPACE
    progress = result.stderr.splitlines()
    assert progress[0] == "memplan calibrate: [0/19] first matmul (cuBLAS workspace)"
    assert progress[-1] == "memplan calibrate: [19/19] done" and len(progress) == 20


def test_json(monkeypatch, _config):
    _fake(monkeypatch, FakeDevice(count=2, fail=frozenset({"q100m amp sdpa 2k"})))
    result = run("--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["path"] == str(_config / "calibration" / "rtx3090.toml")
    assert doc["gpu"] == "rtx3090" and doc["device"]["count"] == 2
    assert doc["profile"] == load_calibration("rtx3090").model_dump()
    assert doc["profile"]["link_gbytes_per_s"] == 12.5
    skipped = [s for s in doc["steps"] if s["skipped"]]
    assert [s["step"]["label"] for s in skipped] == ["q100m amp sdpa 2k"] and skipped[0]["measured"] is None
    assert {"tensor_bytes", "total_bytes", "step_s"} == set(doc["steps"][0]["predicted"])


def test_show(monkeypatch, _config):
    assert run("--show").stdout.startswith("no calibration profiles in")
    _fake(monkeypatch)
    assert run().exit_code == 0
    shown = run("--show")
    assert shown.exit_code == 0 and shown.stdout.startswith(f"rtx3090: {_config / 'calibration' / 'rtx3090.toml'}")
    one = run("--show", "--gpu", "rtx3090", "--json")
    assert json.loads(one.stdout)[0]["cublas_workspace_bytes"] == WORKSPACE
    missing = run("--show", "--gpu", "h200")
    assert missing.exit_code == 2 and "no calibration profile for h200" in missing.stderr


def test_show_broken_profile_is_one_line(_config):
    path = _config / "calibration" / "rtx3090.toml"
    path.parent.mkdir(parents=True)
    path.write_text('gpu = "rtx3090"\nbogus = 1\n')
    result = run("--show")
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert f"{path}: measured: Field required" in result.stderr


def test_unknown_device_asks_for_gpu(monkeypatch, _config):
    _fake(monkeypatch, FakeDevice(name="NVIDIA Mystery 9000"))
    result = run()
    assert result.exit_code == 2 and "--gpu" in result.stderr and not _config.exists()
    named = run("--gpu", "rtx3090", "--json")
    assert named.exit_code == 0 and json.loads(named.stdout)["gpu"] == "rtx3090"


def test_help_lists_calibrate():
    result = CliRunner().invoke(main, ["--help"])
    assert "calibrate" in result.output
    assert "Examples:" in run("--help").output


def test_without_torch_says_so_in_one_line(tmp_path):
    from tests.cli.test_light_core import _memplan_without_torch

    out = _memplan_without_torch(tmp_path, "calibrate")
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert lines[0].startswith("memplan: error: memplan calibrate needs torch") and "memplan[train]" in lines[0]
    shown = _memplan_without_torch(tmp_path, "calibrate", "--show")  # reading profiles needs no torch
    assert shown.returncode == 0 and shown.stdout.startswith("no calibration profiles"), shown.stderr
