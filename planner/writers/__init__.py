"""Writers: a plan as the files each trainer reads, written into one folder, atomically.

Sixth stage of the flow (plan -> **writers** -> launch). `plan_files` renders every file in
memory (nothing touches the disk until all of them rendered); `write_plan_folder` refuses to
overwrite existing files without ``force`` and moves complete files into place, ``plan.json``
last, so an interrupted write never leaves a folder whose plan.json describes other files.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import json
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml

from planner.errors import ProfileError
from planner.plan import MAX_PLAN_BYTES, Plan
from planner.writers.formats import NotExpressible, deepspeed_config, llamafactory_config, training_args
from planner.writers.scripts import comment_text, hostfile, launch_script, minicpm_script

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
    """Strict JSON (no NaN or Infinity, which no JSON parser but Python's accepts)."""
    return json.dumps(doc, indent=2, allow_nan=False) + "\n"


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
    digests = {f.name: _sha256(f.text.encode("utf-8")) for f in out if f.text is not None}
    update = {"files": names, "skipped": skipped, "file_sha256": digests}
    out.append(PlanFile("plan.json", _json(plan.model_copy(update=update).to_json())))
    return out


def _raise(reason: str) -> str:
    raise NotExpressible(reason)


def _llamafactory_yaml(plan: Plan) -> str:
    doc = llamafactory_config(plan)
    example = json.dumps({doc["dataset"]: {"file_name": Path(plan.trainer.data_path).name, "formatting": "sharegpt"}})
    head = (
        "# Written by memplan tune for LLaMA-Factory. Run it from this folder (paths are relative):\n"
        "#   FORCE_TORCHRUN=1 llamafactory-cli train llamafactory.yaml   (LLaMA-Factory launches DeepSpeed so)\n"
        f"# plan: {comment_text(plan.candidate)}\n"
        f"# dataset {comment_text(json.dumps(doc['dataset']))} must be registered in "
        f"{comment_text(json.dumps(doc['dataset_dir']))}/dataset_info.json, e.g.\n"
        f"#   {comment_text(example[:-2])},\n"
        '#     "columns": {"messages": "conversations", "images": "image"},\n'
        '#     "tags": {"role_tag": "role", "content_tag": "content",\n'
        '#              "user_tag": "user", "assistant_tag": "assistant"}}}\n'
    )
    return head + yaml.safe_dump(doc, sort_keys=False, allow_unicode=False)


def write_plan_folder(plan: Plan, out: Path, force: bool = False) -> list[PlanFile]:
    """Write the plan's files into ``out``.

    A new folder appears whole (built beside it, renamed into place without replacing anything
    that appeared meanwhile). Into an existing folder, under an exclusive lock on it: without
    ``force`` nothing that is there is replaced; with ``force`` only the files the previous
    ``plan.json`` lists, each still as memplan wrote it (its SHA-256), never a file the user wrote
    or edited, a folder or a link. All files are complete beside their places before the first
    one is replaced; the replacements run with signals held and are undone on an error.

    Raises:
        ProfileError: files are already there and ``force`` is not set, a file there is not
            memplan's to replace, another memplan is writing the folder, or it cannot be written.
            Nothing is changed then.
    """
    files = plan_files(plan)
    out = Path(out)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ProfileError(f"--out {out}: exists and is not a folder")
    try:
        if not out.exists():
            _write_new_folder(files, out)
        else:
            with _locked(out):
                _write_into(files, out, force)
    except OSError as exc:
        raise ProfileError(f"--out {out}: cannot write: {exc.strerror or exc}") from None
    return files


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive advisory lock on the folder itself (flock; released when the process ends,
    however it ends), so two memplan runs never write one folder at once."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ProfileError(f"--out {folder}: another memplan run is writing this folder; nothing written") from None
        yield
    finally:
        os.close(fd)


def _write_new_folder(files: list[PlanFile], out: Path) -> None:
    """A fresh folder appears whole: written beside it under a temporary name, then renamed into
    place; if ``out`` appeared meanwhile (another run), nothing is replaced and nothing is left."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for f in files:
            if f.text is not None:
                _write_file(tmp / f.name, f.text, f.name in EXECUTABLE)
        os.chmod(tmp, 0o755)
        if not _rename_noreplace(tmp, out):
            raise ProfileError(f"--out {out}: appeared while memplan was writing it (another run?); nothing written")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_into(files: list[PlanFile], out: Path, force: bool) -> None:
    """Into an existing folder (locked by the caller): check every place first, stage every file
    complete beside its place, then replace them in one burst, plan.json last."""
    previous = _previous_plan(out, force)
    stale = [f.name for f in files if f.text is None and f.name in previous]
    present = [f.name for f in files if os.path.lexists(out / f.name) and (f.text is not None or f.name in stale)]
    if present and not force:
        raise ProfileError(f"--out {out}: {', '.join(present)} already there (--force to overwrite)")
    for name in present:
        _check_replaceable(out, name, previous)
    stage = Path(tempfile.mkdtemp(prefix=".memplan-new.", dir=out))
    try:
        for f in files:
            if f.text is not None:
                _write_file(stage / f.name, f.text, f.name in EXECUTABLE)
        for name in present:  # the old files, kept under a second name until every rename succeeded
            os.link(out / name, stage / f"{name}.old")
        _swap(files, out, stage, present)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _swap(files: list[PlanFile], out: Path, stage: Path, present: list[str]) -> None:
    """The renames, with SIGINT/SIGTERM/SIGHUP held so a signal cannot split them; an error undoes
    what was done (the old files are still linked in ``stage``)."""
    held = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    done: list[str] = []
    try:
        for f in files:  # FILES order: plan.json last
            if f.text is not None:
                os.replace(stage / f.name, out / f.name)
            elif f.name in present:
                os.unlink(out / f.name)  # stale: the last plan wrote it, this one has none
            else:
                continue
            done.append(f.name)
    except BaseException:
        for name in done:
            if name in present:
                os.replace(stage / f"{name}.old", out / name)
            else:
                (out / name).unlink(missing_ok=True)
        raise
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


def _previous_plan(out: Path, force: bool) -> dict[str, str | None]:
    """The files the folder's plan.json lists -> their SHA-256 as written (None from plans that
    did not record it); empty without a plan.json."""
    path = out / "plan.json"
    if not os.path.lexists(path):
        return {}
    doc = None
    if path.is_file() and not path.is_symlink():
        try:
            with open(path, "rb") as fh:
                doc = json.loads(fh.read(MAX_PLAN_BYTES + 1).decode("utf-8"))
        except (OSError, ValueError, RecursionError):
            doc = None
    if not isinstance(doc, dict) or not isinstance(doc.get("files"), list):
        if force:
            raise ProfileError(f"--out {out}: plan.json there is not a plan memplan wrote; not replacing anything")
        return {}
    digests = doc.get("file_sha256") if isinstance(doc.get("file_sha256"), dict) else {}
    listed = {str(n): digests.get(n) for n in doc["files"] if isinstance(n, str)}
    listed["plan.json"] = None  # its own digest cannot be inside it; it parsed as a plan
    return listed


def _check_replaceable(out: Path, name: str, previous: dict[str, str | None]) -> None:
    path = out / name
    if path.is_symlink() or not path.is_file():
        raise ProfileError(f"--out {out}: {name} there is not a regular file; not replacing it (nothing written)")
    if name not in previous:
        raise ProfileError(f"--out {out}: {name} there was not written by memplan (its plan.json does not list it); "
                           "move it away to write this plan (nothing written)")
    want = previous[name]
    if want is not None and _sha256(path.read_bytes()) != want:
        raise ProfileError(f"--out {out}: {name} was changed since memplan wrote it; move it away to replace it "
                           "(nothing written)")


def _rename_noreplace(src: Path, dst: Path) -> bool:
    """Rename ``src`` to ``dst`` unless ``dst`` exists (even an empty folder, which a plain rename
    would replace): Linux renameat2(RENAME_NOREPLACE). False when ``dst`` exists. Elsewhere an
    exclusive mkdir claims ``dst`` and the files move in one by one."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is not None:
        rc = renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE)
        if rc == 0:
            return True
        err = ctypes.get_errno()
        if err in (errno.EEXIST, errno.ENOTEMPTY):
            return False
        if err not in (errno.ENOSYS, errno.EINVAL):  # EINVAL: a file system without the flag
            raise OSError(err, os.strerror(err), str(dst))
    try:
        os.mkdir(dst)
    except FileExistsError:
        return False
    for entry in os.listdir(src):
        os.replace(src / entry, dst / entry)
    os.chmod(dst, 0o755)
    os.rmdir(src)
    return True


_AT_FDCWD = -100  # <fcntl.h>: paths relative to the working directory
_RENAME_NOREPLACE = 1  # <linux/fs.h>: fail with EEXIST rather than replace the target



def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_file(path: Path, text: str, executable: bool) -> None:
    with open(path, "x", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(path, 0o755 if executable else 0o644)
