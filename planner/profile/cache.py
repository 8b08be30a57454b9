"""The user's cache: small JSON entries that save recomputing what a file already told us (a local
config.json's parameter inventory, fitted activation terms).

Part of the profile stage, below everything that caches. Pure stdlib, no torch. An entry is
trusted only when everything about it checks out (its kind, key, format version and a checksum
of its content); anything else reads as a miss, and a cache that cannot be written just does not
cache: neither is ever an error for the user.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import Any

CACHE_ENV = "MEMPLAN_CACHE_DIR"
"""Environment variable: the cache folder itself (tests point it at a temporary folder)."""

MAX_ENTRY_BYTES = 64 * 2**20
"""An entry larger than this is not read (bytes). The largest inventory memplan writes, a MoE
with 60 layers of 256 experts (about 50,000 tensors), is about 5 MiB."""

ENTRY_FORMAT = 1
"""The envelope's own layout (kind, key, version, checksum, data); the ``version`` callers pass
is their data's."""

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def cache_dir() -> Path:
    """The cache folder: ``$MEMPLAN_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/memplan``, else
    ``~/.cache/memplan`` (the XDG base directory specification's default)."""
    own = os.environ.get(CACHE_ENV)
    if own:
        return Path(own).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and Path(xdg).is_absolute():  # the spec: a relative path is invalid and is ignored
        return Path(xdg) / "memplan"
    return Path.home() / ".cache" / "memplan"


def cache_key(*parts: str) -> str:
    """SHA-256 (hex) of ``parts``, each prefixed by its length in bytes, so that no two different
    lists of parts give the same text (``("ab", "c")`` and ``("a", "bc")`` differ)."""
    h = hashlib.sha256()
    for part in parts:
        raw = part.encode("utf-8", "surrogatepass")
        h.update(f"{len(raw)}:".encode())
        h.update(raw)
    return h.hexdigest()


def _checksum(data: dict[str, Any]) -> str:
    """SHA-256 of ``data`` as canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _path(kind: str, key: str) -> Path | None:
    """Where the entry lives: ``<cache_dir>/<kind>/<key>.json``; None when there is no cache folder
    to speak of (no home folder to find).

    Raises:
        ValueError: ``kind`` or ``key`` is not a plain file name (a caller's mistake, never the user's).
    """
    for what, name in (("kind", kind), ("key", key)):
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ValueError(f"cache {what} {name!r} is not a plain name (letters, digits, '.', '_', '-')")
    try:
        return cache_dir() / kind / f"{key}.json"
    except (RuntimeError, KeyError):  # Path.home() without $HOME or a passwd entry
        return None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not strict JSON")


def read_entry(kind: str, key: str, version: int) -> dict[str, Any] | None:
    """The data stored under (``kind``, ``key``), or None when there is none to trust: missing,
    not a regular file, unreadable, over `MAX_ENTRY_BYTES`, not JSON, another envelope format or
    data ``version``, a stored kind or key that differs, or a checksum that does not match.

    Raises:
        ValueError: ``kind`` or ``key`` is not a plain name.
    """
    path = _path(kind, key)
    if path is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return None
    try:
        with os.fdopen(fd, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                return None
            raw = fh.read(MAX_ENTRY_BYTES + 1)
    except OSError:
        return None
    if len(raw) > MAX_ENTRY_BYTES:
        return None
    try:
        doc = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), dict):
        return None
    if (doc.get("format"), doc.get("kind"), doc.get("key"), doc.get("version")) != (ENTRY_FORMAT, kind, key, version):
        return None
    try:
        if doc.get("sha256") != _checksum(doc["data"]):
            return None
    except (ValueError, RecursionError):
        return None
    return doc["data"]


def write_entry(kind: str, key: str, version: int, data: dict[str, Any]) -> None:
    """Store ``data`` under (``kind``, ``key``): written to a temporary file in the same folder,
    then renamed over the entry (``os.replace``), so a reader sees the old entry or the new one,
    never half of one. Folders are created as needed. A cache that cannot be written (read-only,
    full, a file where a folder should be) is left as it is: nothing is cached, nothing raised.

    Raises:
        ValueError: ``kind`` or ``key`` is not a plain name.
        TypeError: ``data`` is not JSON (a caller's mistake).
    """
    path = _path(kind, key)
    doc = {"format": ENTRY_FORMAT, "kind": kind, "key": key, "version": version, "sha256": _checksum(data),
           "data": data}
    text = json.dumps(doc, separators=(",", ":"), allow_nan=False)
    if path is None or len(text) > MAX_ENTRY_BYTES:
        return
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{key[:16]}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
        tmp = None
    except OSError:
        pass
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
