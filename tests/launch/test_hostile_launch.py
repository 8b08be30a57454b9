"""`memplan launch` (and `memplan tune --launch`) given hostile folders, files and options: every
refusal is one line, exit 2, before anything is started or recorded; and out-of-memory recovery
re-plans from the specs the plan recorded, with a result.json for every attempt.

Nothing here runs the real torchrun or DeepSpeed launcher: a stand-in launcher on PATH plays both
(it reads the plan it is given and dies of a torch-style CUDA out-of-memory error while the plan
needs more than FAKE_GPU_LIMIT bytes), and leaves a file behind whenever it is started, which the
harness notices in a refused case.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
import textwrap
from pathlib import Path

import pytest

from planner.launch.checks import parse_hostfile
from planner.plan import Plan
from planner.units import GIB
from tests.hostile import assert_refused, run_cli

FAKE_LAUNCHER = textwrap.dedent(f'''\
    #!{sys.executable}
    # Stand-in for torchrun / deepspeed / llamafactory-cli: finds the plan, fails like a run out of GPU memory
    # while the plan needs more than FAKE_GPU_LIMIT, exits FAKE_EXIT then (default 1).
    import json, os, sys
    from pathlib import Path
    Path(os.environ["FAKE_MARK"]).write_text(" ".join(sys.argv))
    args = sys.argv[1:]
    if "--deepspeed" in args:
        plan_dir = Path(args[args.index("--deepspeed") + 1]).parent
    else:
        plan_dir = Path(args[args.index("planner.train") + 1])
    plan = json.loads((plan_dir / "plan.json").read_text())
    limit = int(os.environ.get("FAKE_GPU_LIMIT", "0"))
    if limit and plan["per_gpu_bytes"] > limit:
        print("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.16 GiB.", flush=True)
        sys.exit(int(os.environ.get("FAKE_EXIT", "1")))
    print("memplan-train: peak_gpu_bytes=%d steps=3 final_loss=1.5" % plan["per_gpu_bytes"])
''')

FAKE_FINETUNE = "raise SystemExit('the stand-in launcher never runs this')\n"

# A user's profile folder: a GPU and a model memplan does not ship (copies of the RTX 3090 with
# 12 GiB and of Qwen2.5-0.5B under new names), as `--profiles-dir` reads them.
USER_PROFILES = {
    "gpus.toml": """
        [[gpus]]
        name = "lab-card"
        full_name = "Lab Card 12GB"
        architecture = "ampere"
        compute_capability = "8.6"
        memory_mib = 12288
        bf16 = true
        bf16_tflops = 71.0
        fp16_tflops = 71.0
        fp32_tflops = 35.6
        memory_bandwidth_gbps = 936.0
        pcie_gen = 4
        pcie_lanes = 16
        nvlink_gbps = 0.0
        pcie_p2p = false
        source = "a test: an RTX 3090 with 12 GiB"
    """,
    "models.toml": """
        [[models]]
        name = "lab-qwen"
        source = "a test: Qwen2.5-0.5B renamed"
        [[models.groups]]
        name = "llm"
        kind = "decoder"
        expected_params = 494032768
        [models.groups.config]
        model_type = "qwen2"
        vocab_size = 151936
        hidden_size = 896
        intermediate_size = 4864
        num_hidden_layers = 24
        num_attention_heads = 14
        num_key_value_heads = 2
        tie_word_embeddings = true
        max_position_embeddings = 32768
        rms_norm_eps = 1e-06
        rope_theta = 1000000.0
    """,
}


@pytest.fixture(scope="module")
def plans(tmp_path_factory) -> Path:
    """Plan folders made once by `memplan tune`; each test copies the ones it uses."""
    root = tmp_path_factory.mktemp("plans")
    for name, args in {
        "one": ["--model", "qwen2.5-0.5b", "--gpus", "2x3090", "--host-ram", "64GiB", "--data", "train.jsonl"],
        "two_nodes": ["--model", "qwen2.5-0.5b", "--gpus", "2x4x3090", "--host-ram", "64GiB"],
        "minicpm": ["--gpus", "2x3090", "--host-ram", "256GiB", "--target", "minicpm"],
    }.items():
        out = run_cli(["tune", *args, "--out", name], root, seconds=120)
        assert out.exit_code == 0, out.stderr
    return root


@pytest.fixture()
def sandbox(tmp_path: Path, monkeypatch) -> Path:
    """tmp_path with the stand-in launcher first on PATH as torchrun, deepspeed and llamafactory-cli."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("torchrun", "deepspeed", "llamafactory-cli"):
        (bin_dir / name).write_text(FAKE_LAUNCHER)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_MARK", str(tmp_path / "launcher-was-started"))
    (tmp_path / "train.jsonl").write_text('{"conversations": [{"role": "user", "content": "hi"}]}\n')
    (tmp_path / "finetune.py").write_text(FAKE_FINETUNE)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.json").write_text("[]")
    return tmp_path


