"""Checks: everything that would stop a run, found before anything starts: the plan folder and
its plan.json, the launcher on PATH, the hostfile against the plan, the data, the attempts record.

Part of the launch stage. A missing file is one line from memplan, not a traceback from a rank.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from pydantic import ValidationError

from planner.errors import ProfileError
from planner.launch.command import Command, Target, hostfile_path
from planner.plan import MAX_PLAN_BYTES, Plan
from planner.writers.scripts import hostfile as hostfile_template

HOSTFILE_ENTRY = re.compile(r"^(\S+)\s+slots=(\d+)")
"""A line of DeepSpeed's hostfile, as its launcher matches it (deepspeed/launcher/runner.py,
``_parse_hostfile``): a host, blanks, ``slots=N``; the rest of the line is ignored. Blank lines and
lines starting with ``#`` are skipped."""

MAX_SMALL_FILE_BYTES = 2**20
"""A hostfile, a dataset_info.json or a llamafactory.yaml larger than 1 MiB is not one (bytes)."""


def read_plan(plan_dir: Path) -> Plan:
    """The plan in ``plan_dir``.

    Raises:
        ProfileError: no such folder, no readable plan.json there, or not a plan this memplan reads.
    """
    path = plan_dir / "plan.json"
    try:
        if not plan_dir.is_dir():
            what = "not a folder" if os.path.lexists(plan_dir) else "no such folder"
            raise ProfileError(f"{plan_dir}: {what} (write a plan with memplan tune --out {plan_dir})")
        if not os.path.lexists(path):
            raise ProfileError(f"{plan_dir}: no plan.json (write one with memplan tune --out {plan_dir})")
        if not path.is_file():
            raise ProfileError(f"{path}: not a regular file")
        if path.stat().st_size > MAX_PLAN_BYTES:
            raise ProfileError(f"{path}: {path.stat().st_size:,} bytes, too large to be a plan")
        return Plan.read(path)
    except ProfileError:
        raise
    except OSError as exc:
        raise ProfileError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "plan"
        raise ProfileError(f"{path}: not a plan this memplan can run ({loc}: {err['msg']})") from None
    except json.JSONDecodeError as exc:
        raise ProfileError(f"{path}: not valid JSON: {exc.msg} (line {exc.lineno})") from None
    except UnicodeDecodeError:
        raise ProfileError(f"{path}: not UTF-8 text") from None
    except RecursionError:
        raise ProfileError(f"{path}: nested too deeply to be a plan") from None
    except ValueError as exc:  # Plan.read: another version, or not a plan at all
        message = str(exc).splitlines()[0] if str(exc) else "not a plan"
        raise ProfileError(message if message.startswith(str(path)) else f"{path}: {message}") from None


def readiness(plan_dir: Path, plan: Plan, target: Target, cmd: Command, hostfile: Path | None = None,
              data: str | None = None) -> list[str]:
    """What would stop the run before it trains, each as one line for the user; empty when
    nothing does. Checked on this machine: the launcher, the folder the command runs in, the
    hostfile against the plan, the data where the target reads it, and the attempts record.
    """
    problems: list[str | None] = []
    if shutil.which(cmd.argv[0], path=(os.environ | cmd.env).get("PATH")) is None:
        what = "torch" if cmd.argv[0] == "torchrun" else "deepspeed" if cmd.argv[0] == "deepspeed" else "LLaMA-Factory"
        problems.append(f"{cmd.argv[0]}: not found on PATH (install {what})")
    if not cmd.cwd.is_dir():
        problems.append(f"{cmd.cwd}: the folder the trainer runs in does not exist")
    hf = hostfile_path(Path(os.path.abspath(plan_dir)), plan, target, hostfile)
    if hf is not None:
        problems.append(hostfile_problem(plan, hf))
    problems += [data_problem(plan_dir, plan, target, cmd, data), record_problem(plan_dir)]
    return [p for p in problems if p]


