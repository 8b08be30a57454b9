"""The band through the command line: ``--json`` carries it per budget with the GPU's three
figures; a calibration profile measured on the GPU replaces the sourced constants and is named;
``tune`` keeps the margin at the high end and lists TIGHT setups without choosing them."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from planner.cli import main
from planner.estimate import estimate
from planner.profile.calibration import CalibrationProfile, save_calibration
from planner.profile.catalog import build_model, load_catalog
from planner.profile.hardware import make_cluster
from planner.search.search import search
from planner.search.space import Constraints, Request, SearchSpace
from planner.units import GIB, MIB
from planner.workload.options import Engine, Optimizer, Precision, TrainingOptions, ZeroStage

ARGS = ["estimate", "--model", "qwen2.5-1.5b", "--gpus", "1x4090", "--host-ram", "64GiB", "--engine", "torch",
        "--precision", "pure-bf16", "--seq-len", "512", "--json"]
CATALOG = load_catalog(())


@pytest.fixture(autouse=True)
def _own_config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test reads calibration profiles from its own empty folder, never the user's."""
    folder = tmp_path / "config"
    monkeypatch.setenv("MEMPLAN_CONFIG_DIR", str(folder))
    return folder


def _estimate(*extra: str) -> dict:
    result = CliRunner().invoke(main, [*ARGS, *extra])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_json_carries_the_band_and_the_three_figures():
    doc = _estimate()
    for budget in ("per_gpu", "host"):
        band = doc[budget]["band"]
        assert set(band) == {"low_bytes", "expected_bytes", "high_bytes"}
        assert band["low_bytes"] <= band["expected_bytes"] == doc[budget]["total_bytes"] <= band["high_bytes"]
        assert doc[budget]["verdict"] in ("FITS", "TIGHT", "DOES NOT FIT", "UNKNOWN")
    figures = doc["gpu_figures"]
    assert set(figures) == {"allocated", "reserved", "nvidia_smi"}
    assert figures["nvidia_smi"] == doc["per_gpu"]["band"]
    for point in ("low_bytes", "expected_bytes", "high_bytes"):
        assert figures["allocated"][point] <= figures["reserved"][point] <= figures["nvidia_smi"][point]
    assert doc["verdict"] == "FITS" and doc["fits"] is True
    assert doc["runtime"].startswith("the sourced defaults")


def test_a_calibration_profile_changes_the_figures(_own_config_dir: Path):
    """A profile for the 4090 measured a 1 GiB context, a 4 MiB cuBLAS workspace and 30 %
    fragmentation: the figures follow it exactly, and the output names it."""
    before = _estimate()
    save_calibration(CalibrationProfile(gpu="rtx4090", measured="2026-12-05", torch_version="2.13.0",
                                        cuda_version="12.8", cuda_context_bytes=GIB,
                                        cublas_workspace_bytes=4 * MIB, fragmentation_expected=0.3,
                                        fragmentation_high=0.4, source="test"))
    after = _estimate()
    assert after["runtime"] == "memplan calibrate on rtx4090, 2026-12-05"
    tensors = after["per_gpu"]["tensor_bytes"]
    assert tensors == before["per_gpu"]["tensor_bytes"]  # the tensors are exact: no profile changes them
    fig = {k: v["expected_bytes"] for k, v in after["gpu_figures"].items()}
    assert fig["allocated"] == tensors + 2 * 4 * MIB  # two cuBLAS handles
    assert 0 <= fig["reserved"] - int(1.3 * fig["allocated"]) < 2 * MIB  # + the 2 MiB segment rounding
    assert fig["nvidia_smi"] - fig["reserved"] == GIB  # one GPU: no NCCL
    high = after["gpu_figures"]["reserved"]["high_bytes"]
    assert high >= int(1.4 * after["gpu_figures"]["allocated"]["high_bytes"])
    assert after["per_gpu"]["total_bytes"] > before["per_gpu"]["total_bytes"]


def test_a_broken_calibration_profile_is_a_user_error(_own_config_dir: Path):
    path = _own_config_dir / "calibration" / "rtx4090.toml"
    path.parent.mkdir(parents=True)
    path.write_text("gpu = 'rtx4090'\nfragmentation_expected = 'lots'\n")
    result = CliRunner().invoke(main, ARGS)
    assert result.exit_code == 2 and "rtx4090.toml" in result.output


def _single_setup_space() -> SearchSpace:
    return SearchSpace(precisions=(Precision.PURE_BF16,), optimizers=(Optimizer.ADAMW,),
                       engines=((Engine.TORCH, ZeroStage.DISABLED),), grad_ckpt=(True,), micro_batches=(1,),
                       seq_len_fractions=(1.0,), lora_ranks=(), freeze_encoders=False)


def test_tune_never_chooses_a_tight_setup():
    """The one setup of the space, on a GPU whose usable memory (capacity less the 5 % margin) lies
    between its expected figure and its high end: TIGHT, listed, not a candidate; with room above
    the high end it is chosen."""
    model = build_model(CATALOG.model("qwen2.5-1.5b"))
    cluster = make_cluster("1x4090", CATALOG, 256 * GIB)
    options = TrainingOptions(engine="torch", precision="pure-bf16", grad_ckpt=True)
    request = Request(seq_len=1024, global_batch=1)
    band = estimate(model, cluster, options, request.workload()).per_gpu.band
    margin = Constraints().margin
    usable = (band.expected + band.high) // 2
    tight = dataclasses.replace(cluster, gpu_memory_bytes=int(usable / (1 - margin)))
    result = search(model, tight, request, space=_single_setup_space())
    assert result.candidates == [] and result.chosen is None
    assert len(result.tight) == 1 and result.tight[0].gpu == band
    assert result.tight[0].gpu.expected <= result.tight[0].gpu_usable_bytes < result.tight[0].gpu.high
    roomy = dataclasses.replace(cluster, gpu_memory_bytes=int(band.high / (1 - margin)) + MIB)
    found = search(model, roomy, request, space=_single_setup_space())
    assert found.chosen is not None and found.tight == []
    assert found.chosen.estimate.per_gpu.band.high <= roomy.gpu_memory_bytes * (1 - margin)


def test_tune_candidates_hold_the_margin_at_the_high_end():
    """Every candidate of the default space keeps --margin free at the high end of both bands."""
    model = build_model(CATALOG.model("qwen2.5-1.5b"))
    cluster = make_cluster("1x3090", CATALOG, 64 * GIB)
    result = search(model, cluster, Request(seq_len=1024), Constraints(margin=0.1), top=3)
    assert result.candidates
    for c in result.candidates:
        assert c.estimate.per_gpu.band.high <= 0.9 * cluster.gpu_memory_bytes
        assert c.estimate.host.band.high <= 0.9 * cluster.host_ram_bytes
    for t in result.tight:
        assert t.gpu.expected <= t.gpu_usable_bytes < t.gpu.high or t.host.expected <= t.host_usable_bytes < t.host.high