def _copy(plans: Path, name: str, to: Path) -> Path:
    shutil.copytree(plans / name, to / name)
    return to / name


def _refused(args: list[str], cwd: Path, match: str, plan_dir: Path) -> None:
    """Refused with one line, exit 2, nothing started, nothing recorded."""
    assert_refused(args, cwd=cwd, match=match, plan_dir=plan_dir)
    assert not (plan_dir / "attempts").is_dir() or not any((plan_dir / "attempts").iterdir())
    assert not (cwd / "launcher-was-started").exists()


# --- the plan folder and plan.json -----------------------------------------------------------


def _break_plan(plan_dir: Path, how: str) -> None:
    path = plan_dir / "plan.json"
    if how == "missing":
        path.unlink()
    elif how == "folder":
        path.unlink()
        path.mkdir()
    elif how == "fifo":
        path.unlink()
        os.mkfifo(path)
    elif how == "dangling link":
        path.unlink()
        path.symlink_to(plan_dir / "nowhere.json")
    elif how == "huge":
        with open(path, "ab") as fh:
            fh.truncate(17 * 2**20)  # sparse: instant
    elif how == "binary":
        path.write_bytes(b"\xff\xfe\x00garbage")
    elif how == "truncated":
        path.write_text(path.read_text()[:100])
    elif how == "other version":
        doc = json.loads(path.read_text())
        path.write_text(json.dumps(doc | {"version": 99}))
    elif how == "wrong field":
        doc = json.loads(path.read_text())
        doc["cluster"]["nodes"] = 0
        path.write_text(json.dumps(doc))
    elif how == "nul in data path":
        doc = json.loads(path.read_text())
        doc["trainer"]["data_path"] = "train\x00.jsonl"
        path.write_text(json.dumps(doc))
    elif how == "nested":
        path.write_text("[" * 100_000 + "]" * 100_000)


@pytest.mark.parametrize("how, match", [
    ("missing", r"no plan\.json \(write one with memplan tune"),
    ("folder", r"plan\.json: not a regular file"),
    ("fifo", r"plan\.json: not a regular file"),
    ("dangling link", r"plan\.json: not a regular file"),
    ("huge", r"too large to be a plan"),
    ("binary", r"plan\.json: not (UTF-8 text|valid JSON)"),
    ("truncated", r"plan\.json: not valid JSON"),
    ("other version", r"not a memplan plan \(version 1\)"),
    ("wrong field", r"not a plan this memplan can run \(cluster\.nodes: "),
    ("nested", r"plan\.json: (nested too deeply|not valid JSON)"),
    ("nul in data path", r"plan\.json: a value in it holds a NUL byte"),
])
def test_broken_plan_json(plans: Path, sandbox: Path, how: str, match: str):
    plan_dir = _copy(plans, "one", sandbox)
    _break_plan(plan_dir, how)
    _refused(["launch", str(plan_dir)], sandbox, match, plan_dir)
    _refused(["launch", str(plan_dir), "--dry-run"], sandbox, match, plan_dir)


def test_plan_dir_missing_or_a_file(sandbox: Path):
    assert_refused(["launch", "nowhere"], cwd=sandbox, match=r"nowhere: no such folder \(write a plan with memplan")
    (sandbox / "afile").write_text("x")
    assert_refused(["launch", "afile"], cwd=sandbox, match=r"afile.*is a file")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads and writes whatever the permissions say")
