"""A calibration profile: this machine's measured constants (CUDA context, cuBLAS workspace,
allocator fragmentation, achieved FLOP/s, link bandwidth) for one GPU model, as ``memplan
calibrate`` measured them, stored as TOML in the user's config folder.

Profile stage: pure stdlib and pydantic, no torch. ``memplan calibrate`` writes it; the estimator
reads it. The stdlib reads TOML (tomllib) but cannot write it, so a small writer of flat
``key = value`` pairs lives here, every string escaped as a TOML basic string.
"""

from __future__ import annotations

import math
import os
import re
import stat
import tempfile
import tomllib
from datetime import date
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from planner.errors import ProfileError
from planner.units import GIB, KIB

CONFIG_DIR_ENV = "MEMPLAN_CONFIG_DIR"
"""Environment variable: memplan's config folder (else ``$XDG_CONFIG_HOME/memplan``, else
``~/.config/memplan``, as the XDG Base Directory specification places it)."""

CALIBRATION_SUBDIR = "calibration"
"""Folder under the config folder holding one ``<gpu>.toml`` per GPU profile name."""

MAX_CALIBRATION_FILE_BYTES = 64 * KIB
"""A calibration file is a dozen lines (under 1 KiB); anything past 64 KiB is not one."""

MAX_CONTEXT_BYTES = 64 * GIB
"""A CUDA context with its kernels and library handles takes 0.3-2 GiB; 64 GiB is no context."""
MAX_WORKSPACE_BYTES = 16 * GIB
"""cuBLAS workspaces are 4-32 MiB by default (``CUBLAS_WORKSPACE_CONFIG``); 16 GiB is a typo."""
MAX_FRAGMENTATION = 10.0
"""reserved / allocated - 1: the caching allocator holds 2-30 % more than it hands out; a
reserve ten times the tensors is not a fragmentation figure."""
MAX_TFLOPS = 100_000.0
"""Dense TFLOP/s; a B200 reaches 2,250 dense bf16 (as ``catalog.MAX_TFLOPS``)."""
MAX_LINK_GBYTES_PER_S = 100_000.0
"""GB/s between GPUs; NVLink 5 gives 1,800 per GPU."""
MAX_TEXT = 500
"""Characters in a text field (a version, the source line)."""

_GPU_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
"""A GPU profile name (as ``catalog`` names profiles); it becomes a file name, so nothing else."""
_BARE_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")


