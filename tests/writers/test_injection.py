"""Written scripts are data: hostile names, paths and arguments go through every writer and come
out as the same words, never as commands.

The scripts are checked with ``bash -n`` and then run for real in a sandbox whose ``torchrun`` and
``deepspeed`` are stand-ins that record their argv: the recorded argv must be exactly the one the
plan intends, and the marker file a hostile word tries to create must never appear.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from planner.plan import Plan
from planner.writers import plan_files, write_plan_folder
from planner.writers.formats import deepspeed_config, llamafactory_config, training_args
from planner.writers.scripts import Var, launcher_argv
from tests.hostile import run_cli

MARK = "PWNED"
HOSTILE = [
    '"$(touch PWNED)"',
    "$(touch PWNED)",
    "`touch PWNED`",
    "'; touch PWNED; '",
    '" ; touch PWNED ; "',
    "tiny\ntouch PWNED\n#",
    "x\r\ntouch PWNED #",
    "${IFS}touch${IFS}PWNED",
    "$(touch${IFS}PWNED)",
    "a b\tc",
    "\\\"$(touch PWNED)\\\"",
    "--evil=$(touch PWNED)",
    "-",
    "données/ünï code ☃",
    "\x1b]0;touch PWNED\x07",
    "!touch PWNED",
    "*",
]

TINY_QWEN = {
    "model_type": "qwen2", "vocab_size": 512, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True,
    "architectures": ["Qwen2ForCausalLM"],
}

RECORDER = """#!/usr/bin/env python3
import json, os, sys
with open(os.environ["ARGV_LOG"], "a") as fh:
    fh.write(json.dumps([os.path.basename(sys.argv[0])] + sys.argv[1:]) + "\\n")