def test_unreadable_and_read_only_plan_folder(plans: Path, sandbox: Path):
    plan_dir = _copy(plans, "one", sandbox)
    (plan_dir / "plan.json").chmod(0)
    _refused(["launch", str(plan_dir)], sandbox, r"plan\.json: cannot read: Permission denied", plan_dir)
    (plan_dir / "plan.json").chmod(0o644)
    plan_dir.chmod(0o555)
    try:
        _refused(["launch", str(plan_dir)], sandbox, r"not writable \(memplan launch records each attempt", plan_dir)
    finally:
        plan_dir.chmod(0o755)


def test_read_only_plan_folder(plans: Path, sandbox: Path, monkeypatch):
    """The same as a user who may not write the folder sees it (this suite may run as root, who may)."""
    plan_dir = _copy(plans, "one", sandbox)
    real_access = os.access

    def access(path, mode, **kw):
        return False if Path(path) == plan_dir and mode & os.W_OK else real_access(path, mode, **kw)

    monkeypatch.setattr("planner.launch.checks.os.access", access)
    _refused(["launch", str(plan_dir)], sandbox, rf"{plan_dir}: not writable \(memplan launch records each attempt",
             plan_dir)


@pytest.mark.parametrize("make", ["file", "dangling link", "file in attempts"])
def test_attempts_not_a_folder(plans: Path, sandbox: Path, make: str):
    plan_dir = _copy(plans, "one", sandbox)
    attempts = plan_dir / "attempts"
    if make == "file":
        attempts.write_text("not a folder")
        _refused(["launch", str(plan_dir)], sandbox, r"attempts is not a folder: move it away", plan_dir)
        out = run_cli(["launch", str(plan_dir), "--dry-run"], sandbox)  # a dry run says what a launch would meet
        assert out.exit_code == 0 and "a launch would stop here: " in out.stderr
        assert "attempts is not a folder" in out.stderr
    elif make == "dangling link":
        attempts.symlink_to(sandbox / "gone")
        _refused(["launch", str(plan_dir)], sandbox, r"attempts is not a folder", plan_dir)
    else:  # names an earlier attempt would have: a file "01", a folder of non-ASCII digits
        attempts.mkdir()
        (attempts / "01").write_text("x")
        (attempts / "²").mkdir()
        out = run_cli(["launch", str(plan_dir)], sandbox)
        assert out.exit_code == 0, out.stderr
        assert json.loads((attempts / "02" / "result.json").read_text())["returncode"] == 0


# --- the MiniCPM script and the data ---------------------------------------------------------


@pytest.mark.parametrize("script, match", [
    (None, r"--target minicpm needs --script PATH"),
    ("missing.py", r"--script missing\.py: no such file"),
    ("data", r"--script data: not a regular file"),
    ("fifo.py", r"--script fifo\.py: not a regular file"),
    ("loop.py", r"--script loop\.py: not a regular file"),
])
def test_minicpm_script(plans: Path, sandbox: Path, script: str | None, match: str):
    plan_dir = _copy(plans, "minicpm", sandbox)
    os.mkfifo(sandbox / "fifo.py")
    (sandbox / "loop.py").symlink_to(sandbox / "loop.py")
    args = ["launch", str(plan_dir), "--target", "minicpm"] + (["--script", script] if script else [])
    _refused(args, sandbox, match, plan_dir)


def test_script_for_another_target(plans: Path, sandbox: Path):
    plan_dir = _copy(plans, "one", sandbox)
    _refused(["launch", str(plan_dir), "--script", "finetune.py"], sandbox,
             r"--script finetune\.py: only --target minicpm runs a script", plan_dir)


