"""Throw hostile and contradictory input at every memplan command and count how each is answered.

Usage:
    python tools/hostile_sweep.py [--root CHECKOUT] [--json OUT.json] [--timeout S]

``--root`` runs another checkout's ``planner`` (e.g. a ``git worktree`` of an older commit) for a
before/after count. Every case runs ``memplan ARGS`` in a fresh sandbox folder and is classed as:

- ``refused``: non-zero exit, exactly one ``memplan: error:`` line on stderr, no traceback, no file
  outside the plan folder changed: what a user should get;
- ``traceback``: a Python traceback or memplan's "internal error" line;
- ``hang``: no answer within the time limit;
- ``accepted``: exit 0 on input that must be refused (a silent wrong answer);
- ``injected``: a written script ran a command hidden in a user-supplied word;
- ``other``: anything else (several lines, files changed outside the plan folder, ...).

Each case is named with the class of hostile input it belongs to (the classes of the
hostile-input report: injection, traceback, hang, silent). Tests cover the same inputs
(tests/test_hostile_*.py, tests/writers/test_injection.py, tests/writers/test_plan_folder.py); this tool counts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

TINY_QWEN = {
    "model_type": "qwen2", "vocab_size": 512, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True,
    "architectures": ["Qwen2ForCausalLM"],
}
RECORDER = "#!/bin/sh\nexit 0\n"


@dataclass
class Case:
    name: str
    kind: str  # injection | traceback | hang | silent
    args: list[str]
    setup: Callable[[Path, Callable[..., subprocess.CompletedProcess]], None] | None = None
    plan_dir: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    run_script: str | None = None  # injection cases: bash this script (in the plan folder) afterwards
    non_root: bool = False  # only meaningful for a user whom permissions bind (root writes anyway)


def _write(rel: str, text: str | bytes) -> Callable:
    def setup(d: Path, memplan: Callable) -> None:
        p = d / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return setup


def _chain(*steps: Callable) -> Callable:
    def setup(d: Path, memplan: Callable) -> None:
        for s in steps:
            s(d, memplan)
    return setup


def _tune_into(folder: str, *args: str) -> Callable:
    def setup(d: Path, memplan: Callable) -> None:
        memplan(["tune", "--gpus", "2x3090", "--host-ram", "256GiB", "--out", folder, *args], d)
    return setup


def _fifo(rel: str) -> Callable:
    def setup(d: Path, memplan: Callable) -> None:
        os.mkfifo(d / rel)
    return setup


def _readonly(rel: str) -> Callable:
    def setup(d: Path, memplan: Callable) -> None:
        os.chmod(d / rel, stat.S_IRUSR | stat.S_IXUSR)
    return setup


DATA = _write("data/train.json", "[]")  # the plan's default data file, where the builtin trainer opens it


def cases() -> list[Case]:
    deep = "[" * 100_000 + "]" * 100_000
    laughs = "stage: sft\nfinetuning_type: full\na: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
        f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(9)
    ) + "template: *j\ndataset: *j\n"
    launch = "torchrun --nproc_per_node 2 finetune.py --deepspeed ds.json --model_max_length 1024"
    big_script = "#!/bin/bash\n" + "# padding line\n" * 3_500_000 + launch + "\n"
    unclosed = f"#!/bin/bash\n{launch} --output_dir '" + "a " * 1_000_000 + "\n"
    doubling = "#!/bin/bash\nA=x\n" + "A=$A$A\n" * 40 + f"{launch} --output_dir $A\n"
    user_gpu = ('[[gpus]]\nname = "rtx3090"\nfull_name = "mine"\narchitecture = "ampere"\n'
                'compute_capability = "8.6"\nmemory_mib = 99999\nbf16 = true\nbf16_tflops = 71.0\n'
                'fp16_tflops = 71.0\nfp32_tflops = 35.6\nmemory_bandwidth_gbps = 936.0\npcie_gen = 4\n'
                'pcie_lanes = 16\nnvlink_gbps = 0\nform_factor = "pcie"\npcie_p2p = false\nsource = "test"\n')
    alias_gpu = user_gpu.replace('name = "rtx3090"', 'name = "mygpu"\naliases = ["3090"]')
    e = ["estimate"]
    return [
        # --- injections into written scripts
        Case("config _name_or_path with a newline into launch.sh", "injection",
             ["tune", "--model", "m/config.json", "--gpus", "2x3090", "--host-ram", "64GiB", "--out", "p"],
             _write("m/config.json", json.dumps({**TINY_QWEN, "_name_or_path": "tiny\ntouch PWNED\n#"})),
             plan_dir="p", run_script="launch.sh"),
        Case("--data with $(...) into minicpm_finetune.sh", "injection",
             ["tune", "--gpus", "2x3090", "--host-ram", "256GiB", "--target", "minicpm", "--data",
              '"$(touch PWNED)"', "--out", "p"], plan_dir="p", run_script="minicpm_finetune.sh"),
        Case("--output-dir with $(...) into minicpm_finetune.sh", "injection",
             ["tune", "--gpus", "2x3090", "--host-ram", "256GiB", "--target", "minicpm", "--output-dir",
              '"$(touch PWNED)"', "--out", "p"], plan_dir="p", run_script="minicpm_finetune.sh"),
        # --- inputs that raised tracebacks
        Case("--host-ram 0", "traceback", [*e, "--host-ram", "0"]),
        Case("--host-ram 1e400", "traceback", [*e, "--host-ram", "1e400GiB"]),
        Case("--audio-seconds inf", "traceback", [*e, "--model", "minicpm-o-2.6", "--audio-seconds", "inf"]),
        Case("Infinity in a DeepSpeed JSON", "traceback", ["explain", "ds.json", "--gpus", "2x3090"],
             _write("ds.json", '{"train_micro_batch_size_per_gpu": Infinity, "zero_optimization": {"stage": 3}}')),
        Case("inf in an argument string", "traceback",
             ["explain", "--args", "--per_device_train_batch_size inf --bf16 true", "--gpus", "2x3090"]),
        Case("100k-deep JSON", "traceback", ["explain", "deep.json", "--gpus", "2x3090"], _write("deep.json", deep)),
        Case("explain /dev/zero", "traceback", ["explain", "/dev/zero", "--gpus", "2x3090"]),
        Case("launch a read-only plan folder", "traceback", ["launch", "p", "--max-retries", "0"],
             _chain(_tune_into("p"), DATA, _readonly("p")), plan_dir="p", non_root=True),
        Case("launch with a file named attempts", "traceback", ["launch", "p", "--max-retries", "0"],
             _chain(_tune_into("p"), DATA, _write("p/attempts", "x")), plan_dir="p"),
        Case("--model ~nosuchuser/m", "traceback", [*e, "--model", "~nosuchuser/m"]),
        Case("NUL byte in a path", "traceback", ["explain", "training_args.json", "--gpus", "2x3090"],
             _write("training_args.json", json.dumps({"per_device_train_batch_size": 1, "output_dir": "o",
                                                     "deepspeed": "ds\u0000.json", "bf16": True}))),
        Case("non-UTF-8 profile", "traceback", [*e, "--profiles-dir", "prof"],
             _write("prof/x.toml", b"\xff\xfe[[gpus]]")),
        # --- inputs that hung
        Case("--images 1000000000", "hang", [*e, "--model", "minicpm-o-2.6", "--images", "1000000000"]),
        Case("config with 200k layers", "hang", [*e, "--model", "big/config.json", "--gpus", "2x3090"],
             _write("big/config.json", json.dumps({**TINY_QWEN, "num_hidden_layers": 200_000}))),
        Case("tune --gpus 1000000x3090", "hang", ["tune", "--gpus", "1000000x3090", "--out", "p"], plan_dir="p"),
        Case("YAML billion laughs", "hang", ["explain", "lf.yaml", "--gpus", "2x3090"], _write("lf.yaml", laughs)),
        Case("50 MB script", "hang", ["explain", "big.sh", "--gpus", "2x3090"], _write("big.sh", big_script)),
        Case("50 MB YAML", "hang", ["explain", "big.yaml", "--gpus", "2x3090"],
             _write("big.yaml", "stage: sft\n" + "# pad\n" * 9_000_000)),
        Case("2 MB script with an unclosed quote", "hang", ["explain", "q.sh", "--gpus", "2x3090"],
             _write("q.sh", unclosed)),
        Case("A=$A$A x40", "hang", ["explain", "d.sh", "--gpus", "2x3090"], _write("d.sh", doubling)),
        Case("a FIFO given as a file", "hang", ["explain", "fifo.json", "--gpus", "2x3090"], _fifo("fifo.json")),
        # --- silent wrong answers and contradictions
        Case("--train llm --freeze llm", "silent", [*e, "--model", "qwen2.5-7b", "--train", "llm", "--freeze", "llm"]),
        Case("nothing trained", "silent", [*e, "--model", "qwen2.5-7b", "--freeze", "llm"]),
        Case("--host-ram 64 (bytes)", "silent", [*e, "--host-ram", "64"]),
        Case("10^20 GPUs", "silent", [*e, "--gpus", "100000000000000000000x3090"]),
        Case("flash-attention-2 with fp32", "silent",
             [*e, "--model", "qwen2.5-7b", "--attn", "flash_attention_2", "--precision", "fp32"]),
        Case("bf16 on a T4", "silent", [*e, "--model", "qwen2.5-0.5b", "--gpus", "1xt4", "--precision", "amp-bf16"]),
        Case("tune --precision amp-bf16 on a 2080 Ti", "silent",
             ["tune", "--model", "qwen2.5-0.5b", "--gpus", "2x2080ti", "--precision", "amp-bf16", "--out", "p"],
             plan_dir="p"),
        Case("--must-train llm with --lora-rank 8", "silent",
             ["tune", "--model", "qwen2.5-0.5b", "--gpus", "2x3090", "--must-train", "llm", "--lora-rank", "8",
              "--out", "p"], plan_dir="p"),
        Case("20 images in a 64-token context", "silent",
             [*e, "--model", "minicpm-o-2.6", "--images", "20", "--seq-len", "64"]),
        Case("--epochs inf", "silent", ["tune", "--epochs", "inf", "--out", "p"], plan_dir="p"),
        Case("a user profile redefining rtx3090", "silent", [*e, "--profiles-dir", "prof"],
             _write("prof/gpu.toml", user_gpu)),
        Case("a user alias taking over 3090", "silent", [*e, "--profiles-dir", "prof"],
             _write("prof/gpu.toml", alias_gpu)),
        Case("launch: --hostfile that does not exist", "silent", ["launch", "p", "--hostfile", "nope"],
             _chain(_tune_into("p", "--gpus", "2x2x3090"), DATA), plan_dir="p"),
        Case("launch: the placeholder hostfile", "silent", ["launch", "p"],
             _chain(_tune_into("p", "--gpus", "2x2x3090"), DATA), plan_dir="p"),
        Case("tune --gpu typo", "silent", ["tune", "--gpu", "2x4090", "--out", "p"], plan_dir="p"),
        Case("tune --out ''", "silent", ["tune", "--out", ""]),
        Case("--force over the user's own launch.sh", "silent", ["tune", "--out", "p", "--force"],
             _write("p/launch.sh", "#!/bin/sh\necho mine\n"), plan_dir="p"),
        Case("a second tune into the same folder", "silent",
             ["tune", "--gpus", "2x3090", "--host-ram", "64GiB", "--out", "p"], _tune_into("p"), plan_dir="p"),
        Case("--force onto a plan.json folder", "silent", ["tune", "--out", "p", "--force"],
             _chain(_tune_into("p"), lambda d, m: ((d / "p/plan.json").unlink(), (d / "p/plan.json").mkdir())),
             plan_dir="p"),
    ]


def snapshot(root: Path, skip: Path | None) -> dict[str, tuple]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if skip is not None and (here == skip or skip in here.parents):
            dirnames[:] = []
            continue
        for f in filenames:
            p = here / f
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns, st.st_mode)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--timeout", type=float, default=30.0)
    ns = ap.parse_args()
    root = ns.root.resolve()
    env0 = {**os.environ, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
            "COLUMNS": "120"}
    env0.pop("MEMPLAN_PROFILES", None)

    def memplan(args: list[str], cwd: Path, timeout: float = ns.timeout, env: dict | None = None):
        code = "import sys; sys.argv[0] = 'memplan'; from planner.cli import main; main()"
        return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env={**env0, **(env or {})},
                              capture_output=True, text=True, errors="replace", timeout=timeout,
                              stdin=subprocess.DEVNULL)

    results = []
    for case in cases():
        if case.non_root and os.geteuid() == 0:
            print(f"{'skipped':10s} {0:6.1f}s  [{case.kind}] {case.name}: root ignores permissions", flush=True)
            continue
        with tempfile.TemporaryDirectory(prefix="hostile.") as tmp:
            d = Path(tmp)
            if case.setup:
                case.setup(d, memplan)
            plan = (d / case.plan_dir) if case.plan_dir else None
            before = snapshot(d, None)
            started = time.perf_counter()
            try:
                r = memplan(case.args, d, env=case.env)
                outcome, err = None, r.stderr
            except subprocess.TimeoutExpired:
                r, outcome, err = None, "hang", ""
            seconds = time.perf_counter() - started
            if outcome is None:
                lines = err.strip().splitlines()
                if "Traceback" in err or "internal error" in err:
                    outcome = "traceback"
                elif case.run_script:
                    script = plan / case.run_script if plan else None
                    if r.returncode == 0 and script and script.exists():
                        bin_dir = d / "bin"
                        bin_dir.mkdir()
                        for name in ("torchrun", "deepspeed"):
                            (bin_dir / name).write_text(RECORDER)
                            (bin_dir / name).chmod(0o755)
                        work = d / "work"
                        work.mkdir()
                        subprocess.run(["bash", str(script)], cwd=work, capture_output=True, timeout=60,
                                       env={"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(d)})
                    ran = any("PWNED" in p.name for p in d.rglob("*"))
                    outcome = "injected" if ran else "safe"
                elif r.returncode == 0:
                    outcome = "accepted"
                elif (len(lines) == 1 and lines[0].startswith("memplan: error:")
                      and snapshot(d, None) == before):  # a refusal changes nothing, the plan folder included
                    outcome = "refused"
                else:
                    outcome = "other"
            if plan is not None and plan.exists():
                os.chmod(plan, 0o755)
            shutil.rmtree(d, ignore_errors=True)
        results.append({"case": case.name, "kind": case.kind, "outcome": outcome, "seconds": round(seconds, 2),
                        "stderr": (err.strip().splitlines() or [""])[-1][:200]})
        print(f"{outcome:10s} {seconds:6.1f}s  [{case.kind}] {case.name}: {results[-1]['stderr'][:110]}", flush=True)
    totals = Counter(r["outcome"] for r in results)
    by_kind = {k: dict(Counter(r["outcome"] for r in results if r["kind"] == k)) for k in
               ("injection", "traceback", "hang", "silent")}
    print("totals:", dict(totals))
    for k, v in by_kind.items():
        print(f"  {k}: {v}")
    if ns.json:
        ns.json.write_text(json.dumps({"root": str(root), "results": results, "totals": dict(totals),
                                       "by_kind": by_kind}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
