"""Readers: a user's training files back into settings, through the writers' key map.

The inverse of `planner.writers` (the edge of the flow, beside them): every key is looked up in
`planner.writers.keymap.KEYMAP` backwards, so a file memplan wrote reads back as the plan it came
from. Four kinds of file, recognised by content, not by name (`read_file`): a DeepSpeed JSON, an
HF ``TrainingArguments`` JSON, a LLaMA-Factory YAML, and a launch script or argument string for
MiniCPM-o's ``finetune.py`` (or any HF Trainer script). Each reader returns a `Reading`: every
setting it found with its file and key, the keys it ignored (known, no effect on memory), the keys
it does not know, and problems (contradictions, settings a trainer refuses). Nothing is dropped
silently. Pure: no torch; a script is read with `planner.explain.shell`, never run.

Every input is checked at the edge and parsed within limits (`read_bounded`, `load_json`,
`load_yaml`; docs/explain.md, "Limits on what explain reads"): a hostile file is refused in one
line naming the limit, never followed into a hang, a memory blowup or a recursion error.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from planner.explain.keys import (
    AUTO,
    BOOL_SETTINGS,
    DS_AUTO,
    DS_IGNORED,
    DS_KEYS,
    FLOAT_SETTINGS,
    HF_EXTRA,
    HF_IGNORED,
    HF_KEYS,
    HF_UNMODELLED,
    INT_SETTINGS,
    LF_EXTRA,
    LF_IGNORED,
    LF_KEYS,
    LF_MARKERS,
)
from planner.profile.architectures import ProfileError
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


@dataclass(frozen=True)
class Setting:
    """One value read: our setting name (a `KEYMAP` setting or an extra one), the value, where."""

    name: str
    value: Any
    file: str
    key: str
    note: str | None = None


@dataclass(frozen=True)
class Problem:
    """A contradiction or a setting the trainer refuses. ``fatal``: the run cannot start as
    written and memplan cannot choose for the user; ``settings`` are the ones a command-line flag
    may settle."""

    text: str
    fatal: bool = False
    settings: tuple[str, ...] = ()


@dataclass
class Reading:
    """What one file says."""

    kind: str
    """``deepspeed``, ``training_args``, ``llamafactory`` or ``script``."""
    file: str
    trainer: str | None
    """``minicpm`` (its finetune.py), ``hf`` (an HF Trainer script), ``llamafactory``; None for a
    DeepSpeed JSON, which any of them may use."""
    settings: dict[str, Setting] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    deepspeed_ref: str | None = None
    """The DeepSpeed file this one names (``--deepspeed``, ``deepspeed:``), resolved to a path."""
    inline_deepspeed: Reading | None = None
    """A DeepSpeed config given inline (``deepspeed: {...}``), read as its own reading."""

    def put(self, name: str, value: Any, key: str, note: str | None = None) -> None:
        """Record a setting, converted to its type; a value the trainer would refuse is a fatal problem.
        An empty value (YAML ``null``) leaves the trainer's default in place."""
        if value is None:
            self.ignored.append(f"{key} (null: the default)")
            return
        try:
            value = convert(name, value)
        except ValueError as exc:
            self.problems.append(Problem(f"{self.file}: {key}: {exc}", fatal=True, settings=(name,)))
            return
        self.settings[name] = Setting(name, value, self.file, key, note)


_TRUE = {"true", "yes", "t", "y", "1"}
_FALSE = {"false", "no", "f", "n", "0"}


def convert(name: str, value: Any) -> Any:
    """A raw value (a script's string, a JSON number) as the setting's type; ``"auto"`` stays.

    Raises:
        ValueError: not a value of that type (HF's ``string_to_bool`` rules for booleans).
    """
    if isinstance(value, str) and value.strip().lower() == AUTO:
        return AUTO
    if name in BOOL_SETTINGS:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE or text in _FALSE:
            return text in _TRUE
        raise ValueError(f"{_shown(value)} is not a boolean (true/false)")
    if name in INT_SETTINGS:
        number = _number(value, "an integer")
        if number != int(number):
            raise ValueError(f"{_shown(value)} is not an integer")
        return int(number)
    if name in FLOAT_SETTINGS:
        return float(_number(value, "a number"))
    return value