def test_data_missing_where_the_trainer_reads_it(plans: Path, sandbox: Path):
    plan_dir = _copy(plans, "one", sandbox)
    (sandbox / "train.jsonl").unlink()  # the plan's data_path, relative to the folder the trainer runs in
    _refused(["launch", str(plan_dir)], sandbox,
             rf"data file train\.jsonl \(relative to {sandbox}, where the trainer runs\) does not exist; pass --data",
             plan_dir)
    _refused(["launch", str(plan_dir), "--data", "nope.json"], sandbox,
             rf"data file {sandbox}/nope\.json does not exist$", plan_dir)
    _refused(["launch", str(plan_dir), "--data", "data"], sandbox, r"data: not a regular file", plan_dir)
    _refused(["launch", str(plan_dir), "--data", ""], sandbox, r"--data: needs a path", plan_dir)


def test_minicpm_data_is_relative_to_the_script_folder(plans: Path, sandbox: Path):
    plan_dir = _copy(plans, "minicpm", sandbox)
    (sandbox / "ft").mkdir()
    shutil.copy(sandbox / "finetune.py", sandbox / "ft" / "finetune.py")
    _refused(["launch", str(plan_dir), "--target", "minicpm", "--script", "ft/finetune.py"], sandbox,
             rf"data file data/train\.json \(relative to {sandbox}/ft, where the trainer runs\)", plan_dir)
    # --data is the user's path, relative to where memplan runs, and reaches finetune.py absolute
    out = run_cli(["launch", str(plan_dir), "--target", "minicpm", "--script", "ft/finetune.py", "--data",
                   "data/train.json", "--dry-run"], sandbox)
    assert out.exit_code == 0 and out.stderr == "", out.stderr
    argv = json.loads(out.stdout.split("argv: ", 1)[1])
    assert argv[argv.index("--data_path") + 1] == str(sandbox / "data" / "train.json")


def test_llamafactory_dataset_registry(plans: Path, sandbox: Path):
    plan_dir = _copy(plans, "one", sandbox)
    info = plan_dir / "dataset_info.json"  # the plan's dataset_dir is "." (data_path train.jsonl), in the plan folder
    args = ["launch", str(plan_dir), "--target", "llamafactory"]
    _refused(args, sandbox, rf"dataset_info\.json {info}: does not exist \(LLaMA-Factory finds its datasets there",
             plan_dir)
    info.write_text("{not json")
    _refused(args, sandbox, r"dataset_info\.json .*: not valid JSON", plan_dir)
    info.write_text(json.dumps({"other": {"file_name": "other.jsonl"}}))
    _refused(args, sandbox, r"dataset 'train' is not registered in", plan_dir)
    info.write_text(json.dumps({"train": {"file_name": "train.jsonl"}}))
    _refused(args, sandbox, rf"dataset 'train': {plan_dir}/train\.jsonl does not exist", plan_dir)
    shutil.copy(sandbox / "train.jsonl", plan_dir / "train.jsonl")
    out = run_cli([*args, "--dry-run"], sandbox)
    assert out.exit_code == 0 and out.stderr == "", out.stderr


def test_nul_in_trainer_arguments(plans: Path, sandbox: Path):
    plan_dir = _copy(plans, "one", sandbox)
    _refused(["launch", str(plan_dir), "--", "--max_steps", "1\x002"], sandbox,
             r"trainer arguments: contains a NUL byte", plan_dir)


def test_launcher_not_installed(plans: Path, sandbox: Path, monkeypatch):
    plan_dir = _copy(plans, "one", sandbox)
    monkeypatch.setenv("PATH", str(sandbox / "empty-bin"))
    _refused(["launch", str(plan_dir)], sandbox, r"torchrun: not found on PATH \(install torch\)", plan_dir)


# --- the hostfile against the plan -----------------------------------------------------------


def test_hostfile_parser_follows_deepspeed():
    from deepspeed.launcher.runner import _parse_hostfile

    text = "# cluster\n\nworker-0 slots=4\n  worker-1   slots=4 # a comment\n"
    assert parse_hostfile(text) == dict(_parse_hostfile(text.splitlines(keepends=True))) == {
        "worker-0": 4, "worker-1": 4}
    for bad in ("worker-0 slots=x\n", "worker-0\n", "slots=4\n", "a slots=1\na slots=1\n", "# only\n\n"):
        with pytest.raises(ValueError):
            _parse_hostfile(bad.splitlines(keepends=True))
        with pytest.raises(ValueError):
            parse_hostfile(bad)


