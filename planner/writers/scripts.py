"""Writers: the shell scripts that start a plan, and the argv `memplan launch` runs.

Single node: ``torchrun`` (what MiniCPM's script and HF's docs use; HF Trainer sets DeepSpeed up
from the config). Several nodes: DeepSpeed's own launcher with a hostfile (it starts the ranks on
every node over ssh). Every word is quoted with ``shlex.quote`` except the script's own
variables, which are `Var` objects and the only words left to expand; comments carry user text
only through `comment_text` (control characters and newlines escaped), so a model name, path or
data file can never become a command.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass

from planner.plan import Plan
from planner.units import format_bytes
from planner.writers.formats import minicpm_flags

DEFAULT_MASTER_PORT = 29500
"""torchrun's and DeepSpeed's default rendezvous port."""


@dataclass(frozen=True)
class Var:
    """A variable the script itself defines (``PLAN_DIR``, ``DATA``, ...), expanded where the word
    is used: ``"${NAME}"`` followed by ``suffix`` quoted as data. The only unquoted expansion a
    written script contains; user text is never a `Var`."""

    name: str
    suffix: str = ""

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Z_][A-Z0-9_]*", self.name):
            raise ValueError(f"not a script variable name: {self.name!r}")

    def shell(self) -> str:
        """The word as the script writes it."""
        return f'"${{{self.name}}}"' + (shell_quote(self.suffix) if self.suffix else "")


Word = str | Var
"""One argv word: data (quoted when written) or one of the script's own variables."""


def comment_text(text: object) -> str:
    """User text made safe for a ``#`` comment line: one line, every control character (newline,
    carriage return, escape, NUL ...) and non-printable character written as a Python escape."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in str(text))


def launcher_argv(plan: Plan, program: Sequence[Word], hostfile: Word = "hostfile",
                  module: bool = False) -> list[Word]:
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
        f"# Written by memplan tune: {comment_text(what)}",
        f"# model {comment_text(plan.model.name)} on {comment_text(plan.cluster.gpus)}; "
        f"plan: {comment_text(plan.candidate)}",
        f"# estimate: {format_bytes(plan.per_gpu_bytes)} per GPU, "
        f"{format_bytes(plan.host_bytes)} host RAM per node; gives up: {comment_text(gives)}",
        "set -euo pipefail",
        'PLAN_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"',
        *threads,
    ]


def shell_quote(word: str) -> str:
    """One word of data for bash: ``shlex.quote`` for printable text; text with a newline or any
    other control character as ANSI-C ``$'...'`` with every such character escaped, so each word
    stays on its line of the script and a reader sees what it holds."""
    if all(ch.isprintable() for ch in word):
        return shlex.quote(word)
    out = []
    for ch in word:
        if ch in "\\'":
            out.append("\\" + ch)
        elif ch.isprintable():
            out.append(ch)
        elif ord(ch) < 0x100:
            out.append(f"\\x{ord(ch):02x}")
        elif ord(ch) < 0x10000:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(f"\\U{ord(ch):08x}")
    return "$'" + "".join(out) + "'"


def shell_words(argv: Sequence[Word]) -> list[str]:
    """Each word as the script writes it: data quoted, the script's own `Var` expanded."""
    return [word.shell() if isinstance(word, Var) else shell_quote(word) for word in argv]


def _shell_argv(argv: Sequence[Word]) -> str:
    """argv as one shell command over several lines."""
    return " \\\n    ".join(_pairs(shell_words(argv)))


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
    argv = launcher_argv(plan, ["planner.train", Var("PLAN_DIR"), "--data", Var("DATA")], hostfile=Var("HOSTFILE"),
                         module=True)
    return _script(plan, "train with memplan's built-in HF Trainer entry point", argv,
                   [f"DEFAULT_DATA={shell_quote(plan.trainer.data_path)}", 'DATA="${DATA:-$DEFAULT_DATA}"'])


def minicpm_script(plan: Plan) -> str:
    """``minicpm_finetune.sh``: MiniCPM-o's own ``finetune.py`` with the plan's flags, shaped like
    its ``finetune_ds.sh``. Run it from MiniCPM-o's ``finetune/`` folder or set FINETUNE_PY.

    Raises:
        NotExpressible: the script cannot run this plan (see `formats.minicpm_flags`).
    """
    flags: list[Word] = list(minicpm_flags(plan))
    deepspeed = flags.index("--deepspeed")
    flags[deepspeed + 1] = Var("PLAN_DIR", "/ds_config.json")
    argv = launcher_argv(plan, [Var("FINETUNE_PY"), *flags], hostfile=Var("HOSTFILE"))
    return _script(plan, "MiniCPM-o / MiniCPM-V finetune.py with this plan", argv,
                   ['FINETUNE_PY="${FINETUNE_PY:-finetune.py}"  # MiniCPM-o/finetune/finetune.py'])


def _script(plan: Plan, what: str, argv: list[Word], variables: list[str]) -> str:
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
