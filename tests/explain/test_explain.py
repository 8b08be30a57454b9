"""memplan explain: the readers on realistic and malformed files, the reference report diagnosed
against the estimate itself, its fixes re-estimated, and the round trip through the writers of
`memplan tune` (a written plan reads back as the plan)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from planner.cli import main
from planner.estimate import estimate
from planner.explain.from_files import build_setup, merge, read_files
from planner.explain.keys import AUTO
from planner.explain.recognise import read_text
from planner.explain.shell import parse_script
from planner.plan import group_plans
from planner.profile.catalog import build_model, load_catalog
from planner.profile.hardware import make_cluster
from planner.units import GIB
from planner.workload.inventory import Workload
from planner.workload.options import Engine, Offload, Precision, TrainingOptions, ZeroStage
from planner.workload.reference import REFERENCE_GROUPS
from planner.writers import plan_files

DATA = Path(__file__).parents[1] / "data" / "explain"
CATALOG = load_catalog(())
MINICPM = build_model(CATALOG.model("minicpm-o-2.6"))
# What the reference report's files say, as `memplan estimate` takes it (its defaults are this setup).
REFERENCE_OPTIONS = TrainingOptions(engine=Engine.DEEPSPEED, zero=ZeroStage.PARAMETERS, offload_optimizer=Offload.CPU,
                                    offload_param=Offload.CPU, precision=Precision.AMP_BF16, grad_ckpt=True,
                                    **REFERENCE_GROUPS)
REFERENCE_WORKLOAD = Workload(micro_batch=1, grad_accum=1, seq_len=1024, images=1, max_slice_nums=1)


def explain(*args: str):
    return CliRunner().invoke(main, ["explain", *map(str, args)])


def explain_json(*args: str) -> dict:
    result = explain(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def user_error(*args: str) -> str:
    """Runs a command that must fail as a user error: exit 2, one line, no traceback."""
    result = explain(*args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("memplan: error: "), result.output
    return lines[0]


def cluster_of(fix: dict):
    return make_cluster(fix["gpus"], CATALOG, fix["host_ram_bytes"])


# --- the reference report -------------------------------------------------------------------------


@pytest.mark.parametrize("host_gib", [64, 256])
def test_reference_report(host_gib: int):
    """The report's own files (the launch script names the ZeRO-3 JSON, which is read from beside
    it): the estimate is `memplan estimate`'s for the same setup, to the byte; 64 GiB binds on the
    host, 256 GiB fits; every fix fits when estimated again."""
    doc = explain_json(DATA / "finetune_ds.sh", "--gpus", "3090", "--host-ram", f"{host_gib}GiB")
    cluster = make_cluster("2x3090", CATALOG, host_gib * GIB)
    direct = estimate(MINICPM, cluster, REFERENCE_OPTIONS, REFERENCE_WORKLOAD)
    assert doc["gpus"] == "2xrtx3090" and doc["trainer"] == "minicpm"
    assert doc["options"] == REFERENCE_OPTIONS.model_dump(mode="json")
    assert doc["workload"] == REFERENCE_WORKLOAD.model_dump(mode="json")
    assert doc["per_gpu"]["total_bytes"] == direct.per_gpu.total_bytes
    assert doc["host"]["total_bytes"] == direct.host.total_bytes
    assert doc["per_gpu"]["peak_phase"] == "forward" and doc["host"]["peak_phase"] == "optimizer"
    cli = json.loads(CliRunner().invoke(main, ["estimate", "--gpus", "2x3090", "--host-ram", f"{host_gib}GiB",
                                               "--json"]).output)
    assert (cli["per_gpu"]["total_bytes"], cli["host"]["total_bytes"]) == (doc["per_gpu"]["total_bytes"],
                                                                           doc["host"]["total_bytes"])
    assert doc["binding"] == "host"
    s = doc["settings"]
    assert s["zero_stage"] == {"value": 3, "file": str(DATA / "ds_config_zero3.json"), "key": "zero_optimization.stage"}
    assert s["offload_param"]["value"] == "cpu" and s["seq_len"]["key"] == "--model_max_length"
    assert s["micro_batch"]["value"] == 1 and "auto" in s["micro_batch"]["note"]
    assert s["reduce_bucket_size"]["value"] == 3584 * 3584 and "hidden_size 3584" in s["reduce_bucket_size"]["note"]
    assert s["global_batch"]["value"] == 2
    assert {t["name"] for t in doc["traps"]} == {"fp32_logits"}
    if host_gib == 256:
        assert doc["fits"] is True and doc["fixes"] == []
        return
    assert doc["fits"] is False and doc["host"]["total_bytes"] > 64 * GIB
    fixes = doc["fixes"]
    assert 3 <= len(fixes) <= 5
    assert fixes[0]["changes"] == ["host RAM 64 -> 192 GiB per node (+128 GiB)"] and fixes[0]["gives_up"] == []
    lora = next(f for f in fixes if f["changes"] == ["LoRA r=64 on llm"])
    assert {"--use_lora true", "--tune_llm false", "--lora_r 64"} <= set(lora["edits"])
    for f in fixes:
        again = estimate(MINICPM, cluster_of(f), TrainingOptions(**f["options"]), Workload(**f["workload"]))
        assert (again.per_gpu.total_bytes, again.host.total_bytes) == (f["per_gpu_bytes"], f["host_bytes"])
        assert again.per_gpu.total_bytes <= 0.95 * again.per_gpu.capacity_bytes
        assert again.host.total_bytes <= 0.95 * again.host.capacity_bytes
        w = f["workload"]
        assert w["micro_batch"] * w["grad_accum"] * cluster_of(f).world_size == 2  # the user's global batch
    keys = [(max([g["severity"] for g in f["gives_up"]], default=0), f["hardware"], len(f["changes"])) for f in fixes]
    assert keys == sorted(keys)  # cheapest first


def test_reference_report_screen_and_files_given_together():
    result = CliRunner(env={"COLUMNS": "200"}).invoke(main, ["explain", str(DATA / "finetune_ds.sh"),
                                                             str(DATA / "ds_config_zero3.json"), "--gpus", "2x3090",
                                                             "--host-ram", "64GiB"])
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert "binding budget: host RAM per node, at its optimizer peak" in out
    assert "host RAM 64 -> 192 GiB per node (+128 GiB)" in out and "LoRA r=64 on llm" in out
    assert "edit: --lora_dropout 0.05; --lora_r 64" in out and "--use_lora true" in out and "--tune_llm false" in out
    assert "fp32 logits for a large vocabulary" in out
    assert "ignored in finetune_ds.sh" in out and "--eval_data_path" in out


# --- readers -------------------------------------------------------------------------------------


def test_shell_script_is_read_like_bash():
    text = (
        "#!/bin/bash\n"
        "export N=4 # it's a comment with a quote\n"
        'OUT="${OUT_DIR:-runs}/x"\n'
        "PLAN_DIR=\"$(cd \"$(dirname \"${BASH_SOURCE[0]}\")\" && pwd)\"\n"
        "ARGS=\"--a 1\n    --b 2\"\n"
        "CUDA_VISIBLE_DEVICES=0,1,2 deepspeed --num_gpus $N train.py $ARGS \\\n"
        "    --c=\"two words\" --flag --d '$N' \"$@\"\n"
    )
    script = parse_script(text, "/plans/p")
    assert script.variables["OUT"] == "runs/x" and script.variables["PLAN_DIR"] == "/plans/p"
    (cmd,) = script.commands
    assert cmd.env == {"CUDA_VISIBLE_DEVICES": "0,1,2"}
    assert cmd.words == ("deepspeed", "--num_gpus", "4", "train.py", "--a", "1", "--b", "2", "--c=two words",
                         "--flag", "--d", "$N")


def test_script_reader_launcher_flags_and_contradictions():
    r = read_text("torchrun --nnodes 2 --nproc-per-node=4 finetune.py --model_max_length 4096 --use_lora true "
                  "--lora_r 16 --tune_vision true --tune_llm false --bf16 true --unknown_thing 3 extra", "a.sh")
    s = r.settings
    assert (s["nnodes"].value, s["nproc_per_node"].value, s["seq_len"].value) == (2, 4, 4096)
    assert s["lora_rank"].value == 16 and s["use_lora"].value is True and r.trainer == "minicpm"
    assert "--unknown_thing" in r.unknown and "extra" in r.unknown
    r = read_text("python finetune.py --use_lora true --deepspeed x.json", "b.sh")
    assert r.settings["nproc_per_node"].value == 1
    assert any(p.fatal and "tune_llm" in p.text for p in r.problems)  # finetune.py refuses LoRA with --tune_llm true
    r = read_text("torchrun --nproc_per_node 2 finetune.py --bf16 true \\ \n    --fp16 true\n", "c.sh")
    assert any("not pass those flags" in p.text for p in r.problems)
    r = read_text("torchrun finetune.py --bf16 true --fp16 true --tune_llm maybe", "d.sh")
    texts = [p.text for p in r.problems if p.fatal]
    assert any("'maybe' is not a boolean" in t for t in texts) and any("both true" in t for t in texts)


def test_deepspeed_reader():
    doc = json.loads((DATA / "ds_config_zero3.json").read_text())
    r = read_text(json.dumps(doc), "z3.json")
    assert r.kind == "deepspeed" and r.settings["micro_batch"].value == AUTO
    assert r.settings["offload_optimizer"].value == "cpu" and r.unknown == [] and r.problems == []
    doc["zero_optimization"]["stage"] = 2
    doc["zero_optimization"]["overlap_com"] = True  # a typo DeepSpeed would refuse
    doc["bfloat16"] = doc.pop("bf16")
    r = read_text(json.dumps(doc), "z2.json")
    assert "zero_optimization.overlap_com" in r.unknown
    assert r.settings["offload_param"].value == "none" and "ignored" in r.settings["offload_param"].note
    assert any("nothing is offloaded" in p.text and not p.fatal for p in r.problems)
    assert any("bfloat16" in n for n in r.notes)


def test_llamafactory_and_training_args_readers(tmp_path: Path):
    for name in ("llamafactory_full_z3.yaml", "ds_z3.json", "training_args.json", "ds_zero2_offload.json"):
        shutil.copy(DATA / name, tmp_path / name)
    merged = merge(read_files([tmp_path / "llamafactory_full_z3.yaml"]))
    assert merged.trainer == "llamafactory" and len(merged.readings) == 2  # its deepspeed file, read from beside it
    setup = build_setup(merged, MINICPM, 4)
    o, w = setup.options, setup.workload
    assert (o.zero, o.precision, o.grad_ckpt, w.micro_batch, w.grad_accum, w.seq_len) == (
        ZeroStage.PARAMETERS, Precision.AMP_BF16, True, 1, 2, 2048)
    assert o.without == ("tts",) and set(o.freeze) == {"vpm", "apm", "audio_projection_layer"}
    assert w.image_size == (512, 512)  # image_max_pixels 262144
    modes = {g.name: g.training for g in group_plans(MINICPM, o)}
    assert modes == {"llm": "full", "vpm": "frozen", "resampler": "full", "apm": "frozen",
                     "audio_projection_layer": "frozen"}
    merged = merge(read_files([tmp_path / "training_args.json"]))
    setup = build_setup(merged, build_model(CATALOG.model("qwen2.5-7b")), 2)
    o, w = setup.options, setup.workload
    assert (o.zero, o.offload_optimizer, o.grad_ckpt, w.micro_batch, w.grad_accum) == (
        ZeroStage.GRADIENTS, Offload.CPU, True, 2, 8)
    assert setup.zero.reduce_bucket_size == 200_000_000 and setup.zero.overlap_comm is True
    assert merged.settings["global_batch"].value == 2 * 8 * 2
    inline = tmp_path / "inline.json"  # TrainingArguments with its DeepSpeed config inline
    inline.write_text(json.dumps({"output_dir": "o", "per_device_train_batch_size": 3, "deepspeed": {
        "train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 1}}}))
    merged = merge(read_files([inline]))
    assert [r.kind for r in merged.readings] == ["training_args", "deepspeed"]
    assert (merged.value("micro_batch"), merged.value("zero_stage")) == (3, 1)


def test_pure_bf16_with_zero3_in_llamafactory_is_a_trap(tmp_path: Path):
    text = (DATA / "llamafactory_full_z3.yaml").read_text().replace("bf16: true", "bf16: false\npure_bf16: true")
    (tmp_path / "pure.yaml").write_text(text)
    shutil.copy(DATA / "ds_z3.json", tmp_path / "ds_z3.json")
    doc = explain_json(tmp_path / "pure.yaml", "--gpus", "4xa100-80gb", "--host-ram", "512GiB")
    assert doc["options"]["precision"] == "pure-bf16" and doc["options"]["zero"] == 3
    assert "pure_bf16_zero3_llamafactory" in {t["name"] for t in doc["traps"]}


@pytest.mark.parametrize("content, name, message", [
    ('{"zero_optimization": {"stage": 3,}', "ds.json", "not valid JSON"),
    ("- stage: sft\n- cutoff_len: 1024\n", "train.yaml", "a YAML list"),
    ("stage: [sft\n", "train.yaml", "not valid YAML"),
    ("#!/bin/bash\necho hello\n", "run.sh", "not a DeepSpeed JSON"),
    ("#!/bin/bash\nexport X=1\ntorchrun finetune.py\n", "run.sh", "no finetune.py flags"),
    ("torchrun finetune.py --deepspeed 'ds.json\n", "run.sh", "never closed"),
    ('{"learning_rate": 1}', "x.json", "neither a DeepSpeed config"),
    ('{"zero_optimization": {"stage": 3}, "bf16": {"enabled": true}, "fp16": {"enabled": true}}', "ds.json",
     "both true"),
    ('{"zero_optimization": {"stage": 7}}', "ds.json", "DeepSpeed takes 0, 1, 2 or 3"),
    ('{"zero_optimization": {"stage": 3, "offload_param": {"device": "gpu"}}}', "ds.json", "takes none, cpu or nvme"),
    ("model_name_or_path: openbmb/MiniCPM-o-2_6\nstage: sft\nfinetuning_type: freeze\n", "f.yaml",
     "memplan estimates full and lora only"),
])
def test_malformed_files_are_one_line_errors(tmp_path: Path, content: str, name: str, message: str):
    path = tmp_path / name
    path.write_text(content)
    line = user_error(path, "--model", "minicpm-o-2.6", "--gpus", "2x3090", "--host-ram", "64GiB")
    assert message in line


def test_unresolvable_settings_are_errors_unless_the_command_line_settles_them(tmp_path: Path):
    ds = json.loads((DATA / "ds_config_zero3.json").read_text())
    ds["train_micro_batch_size_per_gpu"] = 4  # the script says 1: HF Trainer refuses to start
    (tmp_path / "ds_config_zero3.json").write_text(json.dumps(ds))
    shutil.copy(DATA / "finetune_ds.sh", tmp_path)
    line = user_error(tmp_path / "finetune_ds.sh", "--gpus", "3090", "--host-ram", "64GiB")
    assert "train_micro_batch_size_per_gpu 4" in line and "--micro-batch" in line
    doc = explain_json(tmp_path / "finetune_ds.sh", "--gpus", "3090", "--host-ram", "64GiB", "--micro-batch", "2")
    assert doc["workload"]["micro_batch"] == 2 and doc["settings"]["micro_batch"]["file"] == "(command line)"
    for args, message in (
        ([DATA / "finetune_ds.sh", DATA / "llamafactory_full_z3.yaml"], "different trainers"),
        ([DATA / "ds_config_zero3.json", DATA / "ds_z3.json", "--model", "qwen2.5-7b"], "two DeepSpeed configs"),
        ([DATA / "ds_config_zero3.json"], "no file names the model"),
        ([DATA / "finetune_ds.sh", "--model", "minicpm-o-9"], "unknown model"),
        ([tmp_path / "missing.sh"], "cannot read"),
        ([], "give the training files"),
    ):
        assert message in user_error(*args, "--gpus", "3090", "--host-ram", "64GiB")


def test_no_gpu_type_is_a_clear_error(monkeypatch):
    from planner.errors import ProfileError
    from planner.profile import hardware

    def no_driver(catalog):
        raise ProfileError("--gpus auto: no NVIDIA driver found")

    monkeypatch.setattr(hardware, "detect_gpus", no_driver)
    line = user_error(DATA / "finetune_ds.sh", "--host-ram", "64GiB")
    assert "pass --gpus" in line and "launch 2 per node" in line


# --- traps ---------------------------------------------------------------------------------------


def test_traps_of_the_shipped_script_defaults(tmp_path: Path):
    """MiniCPM's own defaults (--tune_vision true --tune_llm false, 9 slices) on 8 GPUs: the LLM is
    frozen but keeps its activations, and a 1344x1344 image takes 665 of 1024 tokens."""
    text = (DATA / "finetune_ds.sh").read_text()
    text = text.replace("--tune_vision false", "--tune_vision true").replace("--tune_llm true", "--tune_llm false")
    text = text.replace("--max_slice_nums 1", "--max_slice_nums 9")
    (tmp_path / "finetune_ds.sh").write_text(text)
    shutil.copy(DATA / "ds_config_zero3.json", tmp_path)
    doc = explain_json(tmp_path / "finetune_ds.sh", "--gpus", "3090", "--host-ram", "128GiB", "--no-zero-init")
    traps = {t["name"]: t for t in doc["traps"]}
    assert traps["frozen_llm_keeps_activations"]["llm_activation_bytes"] > 0
    assert traps["images_not_truncated"]["image_tokens"] == 665 and traps["images_not_truncated"]["crops"] == 10
    zero3 = traps["zero3_full_model_per_rank"]
    # One GPU, the LLM frozen: under zero.Init each frozen partition (here the whole tensor) is
    # pinned on its own, and the host allocator rounds each to a power of two (a 136 MB MLP weight
    # takes 256 MiB), so zero.Init's load is the larger one here (docs/runtime.md).
    assert zero3["load_bytes_with_zero_init"] > zero3["load_bytes_without_zero_init"] > 0
    assert doc["options"]["freeze"] == ["llm"] and doc["options"]["zero_init"] is False


def test_auto_buckets_trap_for_a_wide_model(tmp_path: Path):
    """At hidden 8192 HF's "auto" buckets are 8192^2 (reduce) and 0.9 x 8192^2 (prefetch) elements,
    255 MB in bf16: a tenth of this two-layer model's per-GPU peak, so the trap is stated."""
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 8192,
              "intermediate_size": 8192, "num_hidden_layers": 2, "num_attention_heads": 64,
              "num_key_value_heads": 8, "vocab_size": 32000, "tie_word_embeddings": False}
    (tmp_path / "wide").mkdir()
    (tmp_path / "wide" / "config.json").write_text(json.dumps(config))
    shutil.copy(DATA / "ds_config_zero3.json", tmp_path)  # both offloads: the GPU peaks in forward
    args = tmp_path / "args.txt"
    args.write_text(f"--model_name_or_path {tmp_path / 'wide'} --per_device_train_batch_size 1 --bf16 true "
                    "--deepspeed ds_config_zero3.json")
    doc = explain_json(args, "--gpus", "2xa100-80gb", "--host-ram", "256GiB")
    trap = next(t for t in doc["traps"] if t["name"] == "auto_buckets")
    assert trap["stage3_prefetch_bucket_size"] == int(0.9 * 8192 * 8192)
    buckets = (8192 * 8192 + int(0.9 * 8192 * 8192) - 2) * 2  # bf16, less the one-element buckets compared
    # plus the allocator's share of them: the expected fragmentation and a 2 MiB segment rounding
    from planner.estimate.runtime import FRAGMENTATION

    assert buckets <= trap["bucket_gpu_bytes"] <= (1 + FRAGMENTATION[1]) * buckets + 2 * 2**20