@pytest.mark.parametrize("content, match", [
    (None, r"the plan is for 2 nodes \(2x4x(rtx)?3090\): no hostfile at .*hostfile \(write one, a line 'HOST slots=4'"),
    ("template", r"is memplan's unedited template \(placeholder host node0, node1\)"),
    ("template, slots edited", r"unedited template \(placeholder host node1\)"),
    ("gpu-a slots=4\n", r"lists 1 host\(s\); the plan is for 2 nodes"),
    ("gpu-a slots=4\ngpu-b slots=4\ngpu-c slots=4\n", r"lists 3 host\(s\); the plan is for 2 nodes"),
    ("gpu-a slots=4\ngpu-b slots=8\n", r"gpu-b slots=8, but the plan has 4 GPUs per node"),
    ("gpu-a slots=4\ngpu-b 4\n", r"line 2 'gpu-b 4' is not 'HOST slots=N' \(DeepSpeed's hostfile format\)"),
    ("gpu-a slots=4\ngpu-a slots=4\n", r"host 'gpu-a' is listed twice"),
    ("# nothing yet\n\n", r"lists no host"),
    (b"\xff\xfe\x00\x01", r"not UTF-8 text"),
    ("folder", r"hostfile .*: not a regular file"),
])
def test_multi_node_hostfile(plans: Path, sandbox: Path, content, match: str):
    plan_dir = _copy(plans, "two_nodes", sandbox)
    hostfile = plan_dir / "hostfile"
    assert hostfile.is_file()  # the writer's template
    if content is None:
        hostfile.unlink()
    elif content == "template, slots edited":  # one name edited, the comment and node1 left
        hostfile.write_text(hostfile.read_text().replace("node0", "gpu-a"))
    elif content == "folder":
        hostfile.unlink()
        hostfile.mkdir()
    elif isinstance(content, bytes):
        hostfile.write_bytes(content)
    elif content != "template":
        hostfile.write_text(content)
    _refused(["launch", str(plan_dir)], sandbox, match, plan_dir)


def test_given_hostfile(plans: Path, sandbox: Path):
    plan_dir = _copy(plans, "two_nodes", sandbox)
    _refused(["launch", str(plan_dir), "--hostfile", "nodes.txt"], sandbox,
             rf"no hostfile at {sandbox}/nodes\.txt", plan_dir)
    (sandbox / "nodes.txt").write_text("gpu-a slots=4\ngpu-b slots=4\n")
    out = run_cli(["launch", str(plan_dir), "--hostfile", "nodes.txt", "--dry-run"], sandbox)
    assert out.exit_code == 0 and out.stderr == "", out.stderr
    argv = json.loads(out.stdout.split("argv: ", 1)[1])
    assert argv[:3] == ["deepspeed", "--hostfile", str(sandbox / "nodes.txt")]


def test_nodes_really_named_like_the_template(plans: Path, sandbox: Path):
    """A cluster whose hosts are called node0, node1 deletes the template's comment line."""
    plan_dir = _copy(plans, "two_nodes", sandbox)
    hostfile = plan_dir / "hostfile"
    hostfile.write_text("".join(line + "\n" for line in hostfile.read_text().splitlines() if not line.startswith("#")))
    out = run_cli(["launch", str(plan_dir), "--dry-run"], sandbox)
    assert out.exit_code == 0 and out.stderr == "", out.stderr


def test_hostfile_for_one_node_is_refused(plans: Path, sandbox: Path):
    plan_dir = _copy(plans, "one", sandbox)
    (sandbox / "nodes.txt").write_text("gpu-a slots=2\n")
    _refused(["launch", str(plan_dir), "--hostfile", "nodes.txt"], sandbox,
             r"--hostfile nodes\.txt: the plan is for one node \(2x(rtx)?3090\), which torchrun runs without",
             plan_dir)


def test_llamafactory_reads_no_hostfile(plans: Path, sandbox: Path):
    plan_dir = _copy(plans, "two_nodes", sandbox)
    (sandbox / "nodes.txt").write_text("gpu-a slots=4\ngpu-b slots=4\n")
    _refused(["launch", str(plan_dir), "--target", "llamafactory", "--hostfile", "nodes.txt"], sandbox,
             r"LLaMA-Factory starts torchrun on each node itself", plan_dir)


