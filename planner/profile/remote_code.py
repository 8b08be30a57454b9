"""A model that ships its own code: the modeling files a config.json's ``auto_map`` names, found
in the model's folder and nowhere else.

Part of the profile stage; pure (reads files, runs none). `hf_build` runs the code only when the
user passed ``--trust-remote-code``, as transformers requires ``trust_remote_code=True``; this
module checks beforehand that every file it needs is there (one line naming a missing one), that
nothing points at another repository (memplan never fetches code), and hashes the files so that
a cached inventory changes with them.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from planner.errors import ProfileError

MODEL_KEYS = ("AutoModelForCausalLM", "AutoModelForImageTextToText", "AutoModelForVision2Seq", "AutoModel")
"""The ``auto_map`` entries that build the whole model, in the order memplan prefers them (the
causal LM first; MiniCPM-o registers only ``AutoModel``)."""

MAX_CODE_FILES = 64
"""Python files one model's code may span (MiniCPM-o 2.6 has 6)."""
MAX_CODE_BYTES = 4 * 2**20
"""One code file, bytes (MiniCPM-o 2.6's largest, modeling_minicpmo.py, is 130 KiB)."""

_REF_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*$")
# The relative imports transformers follows (dynamic_module_utils.get_relative_imports).
_IMPORT_RES = (re.compile(r"^\s*import\s+\.(\S+)\s*$", re.MULTILINE),
               re.compile(r"^\s*from\s+\.(\S+)\s+import", re.MULTILINE))


@dataclass(frozen=True)
class RemoteCode:
    """The code a config.json names.

    Attributes:
        folder: the model's folder.
        config_ref: ``module.Class`` of its config class, or None (transformers' own).
        model_ref: ``module.Class`` of the model class.
        model_key: the ``auto_map`` entry it came from (``AutoModelForCausalLM``...).
        files: every Python file the two need, relative imports followed.
    """

    folder: Path
    config_ref: str | None
    model_ref: str
    model_key: str
    files: tuple[Path, ...]

    def digest(self) -> str:
        """SHA-256 (hex) of every file's name and bytes.

        Raises:
            ProfileError: a file can no longer be read.
        """
        h = hashlib.sha256()
        for path in self.files:
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise ProfileError(f"{path}: cannot read: {exc.strerror}") from None
            h.update(f"{path.name}:{len(data)}:".encode())
            h.update(data)
        return h.hexdigest()


def _ref(auto_map: dict[str, Any], key: str, where: str) -> str | None:
    value = auto_map.get(key)
    if value is None:
        return None
    if isinstance(value, list):  # AutoTokenizer-style [slow, fast]; not a model class
        value = next((v for v in value if v), None)
    if not isinstance(value, str):
        raise ProfileError(f"{where}: auto_map.{key} must be 'module.Class', got {value!r}"[:300])
    if "--" in value:
        repo = value.split("--", 1)[0]
        raise ProfileError(f"{where}: auto_map.{key} points at another repository ({repo!r}): memplan builds "
                           "remote code only from the model's own folder and never fetches it")
    if not _REF_RE.match(value):
        raise ProfileError(f"{where}: auto_map.{key} {value!r} is not 'module.Class'")
    return value


def _read_code(path: Path, where: str, why: str) -> str:
    try:
        if not path.is_file():
            raise ProfileError(f"{where}: {why} {path.name}, which is not in {path.parent} (memplan never fetches "
                               "code: copy the model's .py files next to its config.json)")
        if path.stat().st_size > MAX_CODE_BYTES:
            raise ProfileError(f"{path}: over {MAX_CODE_BYTES // 2**20} MiB, not a modeling file")
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(f"{path}: cannot read: {exc}") from None


def _needed(folder: Path, first: list[tuple[str, str]], where: str) -> tuple[Path, ...]:
    """Every file the modules need, following ``from .x import y`` as transformers does."""
    seen: dict[Path, None] = {}
    todo = [(folder / f"{module}.py", why) for module, why in first]
    while todo:
        path, why = todo.pop(0)
        if path in seen:
            continue
        if len(seen) >= MAX_CODE_FILES:
            raise ProfileError(f"{where}: the model's code spans more than {MAX_CODE_FILES} files")
        text = _read_code(path, where, why)
        seen[path] = None
        for pattern in _IMPORT_RES:
            for name in pattern.findall(text):
                rel = Path(*name.split("."))
                todo.append((path.parent / rel.with_suffix(".py"), f"{path.name} imports"))
    return tuple(seen)


def remote_code(folder: Path, raw: dict[str, Any], where: str) -> RemoteCode | None:
    """The code a config.json's ``auto_map`` names, every file checked present; None without ``auto_map``.

    Raises:
        ProfileError: ``auto_map`` malformed, naming no model class or another repository, or a
            file it needs (or one those import) missing: one line naming the file.
    """
    auto_map = raw.get("auto_map")
    if auto_map is None:
        return None
    if not isinstance(auto_map, dict):
        raise ProfileError(f"{where}: auto_map must be an object of 'module.Class' entries")
    config_ref = _ref(auto_map, "AutoConfig", where)
    model_key, model_ref = next(((k, r) for k in MODEL_KEYS if (r := _ref(auto_map, k, where))), (None, None))
    if model_ref is None:
        raise ProfileError(f"{where}: auto_map names no model class ({', '.join(MODEL_KEYS)})")
    first = [(model_ref.split(".")[0], f"auto_map.{model_key} names")]
    if config_ref:
        first.insert(0, (config_ref.split(".")[0], "auto_map.AutoConfig names"))
    return RemoteCode(folder, config_ref, model_ref, model_key, _needed(folder, first, where))


def auto_map_files(raw: dict[str, Any]) -> list[str]:
    """The ``.py`` files a config's ``auto_map`` names (for messages; nothing is checked)."""
    auto_map = raw.get("auto_map")
    refs = auto_map.values() if isinstance(auto_map, dict) else ()
    names = [r.split("--")[-1].split(".")[0] for r in refs if isinstance(r, str)]
    return sorted({f"{n}.py" for n in names if n})


def remote_refusal(where: str, raw: dict[str, Any]) -> str:
    """The one line that says ``--trust-remote-code`` is needed, and why."""
    files = ", ".join(auto_map_files(raw)) or "auto_map"
    return (f"{where}: model_type {raw['model_type']!r} is built by the code in its own folder ({files}); memplan "
            "runs that code only with --trust-remote-code, as transformers needs trust_remote_code=True (read the "
            "files first: building the model executes them; nothing is fetched)")
