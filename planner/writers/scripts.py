"""Writers: the shell scripts that start a plan, and the argv `memplan launch` runs.

Single node: ``torchrun`` (what MiniCPM's script and HF's docs use; HF Trainer sets DeepSpeed up
from the config). Several nodes: DeepSpeed's own launcher with a hostfile (it starts the ranks on
every node over ssh). Every value is quoted with ``shlex.quote``; user values never meet a shell
string unquoted.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence

from planner.plan import Plan
from planner.writers.formats import minicpm_flags

DEFAULT_MASTER_PORT = 29500
"""torchrun's and DeepSpeed's default rendezvous port."""


def launcher_argv(plan: Plan, program: Sequence[str], hostfile: str = "hostfile", module: bool = False) -> list[str]:
    """The launcher's argv for ``program`` (a script path and its arguments, or with ``module`` a
    module name and its arguments).

    Args:
        plan: the plan (its node and GPU counts).
        program: what each rank runs.
        hostfile: DeepSpeed's hostfile, for several nodes.
        module: ``program[0]`` is a module (``-m`` / ``--module``).
    """
    c = plan.cluster
    if c.nodes > 1:
        argv = ["deepspeed", "--hostfile", hostfile, "--num_nodes", str(c.nodes), "--num_gpus", str(c.gpus_per_node),
                "--master_port", str(DEFAULT_MASTER_PORT)]
        return argv + (["--module"] if module else []) + list(program)
    argv = ["torchrun", "--standalone", "--nnodes", "1", "--nproc_per_node", str(c.gpus_per_node)]
    return argv + (["-m"] if module else []) + list(program)


def _header(plan: Plan, what: str) -> list[str]:
    gives = "; ".join(g.text for g in plan.gives_up) or "nothing"
    threads = []
    if plan.options.offload_optimizer.value != "none":
        # torchrun sets OMP_NUM_THREADS=1 for several ranks per node, which leaves DeepSpeed's CPU
        # Adam one core per rank; give each rank its share of the cores instead (docs/speed.md).
        threads = [f'export OMP_NUM_THREADS="${{OMP_NUM_THREADS:-$(( $(nproc) / {plan.cluster.gpus_per_node} ))}}"']
    return [
        "#!/usr/bin/env bash",
        f"# Written by memplan tune: {what}",
        f"# model {plan.model.name} on {plan.cluster.gpus}; plan: {plan.candidate}",
        f"# estimate: {plan.per_gpu_bytes / 2**30:.2f} GiB per GPU, "
        f"{plan.host_bytes / 2**30:.2f} GiB host RAM per node; gives up: {gives}",
        "set -euo pipefail",
        'PLAN_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"',
        *threads,
    ]


def _shell_argv(argv: Sequence[str]) -> str:
    """argv as one shell line; ``$VAR`` words stay expandable (they are ours, not the user's)."""
    out = []
    for word in argv:
        out.append(word if word.startswith('"$') else shlex.quote(word))
    return " \\\n    ".join(_pairs(out))


def _pairs(words: list[str]) -> list[str]:
    """Keep ``--flag value`` (and ``-m module``) on one line."""
    lines: list[str] = []
    for w in words:
        if lines and lines[-1].startswith("-") and " " not in lines[-1] and not _is_flag(w):
            lines[-1] += " " + w
        else:
            lines.append(w)
    return lines


def _is_flag(word: str) -> bool:
    try:
        float(word)
        return False  # a negative number is a value (--max_steps -1)
    except ValueError:
        return word.startswith("-")


def launch_script(plan: Plan) -> str:
    """``launch.sh``: `memplan train` (planner.train) on this folder's plan.

    ``DATA`` (env) overrides the data file; arguments are passed on to planner.train (HF
    ``TrainingArguments`` flags such as ``--max_steps 10``).
    """
    argv = launcher_argv(plan, ["planner.train", '"$PLAN_DIR"', "--data", '"$DATA"'], hostfile='"$HOSTFILE"',
                         module=True)
    return _script(plan, "train with memplan's built-in HF Trainer entry point", argv,
                   [f"DEFAULT_DATA={shlex.quote(plan.trainer.data_path)}", 'DATA="${DATA:-$DEFAULT_DATA}"'])


def minicpm_script(plan: Plan) -> str:
    """``minicpm_finetune.sh``: MiniCPM-o's own ``finetune.py`` with the plan's flags, shaped like
    its ``finetune_ds.sh``. Run it from MiniCPM-o's ``finetune/`` folder or set FINETUNE_PY.

    Raises:
        NotExpressible: the script cannot run this plan (see `formats.minicpm_flags`).
    """
    flags = minicpm_flags(plan)
    deepspeed = flags.index("--deepspeed")
    flags[deepspeed + 1] = '"$PLAN_DIR/ds_config.json"'
    argv = launcher_argv(plan, ['"$FINETUNE_PY"', *flags], hostfile='"$HOSTFILE"')
    return _script(plan, "MiniCPM-o / MiniCPM-V finetune.py with this plan", argv,
                   ['FINETUNE_PY="${FINETUNE_PY:-finetune.py}"  # MiniCPM-o/finetune/finetune.py'])


def _script(plan: Plan, what: str, argv: list[str], variables: list[str]) -> str:
    """A launch script: the header, the script's variables, the hostfile for several nodes, then
    the command with the script's own arguments passed on."""
    lines = _header(plan, what) + variables
    if plan.cluster.nodes > 1:
        lines.append('HOSTFILE="${HOSTFILE:-$PLAN_DIR/hostfile}"  # one line per node: "host slots=N"')
    lines.append(_shell_argv(argv) + ' \\\n    "$@"')
    return "\n".join(lines) + "\n"


def hostfile(plan: Plan) -> str:
    """A DeepSpeed hostfile template for several nodes (names to replace)."""
    c = plan.cluster
    lines = ["# DeepSpeed hostfile: one node per line, as reachable by ssh from the first. Edit the names."]
    lines += [f"node{i} slots={c.gpus_per_node}" for i in range(c.nodes)]
    return "\n".join(lines) + "\n"
