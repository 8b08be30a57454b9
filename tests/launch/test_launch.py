"""memplan launch: the exact commands, and the out-of-memory recovery loop, run through the real
torchrun with a stand-in finetune.py that dies the way real runs die (torch's own
OutOfMemoryError, the kernel's SIGKILL) until the planner steps down far enough."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from planner.cli import main
from planner.launch.failures import Failure, classify
from planner.plan import Plan
from planner.units import GIB

pytestmark = pytest.mark.judge

# A stand-in for MiniCPM-o's finetune.py: reads the plan next to the DeepSpeed file it is given,
# and fails like a real run while the plan needs more than the machine "really" has.
FAKE_FINETUNE = textwrap.dedent('''
    import json, os, signal, sys
    from pathlib import Path
    args = sys.argv[1:]
    plan = json.loads((Path(args[args.index("--deepspeed") + 1]).parent / "plan.json").read_text())
    kind, limit = os.environ["FAKE_LIMIT"].split(":")
    rank = int(os.environ.get("RANK", "0"))
    if kind == "gpu" and plan["per_gpu_bytes"] > int(limit):
        import torch
        raise torch.OutOfMemoryError(
            "CUDA out of memory. Tried to allocate 1.16 GiB. GPU %d has a total capacity of 23.69 GiB of which "
            "402.56 MiB is free. Including non-PyTorch memory, this process has 23.28 GiB memory in use." % rank)
    if kind == "host" and plan["host_bytes"] > int(limit):
        os.kill(os.getpid(), signal.SIGKILL)  # what the kernel's OOM killer does
    if rank == 0:
        print("memplan-train: peak_gpu_bytes=%d peak_host_rss_bytes=1 steps=3 final_loss=1.5 seconds=0.1"
              % plan["per_gpu_bytes"])
''')


def test_classify_real_messages():
    oom = ("Traceback (most recent call last):\n  ...\ntorch.OutOfMemoryError: CUDA out of memory. Tried to allocate "
           "2.00 GiB. GPU 0 has a total capacity of 23.69 GiB of which 1.02 GiB is free.\n")
    assert classify(1, oom) is Failure.GPU_OOM
    torchrun_kill = ("torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n"
                     "  exitcode  : -9 (pid: 4242)\n  error_file: <N/A>\n"
                     "  traceback : Signal 9 (SIGKILL) received by PID 4242\n")
    assert classify(1, torchrun_kill) is Failure.HOST_OOM
    assert classify(137, "") is Failure.HOST_OOM
    assert classify(1, "RuntimeError: [enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't "
                       "allocate memory: you tried to allocate 8589934592 bytes.") is Failure.HOST_OOM
    assert classify(1, "ValueError: bad data in sample 3") is Failure.OTHER
    assert classify(0, "CUDA out of memory") is None


@pytest.fixture()
def minicpm_plan(tmp_path: Path) -> Path:
    out = tmp_path / "plan"
    result = CliRunner().invoke(main, ["tune", "--gpus", "2x3090", "--host-ram", "256GiB", "--target", "minicpm",
                                       "--out", str(out), "--output-dir", str(tmp_path / "ckpt")])
    assert result.exit_code == 0, result.output
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "checkpoint-100").mkdir()  # the user's checkpoint: must survive every retry
    (tmp_path / "finetune.py").write_text(FAKE_FINETUNE)
    (tmp_path / "data").mkdir()  # the plan's data_path, relative to finetune.py's folder, where it runs
    (tmp_path / "data" / "train.json").write_text("[]")
    return out


def _launch(plan_dir: Path, limit: str, monkeypatch, retries: int = 2):
    monkeypatch.setenv("FAKE_LIMIT", limit)
    script = plan_dir.parent / "finetune.py"
    return CliRunner().invoke(main, ["launch", str(plan_dir), "--target", "minicpm", "--script", str(script),
                                     "--max-retries", str(retries)])


@pytest.mark.parametrize("budget", ["gpu", "host"])
def test_recovers_from_out_of_memory(minicpm_plan: Path, monkeypatch, budget: str):
    first = Plan.read(minicpm_plan / "plan.json")
    used = first.per_gpu_bytes if budget == "gpu" else first.host_bytes
    limit = used - GIB  # the machine holds a GiB less than the first plan needs
    result = _launch(minicpm_plan, f"{budget}:{limit}", monkeypatch)
    assert result.exit_code == 0, result.output
    attempts = sorted((minicpm_plan / "attempts").iterdir())
    assert len(attempts) == 2
    failed = json.loads((attempts[0] / "result.json").read_text())
    assert failed["failure"] == budget and failed["returncode"] != 0 and failed["changed"]
    ok = json.loads((attempts[1] / "result.json").read_text())
    assert ok["failure"] is None and ok["returncode"] == 0 and ok["reported"]["steps"] == "3"
    # the record keeps what each attempt ran with; the folder now holds the safer plan
    assert Plan.read(attempts[0] / "plan.json").candidate == first.candidate
    now = Plan.read(minicpm_plan / "plan.json")
    now_used = now.per_gpu_bytes if budget == "gpu" else now.host_bytes
    capacity = now.cluster.gpu_memory_bytes if budget == "gpu" else now.cluster.host_ram_bytes
    assert now_used <= used - 0.10 * capacity
    assert json.loads((attempts[1] / "command.json").read_text())["argv"][0] == "torchrun"
    assert "ran out of" in result.output and "next:" in result.output
    assert (minicpm_plan.parent / "ckpt" / "checkpoint-100").is_dir()


def test_gives_up_after_max_retries(minicpm_plan: Path, monkeypatch):
    result = _launch(minicpm_plan, "gpu:1", monkeypatch, retries=1)  # nothing ever fits in 1 byte
    assert result.exit_code == 1
    assert len(list((minicpm_plan / "attempts").iterdir())) == 2
    assert "no retries left" in result.output or "no safer plan fits" in result.output


def test_dry_run_prints_the_argv(minicpm_plan: Path):
    result = CliRunner().invoke(main, ["launch", str(minicpm_plan), "--target", "minicpm", "--script",
                                       str(minicpm_plan.parent / "finetune.py"), "--dry-run", "--",
                                       "--save_steps", "50; rm -rf /"])
    assert result.exit_code == 0, result.output
    argv = json.loads(result.output.split("argv: ", 1)[1])
    assert argv[:6] == ["torchrun", "--standalone", "--nnodes", "1", "--nproc_per_node", "2"]
    assert argv[-2:] == ["--save_steps", "50; rm -rf /"]  # one word, never a shell string
    assert not (minicpm_plan / "attempts").exists()


@pytest.mark.parametrize("args, message", [
    (["--target", "minicpm"], "needs --script"),
    (["--target", "minicpm", "--script", "/nonexistent/finetune.py"], "no such file"),
])
def test_launch_bad_input(minicpm_plan: Path, args, message):
    result = CliRunner().invoke(main, ["launch", str(minicpm_plan), *args])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_launch_without_a_plan(tmp_path: Path):
    result = CliRunner().invoke(main, ["launch", str(tmp_path)])
    assert result.exit_code == 2 and "no plan.json" in result.output