class CalibrationProfile(BaseModel):
    """What ``memplan calibrate`` measured on one GPU model. ``None`` = not measured.

    Attributes:
        gpu: the GPU profile name memplan uses (``rtx3090``); also the file's name.
        measured: the day of the measurement, ISO 8601 (``2026-12-05``).
        torch_version: ``torch.__version__`` of the run.
        cuda_version: ``torch.version.cuda`` of the run.
        cuda_context_bytes: what the driver holds for the process beyond PyTorch's reserved
            memory (context, lazily loaded kernels, library handles), bytes per GPU.
        cublas_workspace_bytes: the cuBLAS workspace the first matmul reserves, bytes per GPU.
        fragmentation_expected: median over the steps of ``max_memory_reserved /
            max_memory_allocated - 1`` (dimensionless).
        fragmentation_high: the largest of those.
        achieved_bf16_tflops: dense bf16 matmul throughput reached, TFLOP/s (1e12 FLOP/s).
        link_gbytes_per_s: all-reduce bus bandwidth between this machine's GPUs, GB/s (1e9 B/s).
        source: one line saying how it was measured.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)

    gpu: str
    measured: str
    torch_version: str = Field(min_length=1, max_length=MAX_TEXT)
    cuda_version: str | None = Field(default=None, max_length=MAX_TEXT)
    cuda_context_bytes: int | None = Field(default=None, ge=0, le=MAX_CONTEXT_BYTES)
    cublas_workspace_bytes: int | None = Field(default=None, ge=0, le=MAX_WORKSPACE_BYTES)
    fragmentation_expected: float | None = Field(default=None, ge=0, le=MAX_FRAGMENTATION)
    fragmentation_high: float | None = Field(default=None, ge=0, le=MAX_FRAGMENTATION)
    achieved_bf16_tflops: float | None = Field(default=None, gt=0, le=MAX_TFLOPS)
    link_gbytes_per_s: float | None = Field(default=None, gt=0, le=MAX_LINK_GBYTES_PER_S)
    source: str = Field(min_length=1, max_length=MAX_TEXT)

    @field_validator("gpu")
    @classmethod
    def _gpu_name(cls, value: str) -> str:
        return check_gpu_name(value)

    @field_validator("measured")
    @classmethod
    def _iso_date(cls, value: str) -> str:
        try:
            day = date.fromisoformat(value)
        except ValueError:
            raise ValueError(f"{value[:40]!r} is not an ISO date (YYYY-MM-DD)") from None
        return day.isoformat()

    @field_validator("torch_version", "cuda_version", "source")
    @classmethod
    def _one_line(cls, value: str | None) -> str | None:
        if value is not None and not value.isprintable():
            raise ValueError("must be one line of printable text")
        return value

    @model_validator(mode="after")
    def _ordered(self) -> CalibrationProfile:
        low, high = self.fragmentation_expected, self.fragmentation_high
        if low is not None and high is not None and high < low:
            raise ValueError(f"fragmentation_high {high} is below fragmentation_expected {low}")
        return self


def check_gpu_name(name: str) -> str:
    """``name`` if it is a GPU profile name (lowercase letters, digits, ``.``, ``_``, ``-``).

    Raises:
        ValueError: anything else (a path, an empty name): it would become a file name.
    """
    if not isinstance(name, str) or not _GPU_NAME_RE.match(name) or name in (".", ".."):
        raise ValueError(f"{str(name)[:60]!r} is not a GPU profile name (lowercase letters, digits, '.', '_', '-')")
    return name


def config_dir() -> Path:
    """memplan's config folder: ``$MEMPLAN_CONFIG_DIR``, else ``$XDG_CONFIG_HOME/memplan`` (an
    absolute path only, as the XDG specification asks), else ``~/.config/memplan``."""
    own = os.environ.get(CONFIG_DIR_ENV, "")
    if own.strip():
        return Path(own).expanduser()
    xdg = os.environ.get("XDG_CONFIG_HOME", "")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "memplan"
    return Path.home() / ".config" / "memplan"


def calibration_path(gpu: str) -> Path:
    """Where the calibration of GPU profile ``gpu`` lives: ``config_dir()/calibration/<gpu>.toml``.

    Raises:
        ProfileError: ``gpu`` is not a profile name (it would point elsewhere).
    """
    try:
        check_gpu_name(gpu)
    except ValueError as exc:
        raise ProfileError(f"calibration: {exc}") from None
    return config_dir() / CALIBRATION_SUBDIR / f"{gpu}.toml"


def load_calibration(gpu: str) -> CalibrationProfile | None:
    """The stored calibration of GPU profile ``gpu``, or None when there is none.

    Raises:
        ProfileError: one line naming the file and the field: not a regular file, too large, not
            UTF-8 TOML, an unknown or mistyped field, a value out of its bounds, or a profile of
            another GPU.
    """
    path = calibration_path(gpu)
    raw = _read_bounded(path)
    if raw is None:
        return None
    data = _parse(path, raw)
    try:
        profile = CalibrationProfile.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "(file)"
        msg = str(err["msg"]).removeprefix("Value error, ")
        raise ProfileError(_one_line(f"{path}: {loc}: {msg}")) from None
    if profile.gpu != gpu:
        raise ProfileError(_one_line(f"{path}: gpu: the profile is for {profile.gpu!r}, not {gpu!r}"))
    return profile


def save_calibration(profile: CalibrationProfile) -> Path:
    """Write ``profile`` to ``calibration_path(profile.gpu)`` atomically (a temporary file in the
    same folder, then a rename), so a reader never sees half a file.

    Returns:
        The path written.

    Raises:
        ProfileError: the folder or the file cannot be written.
    """
    path = calibration_path(profile.gpu)
    text = to_toml(profile)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{profile.gpu}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        raise ProfileError(_one_line(f"{path}: cannot write the calibration: {exc.strerror or exc}")) from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    return path


HEADER = ("# memplan calibration profile: constants measured on this machine by `memplan calibrate`.\n"
          "# memplan estimate, tune and explain use it for this GPU; delete the file to go back to the defaults.\n")


def to_toml(profile: CalibrationProfile) -> str:
    """The profile as TOML: a fixed comment, then one ``key = value`` line per measured field
    (a None field is left out: TOML has no null)."""
    lines = []
    for key, value in profile.model_dump().items():
        if value is not None:
            assert _BARE_KEY_RE.match(key), key  # field names: bare keys, never user text
            lines.append(f"{key} = {toml_value(value)}")
    return HEADER + "\n".join(lines) + "\n"


def toml_value(value: Any) -> str:
    """One TOML value: a basic string (every quote, backslash and control character escaped), an
    integer, a finite float or a boolean.

    Raises:
        ValueError: a non-finite float, or a type TOML cannot hold flat.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"TOML cannot hold {value!r}")
        return repr(value)
    if isinstance(value, str):
        return toml_string(value)
    raise ValueError(f"no flat TOML form for a {type(value).__name__}")


_TOML_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def toml_string(text: str) -> str:
    """``text`` as a TOML basic string. Control characters become ``\\uXXXX``; a lone surrogate
    (not a Unicode scalar value, which TOML requires) becomes U+FFFD."""
    out = []
    for ch in text:
        code = ord(ch)
        if ch in _TOML_ESCAPES:
            out.append(_TOML_ESCAPES[ch])
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\u{code:04X}")
        elif 0xD800 <= code <= 0xDFFF:
            out.append("\uFFFD")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _read_bounded(path: Path) -> bytes | None:
    """The file's bytes (at most the limit), or None when it does not exist. Opened non-blocking
    and checked to be a regular file first, so a FIFO or a device cannot hang the read."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ProfileError(_one_line(f"{path}: cannot read: {exc.strerror or exc}")) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ProfileError(_one_line(f"{path}: not a regular file"))
        with os.fdopen(fd, "rb", closefd=False) as fh:
            raw = fh.read(MAX_CALIBRATION_FILE_BYTES + 1)
    except OSError as exc:
        raise ProfileError(_one_line(f"{path}: cannot read: {exc.strerror or exc}")) from None
    finally:
        os.close(fd)
    if len(raw) > MAX_CALIBRATION_FILE_BYTES:
        raise ProfileError(_one_line(f"{path}: larger than {MAX_CALIBRATION_FILE_BYTES // KIB} KiB: "
                                     "not a calibration profile"))
    return raw


def _parse(path: Path, raw: bytes) -> dict[str, Any]:
    """The TOML document of a calibration file."""
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ProfileError(_one_line(f"{path}: not UTF-8 text (at byte offset {exc.start})")) from None
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(_one_line(f"{path}: not valid TOML: {exc}")) from None


def _one_line(text: str, limit: int = 500) -> str:
    """Text as one printable line (newlines and control characters escaped), cut at ``limit``."""
    line = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)
    return line if len(line) <= limit else line[: limit - 3] + "..."
