"""Writers: a plan as the files each trainer reads, written into one folder, atomically.

Sixth stage of the flow (plan -> **writers** -> launch). `plan_files` renders every file in
memory (nothing touches the disk until all of them rendered); `write_plan_folder` refuses to
overwrite existing files without ``force`` and moves complete files into place, ``plan.json``
last, so an interrupted write never leaves a folder whose plan.json describes other files.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from planner.architectures import ProfileError
from planner.plan import Plan
from planner.writers.formats import NotExpressible, deepspeed_config, llamafactory_config, training_args
from planner.writers.scripts import hostfile, launch_script, minicpm_script

FILES = (
    "ds_config.json",
    "ds_config.auto.json",
    "training_args.json",
    "llamafactory.yaml",
    "minicpm_finetune.sh",
    "launch.sh",
    "hostfile",
    "plan.json",
)
"""Every file a plan folder may hold; plan.json is written last."""

EXECUTABLE = frozenset({"launch.sh", "minicpm_finetune.sh"})


@dataclass(frozen=True)
class PlanFile:
    """One file of the folder: its text, or why this plan has none."""

    name: str
    text: str | None
    skipped: str | None = None


def _json(doc: object) -> str:
    return json.dumps(doc, indent=2) + "\n"


def plan_files(plan: Plan) -> list[PlanFile]:
    """Every file of the plan folder, rendered; a file the plan cannot be expressed in says why."""
    renderers = {
        "ds_config.json": lambda: _json(deepspeed_config(plan)),
        "ds_config.auto.json": lambda: _json(deepspeed_config(plan, auto=True)),
        "training_args.json": lambda: _json(training_args(plan)),
        "llamafactory.yaml": lambda: _llamafactory_yaml(plan),
        "minicpm_finetune.sh": lambda: minicpm_script(plan),
        "launch.sh": lambda: launch_script(plan),
        "hostfile": lambda: hostfile(plan) if plan.cluster.nodes > 1 else _raise("one node: no hostfile needed"),
    }
    out = []
    for name in FILES:
        if name == "plan.json":
            continue
        try:
            out.append(PlanFile(name, renderers[name]()))
        except NotExpressible as exc:
            out.append(PlanFile(name, None, str(exc)))
    skipped = {f.name: f.skipped for f in out if f.skipped}
    names = tuple(f.name for f in out if f.text is not None) + ("plan.json",)
    out.append(PlanFile("plan.json", _json(plan.model_copy(update={"files": names, "skipped": skipped}).to_json())))
    return out


def _raise(reason: str) -> str:
    raise NotExpressible(reason)


def _llamafactory_yaml(plan: Plan) -> str:
    doc = llamafactory_config(plan)
    head = (
        f"# Written by memplan tune for LLaMA-Factory. Run it from this folder (paths are relative):\n"
        f"#   FORCE_TORCHRUN=1 llamafactory-cli train llamafactory.yaml   (LLaMA-Factory launches DeepSpeed so)\n"
        f"# plan: {plan.candidate}\n"
        f"# dataset {doc['dataset']!r} must be registered in {doc['dataset_dir']}/dataset_info.json, e.g.\n"
        f'#   {{"{doc["dataset"]}": {{"file_name": "{Path(plan.trainer.data_path).name}", "formatting": "sharegpt",\n'
        f'#     "columns": {{"messages": "conversations", "images": "image"}},\n'
        f'#     "tags": {{"role_tag": "role", "content_tag": "content",\n'
        f'#              "user_tag": "user", "assistant_tag": "assistant"}}}}}}\n'
    )
    return head + yaml.safe_dump(doc, sort_keys=False)


def write_plan_folder(plan: Plan, out: Path, force: bool = False) -> list[PlanFile]:
    """Write the plan's files into ``out``.

    Raises:
        ProfileError: files of a plan are already there and ``force`` is not set (nothing is
            written), or the folder cannot be written.
    """
    files = plan_files(plan)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ProfileError(f"--out {out}: exists and is not a folder")
    existing = [f.name for f in files if (out / f.name).exists()]
    if existing and not force:
        raise ProfileError(f"--out {out}: {', '.join(existing)} already there (--force to overwrite)")
    try:
        if not out.exists():
            _write_new_folder(files, out)
        else:
            _write_into(files, out)
    except OSError as exc:
        raise ProfileError(f"--out {out}: cannot write: {exc.strerror or exc}") from None
    return files


def _write_new_folder(files: list[PlanFile], out: Path) -> None:
    """A fresh folder appears whole: written beside it under a temporary name, then renamed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for f in files:
            if f.text is not None:
                _write_file(tmp / f.name, f.text, f.name in EXECUTABLE)
        os.chmod(tmp, 0o755)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_into(files: list[PlanFile], out: Path) -> None:
    """An existing folder (with --force): each file complete beside its place, then renamed over
    it; plan.json last. A file this plan has none of is removed only if a memplan plan wrote it."""
    staged: list[tuple[Path, Path]] = []
    try:
        for f in files:
            if f.text is None:
                continue
            fd, tmp = tempfile.mkstemp(prefix=f".{f.name}.", dir=out)
            os.close(fd)
            staged.append((Path(tmp), out / f.name))
            _write_file(Path(tmp), f.text, f.name in EXECUTABLE)
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise
    previous = _previous_files(out / "plan.json")
    for tmp, dest in staged:
        os.replace(tmp, dest)
    for f in files:
        if f.text is None and f.name in previous:
            (out / f.name).unlink(missing_ok=True)  # stale: the last plan wrote it, this one has none


def _previous_files(path: Path) -> set[str]:
    try:
        doc = json.loads(path.read_text())
        return set(doc.get("files", [])) if isinstance(doc, dict) else set()
    except (OSError, ValueError):
        return set()


def _write_file(path: Path, text: str, executable: bool) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(path, 0o755 if executable else 0o644)