# --- the round trip through the writers ------------------------------------------------------------


def _plans():
    from tests.search.test_tune import PLANS

    return PLANS


def _written(plan, tmp_path: Path) -> Path:
    folder = tmp_path / "plan"
    folder.mkdir(parents=True)
    for f in plan_files(plan):
        if f.text is not None:
            (folder / f.name).write_text(f.text)
    return folder


def _how(options: TrainingOptions, workload: Workload) -> tuple:
    o = options
    return (o.engine, o.zero, o.offload_optimizer, o.offload_param, o.precision, o.optimizer_impl, o.grad_ckpt,
            o.pin_memory, workload.micro_batch, workload.grad_accum)


def test_round_trip_through_the_writers(tmp_path: Path):
    """Every plan of the tune tests, written by `memplan tune`'s writers, reads back as itself:
    ds_config.json + training_args.json give the engine, stage, offloads, precision, optimizer and
    batch (TrainingArguments cannot say pure bf16 without DeepSpeed, nor what trains); the
    LLaMA-Factory YAML and the MiniCPM script also give the context, slices, trained groups and
    LoRA rank. Where a written file would not do what the plan says, the reader says why."""
    checked = 0
    for i, plan in enumerate(_plans()):
        folder = _written(plan, tmp_path / str(i))
        names = {p.name for p in folder.iterdir()}
        pairs = [["ds_config.json", "training_args.json"] if plan.deepspeed else ["training_args.json"]]
        pairs += [[n] for n in ("llamafactory.yaml", "minicpm_finetune.sh") if n in names]
        for files in pairs:
            merged = merge(read_files([folder / n for n in files]))
            setup = build_setup(merged, MINICPM, plan.cluster.world_size)
            o, w = setup.options, setup.workload
            problems = " ".join(p.text for p in merged.problems)
            if files == ["training_args.json"] and plan.options.precision is Precision.PURE_BF16:
                assert o.precision is Precision.FP32  # HF's bf16 flag means autocast: pure bf16 is not in the file
                assert _how(o, w)[5:] == _how(plan.options, plan.workload)[5:]
                continue
            assert "mismatch" not in problems, (files, plan.candidate, problems)
            assert _how(o, w) == _how(plan.options, plan.workload), (files, plan.candidate)
            if files[0] in ("ds_config.json", "training_args.json"):
                checked += 1
                continue
            assert (w.seq_len, o.lora and o.lora.rank) == (plan.workload.seq_len, plan.options.lora and
                                                           plan.options.lora.rank)
            if files == ["minicpm_finetune.sh"]:
                assert w.max_slice_nums == plan.workload.max_slice_nums
            got = {g.name: g.training for g in group_plans(MINICPM, o)}
            for g in plan.groups:  # LLaMA-Factory's LoRA trains the resampler through additional_target
                assert got[g.name] == g.training, (files, plan.candidate, g.name, problems)
            assert all(mode == "frozen" for name, mode in got.items() if name not in {g.name for g in plan.groups})
            checked += 1
    assert checked >= 40


