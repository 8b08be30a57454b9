"""Calibration profiles (planner.profile.calibration): where they live, the TOML written and read
back, and every broken or hostile file refused in one line naming the file and the field."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import pytest

from planner.errors import ProfileError
from planner.profile.calibration import (
    MAX_CALIBRATION_FILE_BYTES,
    CalibrationProfile,
    calibration_path,
    config_dir,
    load_calibration,
    save_calibration,
    to_toml,
    toml_string,
)

FULL = CalibrationProfile(
    gpu="rtx3090", measured="2026-12-05", torch_version="2.13.0+cu128", cuda_version="12.8",
    cuda_context_bytes=415 * 2**20, cublas_workspace_bytes=32 * 2**20, fragmentation_expected=0.04,
    fragmentation_high=0.08, achieved_bf16_tflops=71.5, link_gbytes_per_s=None,
    source='memplan calibrate: 16 of 16 steps on 1x NVIDIA "GeForce" RTX 3090 \\ é',
)


@pytest.fixture(autouse=True)
def _config(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMPLAN_CONFIG_DIR", str(tmp_path / "config"))
    return tmp_path / "config"


def test_config_dir_order(monkeypatch, tmp_path):
    monkeypatch.setenv("MEMPLAN_CONFIG_DIR", str(tmp_path / "own"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert config_dir() == tmp_path / "own"
    monkeypatch.delenv("MEMPLAN_CONFIG_DIR")
    assert config_dir() == tmp_path / "xdg" / "memplan"
    monkeypatch.setenv("XDG_CONFIG_HOME", "relative/dir")  # the XDG spec: relative paths are ignored
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert config_dir() == tmp_path / "home" / ".config" / "memplan"
    monkeypatch.delenv("XDG_CONFIG_HOME")
    assert config_dir() == tmp_path / "home" / ".config" / "memplan"


def test_path_per_gpu_and_no_escape(_config):
    assert calibration_path("rtx3090") == _config / "calibration" / "rtx3090.toml"
    for bad in ("../evil", "a/b", "", "RTX3090", "..", ".hidden", "x" * 65):
        with pytest.raises(ProfileError, match="not a GPU profile name"):
            calibration_path(bad)


def test_round_trip(_config):
    path = save_calibration(FULL)
    assert path == _config / "calibration" / "rtx3090.toml"
    assert load_calibration("rtx3090") == FULL
    doc = tomllib.loads(path.read_text())
    assert "link_gbytes_per_s" not in doc  # None: left out (TOML has no null)
    assert doc["source"] == FULL.source
    assert [p.name for p in path.parent.iterdir()] == ["rtx3090.toml"]  # no temporary file left
    assert oct(path.stat().st_mode & 0o777) == "0o644"


def test_overwrite_replaces_the_file():
    save_calibration(FULL)
    newer = FULL.model_copy(update={"measured": "2027-01-02", "achieved_bf16_tflops": 70.0})
    save_calibration(newer)
    assert load_calibration("rtx3090") == newer


def test_missing_is_none():
    assert load_calibration("rtx3090") is None


@pytest.mark.parametrize("text", [
    "", "a\\b", 'say "hi"', "tab\there", "line\nbreak\r\n", "\x00\x01\x1f\x7f", "é ü 中文 🎉", "\ud800 lone",
    "''' \"\"\" ${HOME} $(rm -rf /)", "\\u0041 is not A",
])
def test_toml_string_escapes_everything(text):
    parsed = tomllib.loads(f"v = {toml_string(text)}")["v"]
    assert parsed == text.replace("\ud800", "\ufffd")


def test_written_file_is_flat_key_values():
    lines = [line for line in to_toml(FULL).splitlines() if not line.startswith("#")]
    assert all(" = " in line and line.split(" = ")[0].isidentifier() for line in lines)


def _write(config: Path, text: str | bytes, name: str = "rtx3090") -> Path:
    path = config / "calibration" / f"{name}.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


GOOD = to_toml(FULL)


@pytest.mark.parametrize(("text", "what"), [
    ("gpu = ", "not valid TOML"),
    (GOOD.replace("cuda_context_bytes = 435159040", 'cuda_context_bytes = "435159040"'),
     "cuda_context_bytes: Input should be a valid integer"),
    (GOOD + "cuda_contxt_bytes = 5\n", "cuda_contxt_bytes: Extra inputs are not permitted"),
    (GOOD.replace("fragmentation_high = 0.08", "fragmentation_high = 0.01"), "below fragmentation_expected"),
    (GOOD.replace("fragmentation_high = 0.08", "fragmentation_high = nan"), "fragmentation_high: Input should be"),
    (GOOD.replace("fragmentation_high = 0.08", "fragmentation_high = 1e9"), "fragmentation_high: Input should be"),
    (GOOD.replace('measured = "2026-12-05"', "measured = 2026-12-05"), "measured: Input should be a valid string"),
    (GOOD.replace('measured = "2026-12-05"', 'measured = "yesterday"'), "measured: 'yesterday' is not an ISO date"),
    (GOOD.replace('gpu = "rtx3090"', 'gpu = "a100-80gb"'), "gpu: the profile is for 'a100-80gb', not 'rtx3090'"),
    (GOOD.replace('gpu = "rtx3090"', 'gpu = "../../etc"'), "gpu: '../../etc' is not a GPU profile name"),
    (GOOD.replace("achieved_bf16_tflops = 71.5", "achieved_bf16_tflops = -1.0"), "achieved_bf16_tflops: Input"),
    (GOOD.replace("cuda_context_bytes = 435159040", "cuda_context_bytes = true"), "cuda_context_bytes: Input"),
    (GOOD.replace("cuda_context_bytes = 435159040", "[cuda_context_bytes]\nx = 1"), "cuda_context_bytes: Input"),
    (GOOD.replace('source = "', 'source = "\\u001b[31m'), "source: must be one line of printable text"),
    (GOOD.replace('torch_version = "2.13.0+cu128"\n', ""), "torch_version: Field required"),
    (GOOD + '"evil\\nkey" = 1\n', "evil\\nkey: Extra inputs"),
    (b"\xff\xfe" + GOOD.encode(), "not UTF-8 text"),
    ("x" * (MAX_CALIBRATION_FILE_BYTES + 1), "larger than 64 KiB"),
])
def test_broken_or_hostile_file_is_one_line_naming_file_and_field(_config, text, what):
    path = _write(_config, text)
    with pytest.raises(ProfileError) as err:
        load_calibration("rtx3090")
    msg = str(err.value)
    assert msg.startswith(f"{path}: ") and what in msg, msg
    assert "\n" not in msg and msg.isprintable()


def test_not_a_regular_file(_config):
    (_config / "calibration" / "rtx3090.toml").mkdir(parents=True)
    with pytest.raises(ProfileError, match="not a regular file"):
        load_calibration("rtx3090")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs")
def test_a_fifo_does_not_hang(_config):
    path = _config / "calibration" / "rtx3090.toml"
    path.parent.mkdir(parents=True)
    os.mkfifo(path)
    with pytest.raises(ProfileError, match="not a regular file"):
        load_calibration("rtx3090")


def test_unwritable_folder_is_one_line(_config):
    _config.mkdir(parents=True)
    (_config / "calibration").write_text("a file where the folder should be")
    with pytest.raises(ProfileError, match="cannot write the calibration"):
        save_calibration(FULL)