MAX_NUMBER = 2**63
"""Largest magnitude a numeric setting may have: what the trainers' int64 settings hold. A larger
one (``1e300``, 400 digits) means nothing to any trainer and would overflow the estimate's floats."""


def _number(value: Any, kind: str) -> int | float:
    """A finite number from a JSON/YAML number or a script's string.

    Raises:
        ValueError: not a number, or ``inf``/``nan``/beyond `MAX_NUMBER` (no trainer setting takes them).
    """
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"{_shown(value)} is not {kind}")
    if isinstance(value, int):
        number: int | float = value
    else:
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"{_shown(value)} is not {kind}") from None
        if not math.isfinite(number):
            raise ValueError(f"{_shown(value)} is not a finite number (no trainer takes inf or nan)")
    if abs(number) >= MAX_NUMBER:
        raise ValueError(f"{_shown(value)} is beyond explain's limit of 2^63 for a number")
    return number


def _shown(value: Any, limit: int = 40) -> str:
    """A value as it appears in a message: its repr, cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- recognising a file --------------------------------------------------------------------------

_SCRIPT_MARKERS = re.compile(r"finetune\.py|--model_max_length|--deepspeed|--per_device_train_batch_size|--tune_llm")


def read_file(path: str | Path) -> Reading:
    """Read one file, recognised by its content.

    Raises:
        ProfileError: the file cannot be read, is over a limit, is malformed, or is none of the four kinds.
    """
    path = Path(path)
    return read_text(read_bounded(path), str(path), folder=path.parent)


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


def read_text(text: str, name: str, folder: Path | None = None) -> Reading:
    """Read a file's text (``name`` says where it came from; ``folder`` resolves relative paths).

    Raises:
        ProfileError: malformed, over a limit, or none of the four kinds.
    """
    check_text(text, name)
    folder = folder or Path(".")
    stripped = text.lstrip()
    if stripped.startswith(("{", "[")) or name.endswith(".json"):
        doc = load_json(text, name)
        if not isinstance(doc, dict):
            raise ProfileError(f"{name}: a JSON {type(doc).__name__}, not an object of DeepSpeed or trainer keys")
        if _is_deepspeed(doc):
            return read_deepspeed(doc, name)
        if _is_training_args(doc):
            return read_training_args(doc, name, folder)
        raise ProfileError(f"{name}: a JSON object that is neither a DeepSpeed config (no zero_optimization or "
                           "train_micro_batch_size_per_gpu) nor TrainingArguments (no per_device_train_batch_size "
                           "or output_dir)")
    if _SCRIPT_MARKERS.search(text) and not name.endswith((".yaml", ".yml")):
        from planner.explain.scripts import read_script

        return read_script(text, name, folder)
    doc = load_yaml(text, name)
    if isinstance(doc, dict) and LF_MARKERS & set(doc):
        return read_llamafactory(doc, name, folder)
    if isinstance(doc, list):
        raise ProfileError(f"{name}: a YAML list, not a mapping of LLaMA-Factory keys")
    raise ProfileError(f"{name}: not a DeepSpeed JSON, TrainingArguments JSON, LLaMA-Factory YAML (stage, "
                       "finetuning_type, template) or a launch script (finetune.py, --model_max_length, --deepspeed)")


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


def _is_deepspeed(doc: dict) -> bool:
    return bool({"zero_optimization", "train_micro_batch_size_per_gpu", "train_batch_size"} & set(doc))


def _is_training_args(doc: dict) -> bool:
    return bool({"per_device_train_batch_size", "output_dir"} & set(doc))


def _resolve_path(ref: str, folder: Path, shown: str) -> str:
    """A file a config names: as written when it exists, else beside the config.

    Raises:
        ProfileError: the name holds a NUL byte (possible in a JSON or YAML string), which no file has.
    """
    if "\x00" in ref:
        raise ProfileError(f"{shown}: {ref!r} holds a NUL byte, which no file name can")
    p = Path(ref)
    try:
        p = p.expanduser()
    except RuntimeError:  # ~user of a user this machine does not have: read as written
        pass
    if p.is_absolute() or p.exists():
        return str(p)
    return str(folder / p)


# --- DeepSpeed -----------------------------------------------------------------------------------


def _leaves(doc: dict, prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for key, value in doc.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out += _leaves(value, path + ".")
        else:
            out.append((path, value))
    return out


def read_deepspeed(doc: dict, name: str) -> Reading:
    """A DeepSpeed config: every key through `KEYMAP`'s DeepSpeed column; "auto" kept for the merge."""
    r = Reading("deepspeed", name, None)
    if "bfloat16" in doc and "bf16" not in doc:
        doc = {("bf16" if k == "bfloat16" else k): v for k, v in doc.items()}
        r.notes.append(f"{name}: the old block name 'bfloat16' is read as 'bf16' (DeepSpeed does the same)")
    zero = doc.get("zero_optimization") or {}
    for legacy, setting in (("cpu_offload", "offload_optimizer"), ("cpu_offload_param", "offload_param")):
        if isinstance(zero, dict) and zero.get(legacy) is True:
            r.put(setting, "cpu", f"zero_optimization.{legacy}", "deprecated key; DeepSpeed converts it")
    for path, value in _leaves(doc):
        setting = DS_KEYS.get(path)
        if setting is not None:
            note = None
            if value == AUTO and setting not in DS_AUTO:
                note = "'auto' here is not filled by HF; DeepSpeed drops it and keeps its default"
            r.put(setting, value, path, note)
        elif path.startswith(DS_IGNORED) or path in DS_IGNORED or path.startswith("zero_optimization.cpu_offload"):
            r.ignored.append(path)
        elif path == "zero_optimization.offload_optimizer.ratio" and value != 1:
            r.problems.append(Problem(f"{name}: {path} {value}: partial optimizer offload is not modelled; "
                                      "estimated as all of it offloaded"))
        else:
            r.unknown.append(path)
    s = r.settings
    if is_true(s, "bf16") and is_true(s, "fp16"):
        r.problems.append(Problem(f"{name}: bf16.enabled and fp16.enabled are both true (DeepSpeed: 'bfloat16 and "
                                  "fp16 modes cannot be simultaneously enabled')", True, ("bf16", "fp16")))
    stage = s["zero_stage"].value if "zero_stage" in s and s["zero_stage"].value != AUTO else 0
    if stage not in (0, 1, 2, 3):
        r.problems.append(Problem(f"{name}: zero_optimization.stage {stage}: DeepSpeed takes 0, 1, 2 or 3", True))
        stage = 0
    for setting, needs in (("offload_param", 3), ("offload_optimizer", 1)):
        got = s.get(setting)
        if got is None or got.value in (AUTO, "none"):
            continue
        if got.value not in ("cpu", "nvme"):
            r.problems.append(Problem(f"{name}: {got.key} {got.value!r}: DeepSpeed takes none, cpu or nvme", True))
        elif stage < needs:
            s[setting] = Setting(setting, "none", name, got.key,
                                 f"{got.value} is ignored: DeepSpeed reads it only at ZeRO stage {needs}+")
            r.problems.append(Problem(f"{name}: {got.key} is {got.value!r} at ZeRO stage {stage}: DeepSpeed uses it "
                                      f"only from stage {needs}, so nothing is offloaded"))
    return r


