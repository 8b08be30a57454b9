"""Plan folders are written safely: never over a file memplan did not write or the user edited,
never two runs into one folder, never half-written (rolled back on an error mid-swap)."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

import planner.writers as writers
from planner.errors import ProfileError
from planner.plan import Plan
from planner.writers import write_plan_folder
from tests.hostile import assert_refused, run_cli, snapshot


@pytest.fixture(scope="module")
def plans(tmp_path_factory) -> tuple[Plan, Plan]:
    """Two different plans of the reference case (256 and 64 GiB hosts; the second is LoRA)."""
    tmp = tmp_path_factory.mktemp("plans")
    out = []
    for ram in ("256GiB", "64GiB"):
        result = run_cli(["tune", "--gpus", "2x3090", "--host-ram", ram, "--target", "minicpm", "--out", ram], tmp,
                         seconds=300)
        assert result.exit_code == 0, result.stderr
        out.append(Plan.read(tmp / ram / "plan.json"))
    assert out[0].candidate != out[1].candidate
    return out[0], out[1]


def test_force_replaces_only_what_memplan_wrote(plans, tmp_path: Path):
    first, second = plans
    out = tmp_path / "plan"
    write_plan_folder(first, out)
    (out / "notes.txt").write_text("mine")
    (out / "attempts").mkdir()
    write_plan_folder(second, out, force=True)  # every file still as written: replaced
    assert Plan.read(out / "plan.json").candidate == second.candidate
    assert (out / "notes.txt").read_text() == "mine" and (out / "attempts").is_dir()

    # A file the user edited after memplan wrote it: refused, nothing changed.
    (out / "launch.sh").write_text((out / "launch.sh").read_text() + "# my change\n")
    before = snapshot(tmp_path)
    with pytest.raises(ProfileError, match="launch.sh was changed since memplan wrote it"):
        write_plan_folder(first, out, force=True)
    assert snapshot(tmp_path) == before


def test_force_never_replaces_a_file_memplan_did_not_write(plans, tmp_path: Path):
    out = tmp_path / "plan"
    out.mkdir()
    (out / "launch.sh").write_text("#!/bin/sh\necho my own launcher\n")
    args = ["tune", "--gpus", "2x3090", "--host-ram", "256GiB", "--out", str(out), "--force"]
    assert_refused(args, tmp_path, match=r"launch\.sh.* already there|launch\.sh there was not written by memplan")
    write_plan_folder(plans[0], tmp_path / "other")
    (tmp_path / "other" / "launch.sh").unlink()
    (tmp_path / "other" / "launch.sh").write_text("#!/bin/sh\n")  # listed, but not memplan's text
    with pytest.raises(ProfileError, match="changed since memplan wrote it"):
        write_plan_folder(plans[1], tmp_path / "other", force=True)


def test_force_onto_a_plan_json_folder_changes_nothing(plans, tmp_path: Path):
    out = tmp_path / "plan"
    write_plan_folder(plans[0], out)
    (out / "plan.json").unlink()
    (out / "plan.json").mkdir()
    before = snapshot(tmp_path)
    with pytest.raises(ProfileError, match="not a plan memplan wrote"):
        write_plan_folder(plans[1], out, force=True)
    assert snapshot(tmp_path) == before


def test_one_writer_at_a_time_and_no_silent_replacement(plans, tmp_path: Path):
    out = tmp_path / "empty"
    out.mkdir()
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another memplan run holds the folder
        with pytest.raises(ProfileError, match="another memplan run is writing"):
            write_plan_folder(plans[0], out)
    finally:
        os.close(fd)
    assert list(out.iterdir()) == []
    write_plan_folder(plans[0], out)
    with pytest.raises(ProfileError, match="already there"):  # the second of two runs
        write_plan_folder(plans[1], out)
    # A folder that appears between the check and the rename is never replaced, even empty.
    tmp = tmp_path / "staged"
    tmp.mkdir()
    (tmp / "x").write_text("new")
    taken = tmp_path / "taken"
    taken.mkdir()
    assert writers._rename_noreplace(tmp, taken) is False
    assert list(taken.iterdir()) == [] and (tmp / "x").exists()


def test_an_error_in_the_middle_of_the_swap_is_undone(plans, tmp_path: Path, monkeypatch):
    out = tmp_path / "plan"
    write_plan_folder(plans[0], out)
    before = snapshot(tmp_path)
    real = os.replace
    calls = {"n": 0}

    def failing(src, dst):
        calls["n"] += 1
        if calls["n"] == 4 and not str(src).endswith(".old"):
            raise OSError(5, "Input/output error")
        real(src, dst)

    monkeypatch.setattr(writers.os, "replace", failing)
    with pytest.raises(ProfileError, match="Input/output error"):
        write_plan_folder(plans[1], out, force=True)
    monkeypatch.undo()
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(("args", "match"), [
    (["--gpu", "2x4090"], r"No such option '--gpu'.*--gpus"),
    (["--out", ""], r"--out.*needs a folder name"),
    (["--data", ""], r"--data: needs a path"),
    (["--epochs", "inf"], r"--epochs.*not a finite number"),
    (["--learning-rate", "nan"], r"--learning-rate.*not a finite number"),
    (["--host-ram", "64"], r"has no unit"),
    (["--host-ram", "0GiB"], r"more than 0 bytes"),
    (["--host-ram", "1e400GiB"], r"over the 1 EiB"),
    (["stray"], r"unexpected arguments 'stray'"),
])
def test_tune_refuses_before_writing(args: list[str], match: str, tmp_path: Path):
    assert_refused(["tune", "--gpus", "2x3090", "--out", "plan", *args], tmp_path, match=match)
    assert not (tmp_path / "plan").exists()