def _read_small(path: Path, what: str) -> str:
    """A small text file's content.

    Raises:
        ProfileError: missing, not a regular file, unreadable, too large, or not UTF-8 text.
    """
    try:
        if not os.path.lexists(path):
            raise ProfileError(f"{what} {path}: does not exist")
        if not path.is_file():
            raise ProfileError(f"{what} {path}: not a regular file")
        with open(path, "rb") as fh:
            raw = fh.read(MAX_SMALL_FILE_BYTES + 1)
    except OSError as exc:
        raise ProfileError(f"{what} {path}: cannot read: {exc.strerror or exc}") from None
    if len(raw) > MAX_SMALL_FILE_BYTES:
        raise ProfileError(f"{what} {path}: larger than {MAX_SMALL_FILE_BYTES // 2**20} MiB, not a {what}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ProfileError(f"{what} {path}: not UTF-8 text") from None


def parse_hostfile(text: str, path: Path | str = "hostfile") -> dict[str, int]:
    """Host -> slots, read as DeepSpeed's launcher reads a hostfile (`HOSTFILE_ENTRY`).

    Raises:
        ProfileError: a line DeepSpeed refuses, a host listed twice, or no host at all.
    """
    hosts: dict[str, int] = {}
    for number, raw in enumerate(text.replace("\r\n", "\n").replace("\r", "\n").split("\n"), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = HOSTFILE_ENTRY.search(line)
        if m is None:
            raise ProfileError(f"hostfile {path}: line {number} {line[:80]!r} is not 'HOST slots=N' "
                               "(DeepSpeed's hostfile format)")
        if m.group(1) in hosts:
            raise ProfileError(f"hostfile {path}: host {m.group(1)!r} is listed twice (DeepSpeed refuses that)")
        try:
            hosts[m.group(1)] = int(m.group(2))
        except ValueError:
            raise ProfileError(f"hostfile {path}: line {number}: slots={m.group(2)[:20]}... is no GPU count") from None
    if not hosts:
        raise ProfileError(f"hostfile {path}: lists no host (one line per node: 'HOST slots=N')")
    return hosts


def hostfile_problem(plan: Plan, path: Path) -> str | None:
    """Why the hostfile at ``path`` cannot start this plan, or None: it must parse as DeepSpeed's
    launcher parses it, list exactly the plan's nodes with one slot per GPU of a node, and not be
    the template memplan writes (placeholder names under its comment line)."""
    c = plan.cluster
    if not os.path.lexists(path):
        return (f"the plan is for {c.nodes} nodes ({c.gpus}): no hostfile at {path} (write one, a line "
                f"'HOST slots={c.gpus_per_node}' per node, or pass --hostfile PATH)")
    try:
        text = _read_small(path, "hostfile")
        hosts = parse_hostfile(text, path)
    except ProfileError as exc:
        return str(exc)
    template = hostfile_template(plan)
    comments = {line.strip() for line in template.splitlines() if line.strip().startswith("#")}
    placeholders = [h for h in parse_hostfile(template) if h in hosts]
    if placeholders and comments & {line.strip() for line in text.splitlines()}:
        return (f"hostfile {path} is memplan's unedited template (placeholder host {', '.join(placeholders)}): put "
                "your nodes' ssh names in it (nodes really named so: delete its '#' comment line)")
    if len(hosts) != c.nodes:
        return f"hostfile {path} lists {len(hosts)} host(s); the plan is for {c.nodes} nodes ({c.gpus})"
    wrong = [f"{h} slots={n}" for h, n in hosts.items() if n != c.gpus_per_node]
    if wrong:
        return f"hostfile {path}: {wrong[0]}, but the plan has {c.gpus_per_node} GPUs per node ({c.gpus})"
    return None


def data_problem(plan_dir: Path, plan: Plan, target: Target, cmd: Command, data: str | None = None) -> str | None:
    """Why the trainer would not find its data, or None. The built-in trainer and MiniCPM's
    finetune.py read one JSON/JSONL file, relative to the folder they run in; LLaMA-Factory reads
    ``dataset_dir/dataset_info.json`` (relative to the plan folder) and the files it registers."""
    given = os.path.abspath(os.path.expanduser(data)) if data is not None else None
    if target is Target.LLAMAFACTORY:
        return _llamafactory_data_problem(plan_dir, given)
    raw = given or plan.trainer.data_path
    path = Path(os.path.expanduser(raw))
    where = "" if path.is_absolute() else f" (relative to {cmd.cwd}, where the trainer runs)"
    full = cmd.cwd / path
    hint = "" if given else "; pass --data PATH (or plan with memplan tune --data)"
    try:
        if not full.exists():
            return f"data file {raw}{where} does not exist{hint}"
        if not full.is_file():
            return f"data file {raw}{where}: not a regular file (the trainer reads one JSON/JSONL file){hint}"
        with open(full, "rb"):
            pass
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the plan's data_path
        return f"data file {raw!r}{where}: cannot read: {getattr(exc, 'strerror', None) or exc}"
    return None


def _llamafactory_data_problem(plan_dir: Path, data: str | None) -> str | None:
    if data is not None:
        folder, names = Path(data).parent, [Path(data).stem]
    else:
        import yaml

        try:
            doc = yaml.safe_load(_read_small(plan_dir / "llamafactory.yaml", "LLaMA-Factory config"))
        except ProfileError as exc:
            return str(exc)
        except (yaml.YAMLError, RecursionError):
            return f"{plan_dir / 'llamafactory.yaml'}: not valid YAML"
        if not isinstance(doc, dict):
            return f"{plan_dir / 'llamafactory.yaml'}: not a LLaMA-Factory config (a mapping of keys)"
        if not doc.get("dataset"):
            return f"{plan_dir / 'llamafactory.yaml'}: names no dataset"
        folder = Path(str(doc.get("dataset_dir", "data")))  # LLaMA-Factory's default dataset_dir
        names = [n.strip() for n in str(doc["dataset"]).split(",") if n.strip()]
    if str(folder) == "ONLINE":  # LLaMA-Factory's name for hub datasets: nothing here to check
        return None
    info_path = folder if folder.is_absolute() else Path(os.path.abspath(plan_dir)) / folder
    info_path = info_path / "dataset_info.json"
    try:
        info = json.loads(_read_small(info_path, "dataset_info.json"))
    except ProfileError as exc:
        return f"{exc} (LLaMA-Factory finds its datasets there; see the comment in llamafactory.yaml)"
    except (ValueError, RecursionError):
        return f"dataset_info.json {info_path}: not valid JSON"
    if not isinstance(info, dict):
        return f"dataset_info.json {info_path}: not a JSON object of datasets"
    for name in names:
        entry = info.get(name)
        if entry is None:
            return f"dataset {name!r} is not registered in {info_path} (see the comment in llamafactory.yaml)"
        if isinstance(entry, dict) and isinstance(entry.get("file_name"), str):
            local = info_path.parent / entry["file_name"]
            try:
                if not local.exists():
                    return f"dataset {name!r}: {local} does not exist (registered in {info_path})"
            except (OSError, ValueError):
                return f"dataset {name!r}: cannot read {local}"
    return None


def record_problem(plan_dir: Path) -> str | None:
    """Why no attempt can be recorded under ``PLAN_DIR/attempts``, or None (checked, not written)."""
    root = plan_dir / "attempts"
    try:
        if os.path.lexists(root) and not root.is_dir():
            return f"{root} is not a folder: move it away (memplan launch records each attempt there)"
        writable = root if root.is_dir() else plan_dir
        if not os.access(writable, os.W_OK | os.X_OK):
            return f"{writable}: not writable (memplan launch records each attempt under {root})"
    except OSError as exc:
        return f"{root}: cannot check: {exc.strerror or exc}"
    return None