def is_true(settings: dict[str, Setting], name: str) -> bool:
    got = settings.get(name)
    return got is not None and got.value is True


# --- HF TrainingArguments JSON -------------------------------------------------------------------


def read_trainer_key(r: Reading, key: str, value: Any, keys: dict[str, str], ignored: frozenset[str],
                 shown: str | None = None) -> bool:
    """One trainer-argument key (``shown`` as the user wrote it); False when it is not a known one."""
    shown = shown or key
    setting = keys.get(key) or HF_KEYS.get(key) or HF_EXTRA.get(key)
    if setting is not None:
        r.put(setting, value, shown)
    elif key in ignored or key in HF_IGNORED:
        r.ignored.append(shown)
    elif key in HF_UNMODELLED:
        if value not in (None, False, "", [], "no", "none"):
            r.problems.append(Problem(f"{r.file}: {shown} {value!r} changes memory in a way memplan does not model"))
        else:
            r.ignored.append(shown)
    else:
        return False
    return True


def combine_betas(r: Reading) -> None:
    """HF's adam_beta1 / adam_beta2 are one DeepSpeed setting, ``betas``."""
    b1, b2 = r.settings.get("adam_beta1"), r.settings.get("adam_beta2")
    if b1 is not None or b2 is not None:
        keys = ", ".join(s.key for s in (b1, b2) if s is not None)
        r.settings["adam_betas"] = Setting("adam_betas", [b1.value if b1 else 0.9, b2.value if b2 else 0.999],
                                           r.file, keys)


