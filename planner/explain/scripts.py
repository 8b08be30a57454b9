"""Reading a launch script (``torchrun ... finetune.py --flag value ...``) or an argument string.

Part of the readers (`planner.explain.readers`): the script's commands come from `planner.explain.shell` (read,
never run); the launcher's words give the cluster's shape, the program's flags go through the
key map like any trainer argument.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from planner.errors import ProfileError
from planner.explain.keys import MINICPM_EXTRA, MINICPM_IGNORED, MINICPM_KEYS
from planner.explain.readers import (
    Problem,
    Reading,
    Setting,
    absorb,
    combine_betas,
    deepspeed_value,
    is_true,
    read_trainer_key,
)
from planner.explain.shell import Command, ShellError, parse_script

_LAUNCHERS = {"torchrun", "deepspeed", "accelerate", "python", "python3", "torch.distributed.run",
              "torch.distributed.launch"}
_LAUNCHER_KEYS = {
    "nproc_per_node": "nproc_per_node", "nproc-per-node": "nproc_per_node", "num_gpus": "nproc_per_node",
    "num-gpus": "nproc_per_node", "nnodes": "nnodes", "num_nodes": "nnodes", "num-nodes": "nnodes",
    "num_processes": "world_size", "num-processes": "world_size", "num_machines": "nnodes",
}
MINICPM_ONLY = frozenset({"tune_vision", "tune_llm", "model_max_length", "max_slice_nums", "llm_type", "use_lora"})


def split_args(words: list[str]) -> tuple[list[tuple[str, Any]], list[str]]:
    """``--key value``, ``--key=value`` and bare ``--flag`` (true) as (key, value) pairs, keys with
    dashes read as underscores (HfArgumentParser accepts both); and the words that are no flag's."""
    pairs, stray = [], []
    i = 0
    while i < len(words):
        w = words[i]
        if w.startswith("--") and len(w) > 2:
            key, eq, value = w[2:].partition("=")
            key = key.replace("-", "_")
            if eq:
                pairs.append((key, value))
            elif i + 1 < len(words) and not words[i + 1].startswith("--"):
                pairs.append((key, words[i + 1]))
                i += 1
            else:
                pairs.append((key, True))
        else:
            stray.append(w)
        i += 1
    return pairs, stray


def _program_index(words: tuple[str, ...]) -> int | None:
    """Index of the program a launcher runs: a ``.py`` file or a ``-m module`` (not a launcher's)."""
    for i, w in enumerate(words):
        if w.endswith(".py"):
            return i
        if w in ("-m", "--module") and i + 1 < len(words) and words[i + 1] not in _LAUNCHERS:
            return i + 1
    return None


def _launcher(r: Reading, words: tuple[str, ...], env: dict[str, str]) -> None:
    if not words:
        return
    if Path(words[0]).name.startswith("python") and not any(w.startswith("torch.distributed") for w in words):
        r.put("nproc_per_node", 1, f"{words[0]} (one process)")
        return
    pairs, _ = split_args(list(words))
    for key, value in pairs:
        setting = _LAUNCHER_KEYS.get(key)
        if setting is None:
            continue
        if key in ("nnodes",) and isinstance(value, str) and ":" in value:
            value = value.split(":")[-1]  # elastic min:max: plan for the most nodes
        if isinstance(value, str) and value in ("gpu", "auto"):
            r.notes.append(f"{r.file}: --{key} {value}: one process per visible GPU; pass --gpus with the count")
            continue
        r.put(setting, value, f"{words[0]} --{key}")
    include = dict(pairs).get("include")
    if isinstance(include, str) and "nproc_per_node" not in r.settings and ":" in include:
        r.put("nproc_per_node", len(include.split(":", 1)[1].split(",")), f"{words[0]} --include")
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible and "nproc_per_node" not in r.settings and "world_size" not in r.settings:
        r.put("nproc_per_node", len([d for d in visible.split(",") if d.strip()]), "CUDA_VISIBLE_DEVICES")


def read_script(text: str, name: str, folder: Path | None = None) -> Reading:
    """A launch script (``torchrun ... finetune.py --flag value ...``) or a bare argument string.

    Raises:
        ProfileError: a quote is never closed, or no command passes flags to a Python program.
    """
    folder = folder or Path(".")
    try:
        script = parse_script(text, str(folder))
    except ShellError as exc:
        raise ProfileError(f"{name}: {exc}") from None
    launch: Command | None = None
    for cmd in script.commands:
        at = _program_index(cmd.words)
        if at is not None and any(w.startswith("--") for w in cmd.words[at + 1:]):
            launch = cmd
            break
    bare = [c for c in script.commands if c.words[0].startswith("--")]
    if launch is None and not bare:
        raise ProfileError(f"{name}: a shell script with no finetune.py flags (no command passes --flags to a "
                           "Python program)")
    if launch is not None:
        at = _program_index(launch.words)
        program, args = launch.words[at], list(launch.words[at + 1:])
    else:
        program, args = "", [w for c in bare for w in c.words]
    pairs, stray = split_args(args)
    keys = {k for k, _ in pairs}
    trainer = "minicpm" if "finetune" in Path(program).name or keys & MINICPM_ONLY else "hf"
    r = Reading("script", name, trainer)
    r.notes += [f"{name}: {n}" for n in script.notes]
    if launch is not None:
        env = {**script.variables, **launch.env}
        _launcher(r, launch.words[:at], env)
        r.put("program", program, "command line")
        later = [c for c in script.commands if c.line > launch.line and c.words[0].startswith("--")]
        if later:
            r.problems.append(Problem(
                f"{name}: line {later[0].line} starts with {later[0].words[0]} but the command before ended "
                f"(a space after a line's closing backslash?): bash does not pass those flags; not read"))
    inner = None
    minicpm_keys = {**MINICPM_KEYS, **MINICPM_EXTRA} if trainer == "minicpm" else {}
    ignored = MINICPM_IGNORED if trainer == "minicpm" else frozenset()
    for key, value in pairs:
        if key == "deepspeed":
            inner = deepspeed_value(r, value, f"--{key}", folder)
        elif key == "model_name_or_path":
            r.put("model_name_or_path", value, f"--{key}")
        elif not read_trainer_key(r, key, value, minicpm_keys, ignored, f"--{key}"):
            r.unknown.append(f"--{key}")
    combine_betas(r)
    absorb(r, inner)
    for w in stray:
        r.unknown.append(w)
    s = r.settings
    if is_true(s, "bf16") and is_true(s, "fp16"):
        r.problems.append(Problem(f"{name}: --bf16 and --fp16 are both true (HF: 'At most one of fp16 and bf16 "
                                  "can be True')", True, ("bf16", "fp16")))
    if trainer == "minicpm" and is_true(s, "use_lora") and s.get("tune_llm", Setting("", True, "", "")).value is True:
        r.problems.append(Problem(
            f"{name}: --use_lora true with --tune_llm true (finetune.py's default): finetune.py refuses it ('The "
            "model cannot simultaneously adjust LLM parameters and apply LoRA'); add --tune_llm false", True))
    return r