def test_tune_launch_refuses_the_template_hostfile(sandbox: Path):
    """tune writes the plan (its job), then launch refuses the hostfile it wrote as a template."""
    (sandbox / "out").mkdir()
    out_dir = sandbox / "out" / "p"
    _refused(["tune", "--model", "qwen2.5-0.5b", "--gpus", "2x4x3090", "--host-ram", "64GiB", "--out", str(out_dir),
              "--launch"], sandbox, r"unedited template", out_dir.parent)
    assert (out_dir / "plan.json").is_file() and not (out_dir / "attempts").exists()


# --- recovery: the plan's own specs, and a record of every attempt ----------------------------


def _user_plan(sandbox: Path, *extra: str) -> Path:
    """A plan made from a user profile folder, then moved away from it and the folder deleted."""
    profiles = sandbox / "my-profiles"
    profiles.mkdir()
    for name, text in USER_PROFILES.items():
        (profiles / name).write_text(textwrap.dedent(text))
    out = run_cli(["tune", "--model", "lab-qwen", "--gpus", "2xlab-card", "--host-ram", "64GiB", "--profiles-dir",
                   str(profiles), "--data", str(sandbox / "train.jsonl"), "--out", "made-here", *extra], sandbox,
                  seconds=120)
    assert out.exit_code == 0, out.stderr
    shutil.rmtree(profiles)
    (sandbox / "elsewhere").mkdir()
    return Path(shutil.move(sandbox / "made-here", sandbox / "elsewhere" / "plan"))