def test_round_trip_of_a_minicpm_lora_plan(tmp_path: Path):
    """The minicpm target at 64 GiB chooses LoRA: finetune.py's LoRA (r 64, q/k/v/o by regex, a trained
    copy of embed_tokens and the resampler) reads back with the plan's own estimate."""
    from planner.plan import make_plan
    from planner.search.search import search
    from planner.search.space import Constraints, Request

    cluster = make_cluster("2x3090", CATALOG, 64 * GIB)
    request = Request(seq_len=1024, images=1, max_slice_nums=1, **REFERENCE_GROUPS)
    constraints = Constraints(target="minicpm")
    result = search(MINICPM, cluster, request, constraints)
    plan = make_plan(MINICPM, None, cluster, result.chosen, result.global_batch, request, constraints)
    assert plan.options.lora is not None
    folder = _written(plan, tmp_path)
    merged = merge(read_files([folder / "minicpm_finetune.sh"]))
    setup = build_setup(merged, MINICPM, 2)
    assert setup.options.lora.targets == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert {g.name: g.training for g in group_plans(MINICPM, setup.options)} == {g.name: g.training
                                                                                 for g in plan.groups}
    est = estimate(MINICPM, replace(cluster), setup.options, setup.workload, setup.zero)
    assert (est.per_gpu.total_bytes, est.host.total_bytes) == (plan.per_gpu_bytes, plan.host_bytes)
