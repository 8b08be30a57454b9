"""Command: a plan folder -> the argv and environment that run it, per target (the built-in
trainer, MiniCPM-o's finetune.py, LLaMA-Factory); a dry run prints it.

Part of the launch stage. Commands are argv lists, never shell strings: user values (paths, extra
flags) are single words whatever they contain. What the run will read is checked in `checks`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from planner.errors import ProfileError
from planner.plan import Plan
from planner.writers.formats import NotExpressible, minicpm_flags
from planner.writers.scripts import launcher_argv


class Target(StrEnum):
    """Which trainer runs the plan."""

    BUILTIN = "builtin"  # memplan train (planner.train): HF Trainer
    MINICPM = "minicpm"  # MiniCPM-o / MiniCPM-V finetune.py
    LLAMAFACTORY = "llamafactory"  # llamafactory-cli train


@dataclass(frozen=True)
class Command:
    """What to run: argv, the environment it adds, and where."""

    argv: list[str]
    env: dict[str, str]
    cwd: Path

    def as_json(self) -> dict:
        """The command as recorded."""
        return {"argv": self.argv, "env": self.env, "cwd": str(self.cwd)}


def _no_nul(**values: str | Path | Sequence[str] | None) -> None:
    """A NUL byte cannot be in an argument or a path; say which option holds one."""
    for name, value in values.items():
        words = [value] if isinstance(value, str | Path) else list(value or ())
        if any("\x00" in str(w) for w in words):
            raise ProfileError(f"{name}: contains a NUL byte")


def hostfile_path(plan_dir: Path, plan: Plan, target: Target, hostfile: Path | None) -> Path | None:
    """The hostfile the command names: ``hostfile`` or ``PLAN_DIR/hostfile`` for a plan of several
    nodes started by DeepSpeed's launcher; None when nothing reads one.

    Raises:
        ProfileError: ``--hostfile`` given where nothing would read it (a one-node plan, which
            torchrun runs alone; LLaMA-Factory, which starts torchrun on each node).
    """
    if plan.cluster.nodes == 1:
        if hostfile is not None:
            raise ProfileError(f"--hostfile {hostfile}: the plan is for one node ({plan.cluster.gpus}), which torchrun "
                               "runs without a hostfile; drop --hostfile, or plan for several nodes "
                               "(memplan tune --gpus NODESxGPUSxNAME)")
        return None
    if target is Target.LLAMAFACTORY:
        if hostfile is not None:
            raise ProfileError(f"--hostfile {hostfile}: LLaMA-Factory starts torchrun on each node itself "
                               "(NODE_RANK, MASTER_ADDR, MASTER_PORT); it reads no hostfile")
        return None
    return Path(os.path.abspath(hostfile or plan_dir / "hostfile"))


def command(plan_dir: Path, plan: Plan, target: Target, script: Path | None = None, hostfile: Path | None = None,
            data: str | None = None, extra: Sequence[str] = ()) -> Command:
    """The command that runs ``plan`` from ``plan_dir`` with ``target``. What the run reads (the
    hostfile's content, the data) is checked by `readiness`, not here.

    Args:
        data: the training data; None: the plan's ``data_path``. A path given here is relative to
            the current folder and passed on absolute; the plan's own is relative to where the
            trainer runs, as in the scripts memplan writes.

    Raises:
        ProfileError: the target cannot run this plan, or needs something missing or unusable
            (the MiniCPM script, the LLaMA-Factory YAML), or an option that nothing would read.
    """
    _no_nul(**{"--script": script, "--hostfile": hostfile, "--data": data, "trainer arguments": extra})
    if data is not None and not data.strip():
        raise ProfileError("--data: needs a path")
    if script is not None and target is not Target.MINICPM:
        raise ProfileError(f"--script {script}: only --target minicpm runs a script (MiniCPM-o's finetune.py)")
    plan_dir = Path(os.path.abspath(plan_dir))
    data = os.path.abspath(os.path.expanduser(data)) if data is not None else None
    env: dict[str, str] = {}
    if plan.options.offload_optimizer.value != "none":
        # torchrun sets OMP_NUM_THREADS=1 for several ranks; CPU Adam wants its share of the cores.
        env["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS",
                                                str(max(1, (os.cpu_count() or 1) // plan.cluster.gpus_per_node)))
    hf_path = hostfile_path(plan_dir, plan, target, hostfile)
    hf = str(hf_path) if hf_path else "hostfile"
    if target is Target.BUILTIN:
        program = ["planner.train", str(plan_dir), "--data", data or plan.trainer.data_path, *extra]
        return _checked(Command(launcher_argv(plan, program, hf, module=True), env, Path.cwd()), plan_dir)
    if target is Target.MINICPM:
        script = _script_file(script)
        try:
            flags = minicpm_flags(plan)
        except NotExpressible as exc:
            raise ProfileError(f"--target minicpm: {exc}") from None
        flags[flags.index("--deepspeed") + 1] = str(plan_dir / "ds_config.json")
        if data:
            flags[flags.index("--data_path") + 1] = data
        # finetune.py imports its own dataset.py and trainer.py: run it from its folder
        return _checked(Command(launcher_argv(plan, [str(script), *flags, *extra], hf), env, script.parent), plan_dir)
    yaml_path = plan_dir / "llamafactory.yaml"
    if not yaml_path.is_file():
        reason = plan.skipped.get("llamafactory.yaml", "no llamafactory.yaml in the plan folder")
        raise ProfileError(f"--target llamafactory: {reason}")
    env |= {"FORCE_TORCHRUN": "1", "NNODES": str(plan.cluster.nodes), "NPROC_PER_NODE": str(plan.cluster.gpus_per_node)}
    if plan.cluster.nodes > 1:  # LLaMA-Factory runs torchrun on each node; this is the local node's command
        env |= {k: os.environ[k] for k in ("NODE_RANK", "MASTER_ADDR", "MASTER_PORT") if k in os.environ}
    argv = ["llamafactory-cli", "train", str(yaml_path), *extra]
    if data:
        argv += [f"dataset_dir={Path(data).parent}", f"dataset={Path(data).stem}"]
    return _checked(Command(argv, env, plan_dir), plan_dir)


def _checked(cmd: Command, plan_dir: Path) -> Command:
    """``cmd``, unless a word of it holds a NUL byte, which no program can be given: the options
    were checked, so it came from plan.json."""
    if any("\x00" in word for word in [*cmd.argv, *cmd.env.values()]):
        raise ProfileError(f"{plan_dir / 'plan.json'}: a value in it holds a NUL byte")
    return cmd


def _script_file(script: Path | None) -> Path:
    """MiniCPM-o's finetune.py, absolute, checked to be a readable regular file."""
    if script is None:
        raise ProfileError("--target minicpm needs --script PATH (MiniCPM-o's finetune/finetune.py)")
    try:
        if not os.path.lexists(script):
            raise ProfileError(f"--script {script}: no such file")
        if not script.is_file():
            raise ProfileError(f"--script {script}: not a regular file (MiniCPM-o's finetune/finetune.py)")
        with open(script, "rb"):
            pass
    except OSError as exc:
        raise ProfileError(f"--script {script}: cannot read: {exc.strerror or exc}") from None
    return Path(os.path.abspath(script))


def dry_run(cmd: Command, echo: Callable[[str], None] = print) -> None:
    """Print the exact command: where it runs, what it adds to the environment, its argv."""
    echo(f"cwd: {cmd.cwd}")
    for k, v in cmd.env.items():
        echo(f"env: {k}={v}")
    echo(f"argv: {json.dumps(cmd.argv)}")
