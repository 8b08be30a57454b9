"""Readers: a user's training files back into settings, through the writers' key map.

The inverse of `planner.writers` (the edge of the flow, beside them): every key is looked up in
`planner.writers.keymap.KEYMAP` backwards, so a file memplan wrote reads back as the plan it came
from. Three kinds of document here: a DeepSpeed JSON, an HF ``TrainingArguments`` JSON and a
LLaMA-Factory YAML (a launch script is `planner.explain.scripts`'; `planner.explain.recognise` tells
them apart by content). Each reader returns a `Reading`: every setting it found with its file and
key, the keys it ignored (known, no effect on memory), the keys it does not know, and problems
(contradictions, settings a trainer refuses). Nothing is dropped silently. Pure: no torch.

The text reaches a reader already checked and parsed within limits (`planner.explain.inputs`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from planner.errors import ProfileError
from planner.explain.inputs import MAX_NUMBER, load_json
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
)


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