def deepspeed_value(r: Reading, value: Any, key: str, folder: Path) -> Reading | None:
    """``deepspeed``: a path (remembered for the merge) or an inline config (read here)."""
    if isinstance(value, str) and value.strip().startswith("{"):
        value = load_json(value, f"{r.file}: {key}: inline DeepSpeed JSON")
    if isinstance(value, dict):
        return read_deepspeed(value, f"{r.file}:{key}")
    if isinstance(value, str) and value:
        r.deepspeed_ref = _resolve_path(value, folder, f"{r.file}: {key}")
        r.put("deepspeed", value, key)
    return None


def absorb(r: Reading, inner: Reading | None) -> None:
    """An inline DeepSpeed config becomes its own reading, beside the file that holds it."""
    if inner is not None:
        r.inline_deepspeed = inner
        r.put("deepspeed", "(inline)", "deepspeed")


def read_training_args(doc: dict, name: str, folder: Path | None = None) -> Reading:
    """HF ``TrainingArguments`` as JSON (what `memplan tune` writes as training_args.json)."""
    r = Reading("training_args", name, "hf")
    inner = None
    for key, value in doc.items():
        if key == "deepspeed":
            inner = deepspeed_value(r, value, key, folder or Path("."))
        elif not read_trainer_key(r, key, value, {}, frozenset()):
            r.unknown.append(key)
    combine_betas(r)
    absorb(r, inner)
    return r


# --- LLaMA-Factory YAML --------------------------------------------------------------------------


def read_llamafactory(doc: dict, name: str, folder: Path | None = None) -> Reading:
    """A LLaMA-Factory training YAML: its own keys through `KEYMAP`, the rest as HF arguments."""
    r = Reading("llamafactory", name, "llamafactory")
    inner = None
    for key, value in doc.items():
        key = key if isinstance(key, str) else str(key)  # YAML keys may be numbers, booleans, null
        if key == "deepspeed":
            inner = deepspeed_value(r, value, key, folder or Path("."))
        elif key in LF_KEYS or key in LF_EXTRA:
            r.put(LF_KEYS.get(key) or LF_EXTRA[key], value, key)
        elif not read_trainer_key(r, key, value, {}, LF_IGNORED):
            r.unknown.append(key)
    combine_betas(r)
    absorb(r, inner)
    s = r.settings
    if is_true(s, "bf16") and is_true(s, "fp16"):
        r.problems.append(Problem(f"{name}: bf16 and fp16 are both true (HF: 'At most one of fp16 and bf16 can "
                                  "be True')", True, ("bf16", "fp16")))
    return r