def test_recovery_replans_from_the_plans_own_specs(sandbox: Path, monkeypatch):
    plan_dir = _user_plan(sandbox)
    first = Plan.read(plan_dir / "plan.json")
    assert first.cluster.gpu_spec is not None and first.cluster.gpu_spec.name == "lab-card"
    assert first.model.profile is not None and first.model.profile.name == "lab-qwen"
    monkeypatch.setenv("FAKE_GPU_LIMIT", str(first.per_gpu_bytes - GIB // 2))
    out = run_cli(["launch", str(plan_dir)], sandbox)
    assert out.exit_code == 0, out.stdout[-2000:] + out.stderr
    records = sorted((plan_dir / "attempts").iterdir())
    assert [r.name for r in records] == ["01", "02"]
    failed, ok = (json.loads((r / "result.json").read_text()) for r in records)
    assert failed["failure"] == "gpu" and failed["changed"] and failed["stopped"] is None
    assert ok["returncode"] == 0 and ok["reported"]["steps"] == "3"
    now = Plan.read(plan_dir / "plan.json")
    assert now.per_gpu_bytes <= first.per_gpu_bytes - 0.10 * now.cluster.gpu_memory_bytes
    assert now.cluster.gpu_spec == first.cluster.gpu_spec and now.model.profile == first.model.profile


def test_failed_replan_keeps_the_record_and_the_runs_status(sandbox: Path, monkeypatch):
    """A plan from an older memplan records no GPU spec, and its user GPU profile is gone (the
    tester's "unknown GPU"): the re-plan fails, the attempt still gets its result.json, and launch
    exits with the run's own status."""
    plan_dir = _user_plan(sandbox)
    doc = json.loads((plan_dir / "plan.json").read_text())
    del doc["cluster"]["gpu_spec"], doc["space"]
    (plan_dir / "plan.json").write_text(json.dumps(doc))
    monkeypatch.setenv("FAKE_GPU_LIMIT", "1")
    monkeypatch.setenv("FAKE_EXIT", "3")
    out = run_cli(["launch", str(plan_dir)], sandbox)
    assert out.exit_code == 3, out.stdout[-2000:] + out.stderr
    (record,) = (plan_dir / "attempts").iterdir()
    result = json.loads((record / "result.json").read_text())
    assert result["returncode"] == 3 and result["failure"] == "gpu" and result["changed"] is None
    assert result["stopped"].startswith("re-planning failed: the plan's GPU 'lab-card' has no profile here")
    assert "re-planning failed" in out.stdout and "Traceback" not in out.stdout + out.stderr


def test_replan_keeps_the_users_hostfile(plans: Path, sandbox: Path, monkeypatch):
    plan_dir = _copy(plans, "two_nodes", sandbox)
    (plan_dir / "hostfile").write_text("gpu-a slots=4\ngpu-b slots=4\n")
    first = Plan.read(plan_dir / "plan.json")
    monkeypatch.setenv("FAKE_GPU_LIMIT", str(first.per_gpu_bytes - GIB // 2))
    out = run_cli(["launch", str(plan_dir), "--data", "train.jsonl"], sandbox)
    assert out.exit_code == 0, out.stdout[-2000:] + out.stderr
    assert len(list((plan_dir / "attempts").iterdir())) == 2
    assert (plan_dir / "hostfile").read_text() == "gpu-a slots=4\ngpu-b slots=4\n"
    assert not list(plan_dir.glob(".hostfile*"))
    assert Plan.read(plan_dir / "plan.json").candidate != first.candidate


def test_plan_records_its_specs_round_trip(plans: Path):
    plan = Plan.read(plans / "minicpm" / "plan.json")
    assert plan.model.profile is not None and plan.model.config is None
    from planner.launch.recovery import plan_cluster, plan_model

    assert plan_model(plan).params == plan_model(plan.model_copy(update={"model": plan.model.model_copy(
        update={"profile": None})})).params
    assert plan_cluster(plan).gpu.name == plan.cluster.gpu
    assert stat.S_ISREG((plans / "minicpm" / "plan.json").stat().st_mode)


def test_edited_config_stops_the_replan_with_a_record(plans: Path, sandbox: Path, monkeypatch):
    """The writer replaces only files still as memplan wrote them: a re-plan over a config the user
    edited stops there, said so and recorded, with the run's status."""
    plan_dir = _copy(plans, "one", sandbox)
    args_file = plan_dir / "training_args.json"
    args_file.write_text(args_file.read_text().replace("\n", "\n ", 1))
    monkeypatch.setenv("FAKE_GPU_LIMIT", "1")
    monkeypatch.setenv("FAKE_EXIT", "5")
    out = run_cli(["launch", str(plan_dir)], sandbox)
    assert out.exit_code == 5, out.stdout[-2000:] + out.stderr
    result = json.loads((plan_dir / "attempts" / "01" / "result.json").read_text())
    assert result["stopped"].startswith("re-planning failed: ") and "training_args.json" in result["stopped"]


def test_next_attempt_that_cannot_start_is_recorded(plans: Path, sandbox: Path, monkeypatch):
    from planner.launch.command import Target
    from planner.launch.failures import Failure
    from planner.launch.runner import exit_status, launch

    plan_dir = _copy(plans, "one", sandbox)
    monkeypatch.setenv("FAKE_GPU_LIMIT", "1")
    monkeypatch.chdir(sandbox)

    def step_down(plan: Plan, failure: Failure) -> tuple[Plan, str]:
        (sandbox / "train.jsonl").unlink()  # the data vanishes between attempts
        return plan, "the same plan"

    lines: list[str] = []
    attempts = launch(plan_dir, Target.BUILTIN, step_down=step_down, echo=lines.append)
    assert len(attempts) == 1 and exit_status(attempts) == 1
    result = json.loads((plan_dir / "attempts" / "01" / "result.json").read_text())
    assert result["changed"] == "the same plan"
    assert result["stopped"].startswith("attempt 2 could not start: data file train.jsonl")
    assert not (plan_dir / "attempts" / "02").exists()


def test_ctrl_c_is_recorded(plans: Path, sandbox: Path, monkeypatch):
    plan_dir = _copy(plans, "one", sandbox)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("planner.launch.runner.run_streaming", interrupted)
    out = run_cli(["launch", str(plan_dir)], sandbox)
    assert out.exit_code == 130 and out.stderr.strip() == "memplan: interrupted"
    result = json.loads((plan_dir / "attempts" / "01" / "result.json").read_text())
    assert result["returncode"] == 130 and result["failure"] == "interrupted"
