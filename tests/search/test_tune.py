"""memplan tune: the search against the estimate, the written files against the real parsers
(DeepSpeed's config class, HF's TrainingArguments and its "auto" resolution), the folder's
no-overwrite and all-or-nothing rules, and the command line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from planner.cli import main
from planner.estimate import estimate
from planner.plan import Plan, make_plan
from planner.profile.catalog import build_model, load_catalog
from planner.profile.hardware import make_cluster
from planner.search.fixes import fixes
from planner.search.search import search
from planner.search.space import Constraints, Request, SearchSpace
from planner.units import GIB
from planner.workload.inventory import Workload
from planner.workload.options import Engine, Offload, Optimizer, Precision, TrainingOptions, ZeroStage
from planner.workload.reference import REFERENCE_GROUPS
from planner.writers import write_plan_folder
from planner.writers.formats import NotExpressible, deepspeed_config, llamafactory_config, training_args
from tests.writer_checks import deepspeed_parse, hf_resolve, training_arguments

CATALOG = load_catalog(())
MINICPM = build_model(CATALOG.model("minicpm-o-2.6"))
REFERENCE = Request(seq_len=1024, images=1, max_slice_nums=1, without=REFERENCE_GROUPS["without"],
                    freeze=REFERENCE_GROUPS["freeze"])


def _cluster(host_gib: int, gpus: str = "2x3090"):
    return make_cluster(gpus, CATALOG, host_gib * GIB)


@pytest.fixture(scope="module")
def reference_searches():
    return {host: search(MINICPM, _cluster(host), REFERENCE) for host in (64, 256)}


def test_reference_case_plans(reference_searches):
    """The report's setup: 256 GiB of host RAM fits it as asked; 64 GiB does not, so the chosen
    plan gives something up, and the fixes say what host RAM would give the request as asked."""
    big = reference_searches[256]
    assert big.chosen is not None and big.chosen.gives_up == ()
    small = reference_searches[64]
    assert small.chosen is not None and small.chosen.gives_up
    for result, host in ((big, 256), (small, 64)):
        for c in result.candidates:
            # every candidate's figures are the estimator's own, within the margin
            again = estimate(MINICPM, _cluster(host), c.options, c.workload)
            assert again.per_gpu.total_bytes == c.estimate.per_gpu.total_bytes
            assert again.host.total_bytes == c.estimate.host.total_bytes
            assert again.per_gpu.total_bytes <= 0.95 * again.per_gpu.capacity_bytes
            assert again.host.total_bytes <= 0.95 * again.host.capacity_bytes
            assert c.workload.micro_batch * c.workload.grad_accum * 2 == result.global_batch
        keys = [c.rank_key for c in result.candidates]
        assert keys == sorted(keys)
    repair = fixes(MINICPM, _cluster(64), REFERENCE, Constraints(), SearchSpace(), small)
    ram = [f for f in repair if f.change.startswith("host RAM")]
    assert ram and ram[0].candidate.gives_up == ()
    assert 128 * GIB < ram[0].candidate.estimate.host.total_bytes <= 0.95 * 192 * GIB


def test_pruning_never_drops_a_fit(reference_searches):
    """The search prunes with the estimate without activations; that must be a lower bound of
    the full estimate on the GPU and equal on the host, or setups that fit would be lost."""
    cluster = _cluster(64)
    workload = Workload(micro_batch=1, grad_accum=8, seq_len=1024, images=1, max_slice_nums=1)
    checked = 0
    for engine, zero in ((Engine.TORCH, ZeroStage.DISABLED), (Engine.DEEPSPEED, ZeroStage.OPTIMIZER_STATES),
                         (Engine.DEEPSPEED, ZeroStage.GRADIENTS), (Engine.DEEPSPEED, ZeroStage.PARAMETERS)):
        for precision in (Precision.AMP_BF16, Precision.PURE_BF16):
            for accum in (1, 8):
                try:
                    options = TrainingOptions(engine=engine, zero=zero, precision=precision, grad_ckpt=True,
                                              without=REFERENCE.without, freeze=REFERENCE.freeze)
                except ValueError:
                    continue
                w = workload.model_copy(update={"grad_accum": accum})
                lower = estimate(MINICPM, cluster, options, w, activations=False)
                full = estimate(MINICPM, cluster, options, w)
                assert lower.per_gpu.total_bytes <= full.per_gpu.total_bytes
                assert lower.host.total_bytes == full.host.total_bytes
                checked += 1
    assert checked >= 12


def test_nothing_fits_names_the_smallest_changes():
    """One RTX 3090 with 32 GiB of host RAM cannot train MiniCPM-o's LLM fully and the user
    forbids LoRA: nothing fits, and the fixes are checked by searching again."""
    cluster = _cluster(32, "1x3090")
    constraints = Constraints(must_train=("llm",))
    result = search(MINICPM, cluster, REFERENCE, constraints)
    assert result.chosen is None and result.rejections
    repair = fixes(MINICPM, cluster, REFERENCE, constraints, SearchSpace(), result)
    changes = [f.change for f in repair]
    assert changes[0].startswith("drop --must-train llm")
    assert any(c.startswith("host RAM") or c.startswith("GPUs") for c in changes)
    for f in repair:
        assert f.candidate.estimate.fits


def _plans() -> list[Plan]:
    """Plans across engines, stages, offloads and precisions, from real searches."""
    plans = []
    for host, gpus in ((256, "2x3090"), (64, "2x3090"), (1024, "2x8xa100-80gb")):
        cluster = _cluster(host, gpus)
        result = search(MINICPM, cluster, REFERENCE, top=30)
        seen = set()
        for c in result.candidates:
            key = (c.options.engine, c.options.zero, c.options.offload_optimizer, c.options.offload_param,
                   c.options.precision, c.options.optimizer, c.options.lora is None)
            if key not in seen:
                seen.add(key)
                plans.append(make_plan(MINICPM, None, cluster, c, result.global_batch, REFERENCE, Constraints()))
    return plans


PLANS = _plans()


def test_plans_cover_the_levers():
    kinds = {(p.options.engine, p.options.zero, p.options.precision, p.options.lora is not None) for p in PLANS}
    assert len(kinds) >= 6
    assert any(p.options.offload_optimizer is Offload.CPU for p in PLANS)
    assert any(p.options.precision is Precision.PURE_BF16 for p in PLANS)
    assert any(p.options.lora is not None for p in PLANS)


@pytest.mark.parametrize("plan", PLANS, ids=lambda p: f"{p.cluster.gpus}:{p.candidate}")
def test_written_configs_pass_the_real_parsers(plan: Plan):
    """DeepSpeed parses the explicit file with the plan's world size and finds the plan's stage,
    offloads and batch; HF parses training_args.json; HF's own "auto" resolution of
    ds_config.auto.json gives exactly ds_config.json, and finds no mismatch in it."""
    args = training_args(plan)
    parsed = training_arguments(args)
    assert parsed.per_device_train_batch_size == plan.workload.micro_batch
    assert parsed.gradient_accumulation_steps == plan.workload.grad_accum
    if plan.options.engine is not Engine.DEEPSPEED:
        with pytest.raises(NotExpressible):
            deepspeed_config(plan)
        return
    explicit = deepspeed_config(plan)
    ds = deepspeed_parse(explicit, plan.cluster.world_size)
    assert ds.zero_config.stage == int(plan.options.zero)
    assert ds.train_batch_size == plan.global_batch
    assert ds.bfloat16_config.enabled == (plan.options.precision in (Precision.AMP_BF16, Precision.PURE_BF16))
    assert ds.bfloat16_config.bf16_master_weights_and_grads == (plan.options.precision is Precision.PURE_BF16)
    if plan.options.zero >= ZeroStage.OPTIMIZER_STATES:
        off = ds.zero_config.offload_optimizer
        device = getattr(off.device, "value", off.device) if off else "none"
        assert device == plan.options.offload_optimizer.value
    if plan.options.zero is ZeroStage.PARAMETERS:
        assert ds.zero_config.reduce_bucket_size == plan.zero["reduce_bucket_size"]
        assert ds.zero_config.param_persistence_threshold == plan.zero["param_persistence_threshold"]
    resolved_auto = hf_resolve(deepspeed_config(plan, auto=True), parsed, plan.cluster.world_size,
                               plan.model.hidden_size)
    resolved_explicit = hf_resolve(explicit, parsed, plan.cluster.world_size, plan.model.hidden_size)
    assert resolved_auto == resolved_explicit == explicit
    if plan.options.optimizer is Optimizer.ADAMW_8BIT:
        assert "optimizer" not in explicit and args["optim"] == "adamw_bnb_8bit"


def test_llamafactory_rules():
    """pure_bf16 with ZeRO-3 is refused (LLaMA-Factory's own rule); otherwise the YAML carries the
    same batch, context and DeepSpeed file as the other writers."""
    for plan in PLANS:
        if plan.options.precision is Precision.PURE_BF16 and plan.zero3:
            with pytest.raises(NotExpressible, match="pure_bf16"):
                llamafactory_config(plan)
            continue
        doc = llamafactory_config(plan)
        assert doc["per_device_train_batch_size"] == plan.workload.micro_batch
        assert doc["gradient_accumulation_steps"] == plan.workload.grad_accum
        assert doc["cutoff_len"] == plan.workload.seq_len
        assert doc["template"] == "minicpm_o"
        assert doc.get("deepspeed") == ("ds_config.json" if plan.deepspeed else None)
        if doc.get("pure_bf16"):  # HF's bf16 flag: DeepSpeed's bf16 engine, or (without it) autocast, off
            assert doc["bf16"] is plan.deepspeed


def test_folder_never_overwrites_and_is_all_or_nothing(tmp_path: Path, monkeypatch):
    plan = PLANS[0]
    out = tmp_path / "plan"
    files = write_plan_folder(plan, out)
    written = {f.name for f in files if f.text is not None}
    assert {"plan.json", "ds_config.json", "ds_config.auto.json", "training_args.json", "launch.sh"} <= written
    assert os.access(out / "launch.sh", os.X_OK)
    assert Plan.read(out / "plan.json").model_copy(update={"files": (), "skipped": {}, "file_sha256": {}}) == plan
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ValueError, match="already there"):
        write_plan_folder(PLANS[1], out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    # A failure while writing leaves nothing: not the new folder, not a temporary one.
    import planner.writers as writers

    calls = {"n": 0}
    real = writers._write_file

    def failing(path, text, executable):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        real(path, text, executable)

    monkeypatch.setattr(writers, "_write_file", failing)
    with pytest.raises(ValueError, match="No space left"):
        write_plan_folder(plan, tmp_path / "fresh")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan"]
    calls["n"] = 0
    with pytest.raises(ValueError, match="No space left"):
        write_plan_folder(PLANS[1], out, force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_cli_tune_json_and_files(tmp_path: Path):
    out = tmp_path / "p"
    result = CliRunner().invoke(main, ["tune", "--gpus", "2x3090", "--host-ram", "256GiB", "--out", str(out),
                                       "--target", "minicpm", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert set(doc) >= {"candidates", "chosen", "fixes"}
    chosen = doc["chosen"]
    assert chosen["name"] == doc["candidates"][0]["name"] and chosen["gives_up"] == []
    for c in doc["candidates"]:
        assert set(c) >= {"settings", "per_gpu_bytes", "host_bytes", "tokens_per_s", "gives_up"}
    assert set(chosen["files"]) >= {"plan.json", "ds_config.json", "minicpm_finetune.sh", "launch.sh",
                                    "llamafactory.yaml", "training_args.json", "ds_config.auto.json"}
    script = (out / "minicpm_finetune.sh").read_text()
    assert "--tune_vision false" in script and "--tune_llm true" in script and "--max_slice_nums 1" in script
    assert yaml.safe_load((out / "llamafactory.yaml").read_text())["freeze_vision_tower"] is True
    again = CliRunner().invoke(main, ["tune", "--gpus", "2x3090", "--host-ram", "256GiB", "--out", str(out)])
    assert again.exit_code == 2 and "already there" in again.output and "Traceback" not in again.output


def test_lora_dropout_is_one_field(tmp_path: Path):
    """``--lora-dropout`` is estimated and written as one value: plan.json's ``options.lora.dropout``
    (which the built-in target gives peft), MiniCPM's ``--lora_dropout`` and LLaMA-Factory's
    ``lora_dropout``; the plan's bytes are the estimate with it (dropout on costs memory), and explain
    reads it back from either file (from MiniCPM's script, the plan's very bytes)."""
    out = tmp_path / "p"
    host = ["--gpus", "2x3090", "--host-ram", "256GiB"]
    result = CliRunner().invoke(main, ["tune", *host, "--target", "minicpm", "--lora-rank", "64", "--lora-dropout",
                                       "0.1", "--train", "llm.embed_tokens,resampler", "--out", str(out)])
    assert result.exit_code == 0, result.output
    plan = Plan.read(out / "plan.json")
    assert plan.options.lora is not None and plan.options.lora.dropout == 0.1
    assert "--lora_dropout 0.1" in (out / "minicpm_finetune.sh").read_text()
    assert yaml.safe_load((out / "llamafactory.yaml").read_text())["lora_dropout"] == 0.1
    cluster, model = _cluster(256), MINICPM
    assert estimate(model, cluster, plan.options, plan.workload).per_gpu.total_bytes == plan.per_gpu_bytes
    kept = plan.options.model_copy(update={"grad_ckpt": False})  # all layers' dropped inputs held at once
    off = kept.model_copy(update={"lora": kept.lora.model_copy(update={"dropout": 0.0})})
    assert (estimate(model, cluster, off, plan.workload).per_gpu.total_bytes
            < estimate(model, cluster, kept, plan.workload).per_gpu.total_bytes)
    for script in ("minicpm_finetune.sh", "llamafactory.yaml"):
        read = CliRunner().invoke(main, ["explain", str(out / script), str(out / "ds_config.json"), *host, "--json"])
        assert read.exit_code == 0, read.output
        doc = json.loads(read.output)
        assert doc["settings"]["lora_dropout"]["value"] == 0.1 and doc["options"]["lora"]["dropout"] == 0.1
        if script == "minicpm_finetune.sh":  # LLaMA-Factory builds MiniCPM-o's audio encoder: another setup
            assert doc["per_gpu"]["total_bytes"] == plan.per_gpu_bytes


@pytest.mark.parametrize("args, message", [
    (["--global-batch", "3"], "not a multiple of the 2 GPUs"),
    (["--must-train", "vpm"], "the request does not train it"),
    (["--min-seq-len", "4096"], "longer than --seq-len"),
    (["--model", "qwen2.5-7b", "--target", "minicpm"], "MiniCPM's finetune.py builds only"),
])
def test_cli_tune_bad_input(args, message, tmp_path: Path):
    result = CliRunner().invoke(main, ["tune", "--gpus", "2x3090", "--host-ram", "64GiB",
                                       "--out", str(tmp_path / "x"), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "x").exists()