"""


def _tune(tmp: Path, *args: str) -> Plan:
    out = tmp / "plan"
    result = run_cli(["tune", "--out", str(out), *args], tmp, seconds=300)
    assert result.exit_code == 0, result.stderr
    return Plan.read(out / "plan.json")


@pytest.fixture(scope="module")
def plans(tmp_path_factory) -> dict[str, Plan]:
    """A MiniCPM-o plan (every writer expresses it) and a two-node plan (DeepSpeed's launcher)."""
    tmp = tmp_path_factory.mktemp("plans")
    (tmp / "a").mkdir()
    (tmp / "b").mkdir()
    return {
        "minicpm": _tune(tmp / "a", "--gpus", "2x3090", "--host-ram", "256GiB", "--target", "minicpm"),
        "nodes": _tune(tmp / "b", "--gpus", "2x2xa100-80g", "--host-ram", "512GiB"),
    }


def _hostile(plan: Plan, word: str) -> Plan:
    """The plan with ``word`` as every user-supplied text it carries."""
    trainer = plan.trainer.model_copy(update={"data_path": word, "output_dir": word})
    model = plan.model.model_copy(update={"name": word, "path": word})
    return plan.model_copy(update={"trainer": trainer, "model": model})


def _sandbox(tmp: Path) -> dict[str, str]:
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    for name in ("torchrun", "deepspeed"):
        (bin_dir / name).write_text(RECORDER)
        (bin_dir / name).chmod(0o755)
    return {"PATH": f"{bin_dir}:/usr/bin:/bin", "ARGV_LOG": str(tmp / "argv.log"), "HOME": str(tmp),
            "LC_ALL": "C.UTF-8"}


def _resolve(words: list, env: dict[str, str]) -> list[str]:
    return [env[w.name] + w.suffix if isinstance(w, Var) else w for w in words]


def _no_marker(*roots: Path) -> None:
    for root in roots:
        found = [p for p in root.rglob("*") if MARK in p.name]
        assert not found, f"a hostile word ran: {found}"


@pytest.mark.parametrize("word", HOSTILE, ids=[repr(w)[:24] for w in HOSTILE])
@pytest.mark.parametrize("kind", ["minicpm", "nodes"])
def test_scripts_run_only_the_intended_argv(plans, kind: str, word: str, tmp_path: Path):
    plan = _hostile(plans[kind], word)
    folder = tmp_path / "plan"
    write_plan_folder(plan, folder)
    env = _sandbox(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    scripts = [f for f in ("launch.sh", "minicpm_finetune.sh") if (folder / f).exists()]
    assert "launch.sh" in scripts
    expected = []
    plan_dir = str(folder.resolve())
    for script in scripts:
        text = (folder / script).read_text()
        assert subprocess.run(["bash", "-n", str(folder / script)], capture_output=True).returncode == 0, text
        for line in text.splitlines():  # no user text breaks out of a comment line
            assert line.startswith(("#", "set ", "PLAN_DIR=", "DEFAULT_DATA=", "DATA=", "FINETUNE_PY=", "HOSTFILE=",
                                    "export ", "torchrun ", "deepspeed ", "    ")), line
        run = subprocess.run(["bash", str(folder / script)], cwd=work, env=env, capture_output=True, text=True,
                             timeout=60)
        assert run.returncode == 0, run.stderr
        variables = {"PLAN_DIR": plan_dir, "DATA": word, "HOSTFILE": f"{plan_dir}/hostfile",
                     "FINETUNE_PY": "finetune.py"}
        if script == "launch.sh":
            program = ["planner.train", Var("PLAN_DIR"), "--data", Var("DATA")]
            argv = launcher_argv(plan, program, hostfile=Var("HOSTFILE"), module=True)
        else:
            from planner.writers.formats import minicpm_flags

            flags = list(minicpm_flags(plan))
            flags[flags.index("--deepspeed") + 1] = Var("PLAN_DIR", "/ds_config.json")
            argv = launcher_argv(plan, [Var("FINETUNE_PY"), *flags], hostfile=Var("HOSTFILE"))
        expected.append(_resolve(argv, variables))
    recorded = [json.loads(line) for line in Path(env["ARGV_LOG"]).read_text().splitlines()]
    assert recorded == expected
    if kind == "minicpm":
        assert word in expected[1]  # the hostile word reached the trainer as one plain argument
    _no_marker(tmp_path)


@pytest.mark.parametrize("word", HOSTILE, ids=[repr(w)[:24] for w in HOSTILE])
def test_config_files_carry_hostile_words_as_data(plans, word: str):
    """JSON is strict and parses back to the same values; the YAML parses back to the same
    document; comments stay comments."""
    plan = _hostile(plans["minicpm"], word)
    files = {f.name: f.text for f in plan_files(plan) if f.text is not None}
    assert json.loads(files["ds_config.json"]) == deepspeed_config(plan)
    assert json.loads(files["training_args.json"]) == json.loads(json.dumps(training_args(plan)))
    assert json.loads(files["training_args.json"])["output_dir"] == word
    assert yaml.safe_load(files["llamafactory.yaml"]) == llamafactory_config(plan)
    for name in ("llamafactory.yaml", "launch.sh", "minicpm_finetune.sh"):
        for line in files[name].splitlines():
            if line.startswith("#"):
                assert all(ch.isprintable() for ch in line), (name, line)
    assert Plan.model_validate(json.loads(files["plan.json"])).trainer.data_path == word


def test_hostile_model_name_from_config_end_to_end(tmp_path: Path):
    """A config.json whose ``_name_or_path`` carries a command: tune writes the plan, bash runs
    launch.sh (with stand-in launchers), and nothing but the launcher runs."""
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({**TINY_QWEN, "_name_or_path": "tiny\ntouch PWNED\n#"}))
    out = tmp_path / "plan"
    result = run_cli(["tune", "--model", str(model_dir / "config.json"), "--gpus", "2x3090", "--host-ram", "64GiB",
                      "--data", '"$(touch PWNED)"', "--output-dir", "$(touch PWNED)", "--out", str(out)],
                     tmp_path, seconds=300)
    assert result.exit_code == 0, result.stderr
    env = _sandbox(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    run = subprocess.run(["bash", str(out / "launch.sh")], cwd=work, env=env, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    recorded = [json.loads(line) for line in Path(env["ARGV_LOG"]).read_text().splitlines()]
    assert recorded == [["torchrun", "--standalone", "--nnodes", "1", "--nproc_per_node", "2", "-m", "planner.train",
                         str(out.resolve()), "--data", '"$(touch PWNED)"']]
    _no_marker(tmp_path)


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_minicpm_script_end_to_end_with_hostile_flags(tmp_path: Path):
    """``tune --target minicpm --data '"$(touch PWNED)"'``: the second injection of the hostile-input
    report, run for real."""
    out = tmp_path / "plan"
    result = run_cli(["tune", "--gpus", "2x3090", "--host-ram", "256GiB", "--target", "minicpm", "--data",
                      '"$(touch PWNED)"', "--output-dir", '"$(touch PWNED)"', "--out", str(out)], tmp_path,
                     seconds=300)
    assert result.exit_code == 0, result.stderr
    env = _sandbox(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    run = subprocess.run(["bash", str(out / "minicpm_finetune.sh")], cwd=work, env=env, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    (argv,) = [json.loads(line) for line in Path(env["ARGV_LOG"]).read_text().splitlines()]
    assert argv[argv.index("--data_path") + 1] == '"$(touch PWNED)"'
    assert argv[argv.index("--output_dir") + 1] == '"$(touch PWNED)"'
    assert argv[argv.index("--deepspeed") + 1] == f"{out.resolve()}/ds_config.json"
    _no_marker(tmp_path)
    assert not os.path.exists(work / MARK)
