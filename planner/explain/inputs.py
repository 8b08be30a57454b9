"""Inputs: one checked read of a user's file and strict, bounded JSON and YAML, within named limits.

The edge of explain, before any reader (`planner.explain.readers`): every input is checked and
parsed within limits (`read_bounded`, `load_json`, `load_yaml`; docs/explain.md, "Limits on what
explain reads"): a hostile file is refused in one line naming the limit, never followed into a
hang, a memory blowup or a recursion error.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from pathlib import Path
from typing import Any

import yaml

from planner.errors import ProfileError
from planner.units import MIB

# --- limits on what explain reads (docs/explain.md, "Limits on what explain reads") ---------------

MAX_FILE_BYTES = 1024 * 1024
"""Largest file (or ``--args`` string) explain reads, bytes: 1 MiB. Real DeepSpeed JSONs,
LLaMA-Factory YAMLs and launch scripts are a few KiB (tests/data/explain's are under 4 KiB); the
limit keeps every parser after the read (the shell reader, PyYAML's pure-Python composer at about
0.5 s per MiB) near a second at most, and /dev/zero-like files from filling memory."""
MAX_FILE_SHOWN = f"{MAX_FILE_BYTES // MIB} MiB"
MAX_NESTING = 32
"""Deepest nesting of JSON objects and arrays or YAML collections, levels. DeepSpeed's deepest key
is 3 levels down (zero_optimization.offload_optimizer.device); 32 stays far below Python's
recursion limit (1000), which the parsers and `_leaves` would otherwise hit."""
MAX_YAML_NODES = 10_000
"""Most YAML nodes (keys, values, collections) once aliases (``*name``) are expanded. A
LLaMA-Factory YAML has about 70 (tests/data/explain's has 65); a "billion laughs" document (nine
aliases of nine, nine deep) expands to 10^9 from 1 KiB. Counted from the parser's events before
anything is built, so the loader then builds at most this many (about 0.1 s)."""

MAX_NUMBER = 2**63
"""Largest magnitude a numeric setting may have: what the trainers' int64 settings hold. A larger
one (``1e300``, 400 digits) means nothing to any trainer and would overflow the estimate's floats."""


# --- one checked read ----------------------------------------------------------------------------

_NOT_REGULAR = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def read_bounded(path: Path) -> str:
    """A file's text, checked at the edge: a regular file (never a FIFO or device, which could
    block or never end), at most `MAX_FILE_BYTES` (never more than that plus one byte read), UTF-8.

    Raises:
        ProfileError: any of those fails, or the file cannot be opened.
    """
    if "\x00" in str(path):
        raise ProfileError(f"{path}: a file name cannot hold a NUL byte")
    try:
        _check_regular(path, os.stat(path))
        # O_NONBLOCK: should the file be swapped for a FIFO after the stat, opening it does not block.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise ProfileError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        _check_regular(path, os.fstat(fd))
        chunks, size = [], 0
        while size <= MAX_FILE_BYTES:
            chunk = os.read(fd, MAX_FILE_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise ProfileError(f"{path}: cannot read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if size > MAX_FILE_BYTES:  # grew since the stat, or a /proc file whose size says 0
        raise ProfileError(f"{path}: over {MAX_FILE_BYTES} bytes, explain's {MAX_FILE_SHOWN} limit for one file")
    data = b"".join(chunks)
    try:
        text = data.decode("utf-8-sig")  # -sig: a leading byte-order mark (Windows editors) is dropped
    except UnicodeDecodeError as exc:
        raise ProfileError(f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
                           "explain reads UTF-8 text files") from None
    check_text(text, str(path))
    return text


def _check_regular(path: Path, st: os.stat_result) -> None:
    for test, kind in _NOT_REGULAR:
        if test(st.st_mode):
            raise ProfileError(f"{path}: {kind}, not a regular file; explain reads files only")
    if not stat.S_ISREG(st.st_mode):
        raise ProfileError(f"{path}: not a regular file; explain reads files only")
    if st.st_size > MAX_FILE_BYTES:
        raise ProfileError(f"{path}: {st.st_size} bytes is over explain's {MAX_FILE_SHOWN} limit for one file "
                           "(real DeepSpeed JSONs, YAMLs and launch scripts are a few KiB)")


def check_text(text: str, name: str) -> None:
    """Refuse text no training file holds: over `MAX_FILE_BYTES` characters, or a NUL byte.

    Raises:
        ProfileError: either.
    """
    if len(text) > MAX_FILE_BYTES:
        raise ProfileError(f"{name}: {len(text)} characters is over explain's {MAX_FILE_SHOWN} limit for one file "
                           "or argument string")
    nul = text.find("\x00")
    if nul >= 0:
        raise ProfileError(f"{name}: a NUL byte at offset {nul}: not a text file")


# --- strict, bounded JSON and YAML ---------------------------------------------------------------


class _NonFinite(str):
    """What strict JSON refuses (``NaN``, ``Infinity``, ``1e999``), kept as written until the walk
    after parsing finds its key."""


def _finite_float(text: str) -> float | _NonFinite:
    number = float(text)
    return number if math.isfinite(number) else _NonFinite(text)


_JSON_SPECIAL = re.compile(r'[\[\]{}"\\]')


def _check_json_depth(text: str, name: str) -> None:
    """Refuse JSON nested deeper than `MAX_NESTING`, in one pass over its brackets and quotes
    (before ``json.loads``, whose recursion would otherwise fail on ``[[[[...``)."""
    depth, in_string, escaped_at = 0, False, -1
    for m in _JSON_SPECIAL.finditer(text):
        i, c = m.start(), m.group()
        if i == escaped_at:
            continue
        if in_string:
            if c == "\\":
                escaped_at = i + 1
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "[{":
            depth += 1
            if depth > MAX_NESTING:
                line = text.count("\n", 0, i) + 1
                raise ProfileError(f"{name}: nested deeper than explain's limit of {MAX_NESTING} levels at line "
                                   f"{line} (DeepSpeed configs nest 3)")
        elif c in "]}":
            depth -= 1


def _first_non_finite(doc: Any, prefix: str = "") -> tuple[str, str] | None:
    """(dotted key, text) of the first value strict JSON refuses; depth is bounded by `MAX_NESTING`."""
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for key, value in items:
        path = f"{prefix}.{key}" if prefix and isinstance(key, str) else f"{prefix}[{key}]" if prefix else str(key)
        if isinstance(value, _NonFinite):
            return path, str(value)
        found = _first_non_finite(value, path)
        if found is not None:
            return found
    return None


def load_json(text: str, name: str) -> Any:
    """Strict JSON (no ``NaN``/``Infinity``, as DeepSpeed's own writers and memplan's), nested at
    most `MAX_NESTING` deep.

    Raises:
        ProfileError: invalid, non-finite, or too deep.
    """
    _check_json_depth(text, name)
    try:
        doc = json.loads(text, parse_constant=_NonFinite, parse_float=_finite_float)
    except json.JSONDecodeError as exc:
        raise ProfileError(f"{name}: not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except ValueError as exc:  # an integer past Python's 4300-digit conversion limit
        reason = "a number with more digits than Python reads (4300)" if "digits" in str(exc) else str(exc)
        raise ProfileError(f"{name}: not valid JSON: {reason}") from None
    if isinstance(doc, _NonFinite):
        raise ProfileError(f"{name}: {doc} is not strict JSON (no NaN or Infinity)")
    found = _first_non_finite(doc)
    if found is not None:
        raise ProfileError(f"{name}: {found[0]} is {found[1]}, not strict JSON (no NaN or Infinity): give a "
                           "finite number")
    return doc


_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
"""libyaml's safe loader where PyYAML has it (ten times the pure-Python one's speed), else PyYAML's:
both build only plain data, never Python objects."""
_OPEN = -1
"""An anchor whose collection is still being read: an alias to it is the collection inside itself."""


def _check_yaml_events(text: str, name: str) -> None:
    """Refuse, from the parser's events alone (one pass, nothing built, no recursion), a YAML
    document nested deeper than `MAX_NESTING` or larger than `MAX_YAML_NODES` nodes once its
    aliases are expanded, counting each alias as the size of what it names; and an alias inside
    the collection it names.

    Raises:
        ProfileError: any of those.
        yaml.YAMLError: the text is not YAML.
    """
    anchors: dict[str, int] = {}
    started: list[tuple[str | None, int]] = []  # open collections: (anchor, nodes counted before it)
    nodes = 0
    for event in yaml.parse(text, Loader=_YAML_LOADER):
        if isinstance(event, yaml.CollectionStartEvent):
            if len(started) == MAX_NESTING:
                raise ProfileError(f"{name}: nested deeper than explain's limit of {MAX_NESTING} levels at line "
                                   f"{event.start_mark.line + 1} (LLaMA-Factory YAMLs nest 1 or 2)")
            started.append((event.anchor, nodes))
            if event.anchor is not None:
                anchors[event.anchor] = _OPEN
            nodes += 1
        elif isinstance(event, yaml.CollectionEndEvent):
            anchor, before = started.pop()
            if anchor is not None:
                anchors[anchor] = nodes - before
        elif isinstance(event, yaml.ScalarEvent):
            nodes += 1
            if event.anchor is not None:
                anchors[event.anchor] = 1
        elif isinstance(event, yaml.AliasEvent):
            size = anchors.get(event.anchor, 1)  # an unknown one: the loader says so after this
            if size == _OPEN:
                raise ProfileError(f"{name}: the alias *{event.anchor} at line {event.start_mark.line + 1} is inside "
                                   "the collection it names: it would contain itself")
            nodes += size
        if nodes > MAX_YAML_NODES:
            raise ProfileError(f"{name}: over {MAX_YAML_NODES} YAML nodes with its aliases expanded, explain's "
                               "limit (a LLaMA-Factory YAML has about 70)")


def load_yaml(text: str, name: str) -> Any:
    """A YAML document, checked by `_check_yaml_events` before a safe loader builds it.

    Raises:
        ProfileError: invalid YAML, too deep, or too large with its aliases expanded.
    """
    try:
        _check_yaml_events(text, name)
        return yaml.load(text, Loader=_YAML_LOADER)  # a safe loader: CSafeLoader or SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ProfileError(f"{name}: not valid YAML{where}: {getattr(exc, 'problem', None) or exc}") from None
    except ProfileError:
        raise
    except ValueError as exc:  # an integer past Python's 4300-digit conversion limit, a bad date
        reason = "a number with more digits than Python reads (4300)" if "digits" in str(exc) else str(exc)
        raise ProfileError(f"{name}: not valid YAML: {reason}") from None
