"""Units: element sizes of dtypes and parsing of human sizes ("24GiB"). Nothing else.

The estimator works in bytes and element counts throughout; only `render` turns bytes into GiB.
"""

from __future__ import annotations

import re
from enum import StrEnum

KIB = 1024
MIB = 1024**2
GIB = 1024**3
TIB = 1024**4


class DType(StrEnum):
    """Storage dtypes the ledger distinguishes."""

    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"
    INT8 = "int8"

    @property
    def itemsize(self) -> int:
        """Bytes per element."""
        return _ITEMSIZE[self]


_ITEMSIZE = {DType.FP32: 4, DType.BF16: 2, DType.FP16: 2, DType.INT8: 1}

# Binary (IEC) and decimal (SI) suffixes. "GB" means 10^9 bytes, as on a spec sheet; "GiB" 2^30.
_SUFFIXES = {
    "": 1,
    "b": 1,
    "k": KIB,
    "kib": KIB,
    "kb": 10**3,
    "m": MIB,
    "mib": MIB,
    "mb": 10**6,
    "g": GIB,
    "gib": GIB,
    "gb": 10**9,
    "t": TIB,
    "tib": TIB,
    "tb": 10**12,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:e([0-9]+))?\s*([a-zA-Z]*)\s*$")


MAX_SIZE_BYTES = 2**60
"""1 EiB: no GPU, host or disk a plan is made for comes near it; larger is a typo (bytes)."""


def parse_size(text: str | int, require_unit: bool = False) -> int:
    """Parse a size such as ``24GiB``, ``24GB``, ``24576MiB``, ``1.5T`` or ``1e9`` into bytes.

    A bare letter (``24G``) is binary, like ``free -h``. With ``require_unit`` a bare number is
    refused: ``--host-ram 64`` would mean 64 bytes. Raises ``ValueError`` with a message fit to
    show a user when the text is not a non-negative size of at most `MAX_SIZE_BYTES`.
    """
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"size must not be negative: {text}")
        if text > MAX_SIZE_BYTES:
            raise ValueError(f"size {text} is over the 1 EiB memplan accepts")
        return text
    match = _SIZE_RE.match(text)
    if not match:
        if text.strip().startswith("-"):
            raise ValueError(f"size must not be negative: {text!r}")
        raise ValueError(f"not a size: {text!r} (expected e.g. 24GiB, 24GB, 24576MiB)")
    number, exponent, suffix = match.groups()
    unit = _SUFFIXES.get(suffix.lower())
    if unit is None:
        raise ValueError(f"unknown size unit {suffix!r} in {text!r} (use B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)")
    if require_unit and suffix == "":
        raise ValueError(f"{text.strip()!r} has no unit: write e.g. {text.strip()}GiB or {text.strip()}GB "
                         "(a bare number would be bytes)")
    if exponent and int(exponent) > 30 or len(number) > 30:  # beyond 1 EiB whatever the unit; no float overflow
        raise ValueError(f"size {text.strip()!r} is over the 1 EiB memplan accepts")
    value = int(round(float(number) * (10 ** int(exponent) if exponent else 1) * unit))
    if value > MAX_SIZE_BYTES:
        raise ValueError(f"size {text.strip()!r} is over the 1 EiB memplan accepts")
    return value


def format_bytes(nbytes: int) -> str:
    """The one way memplan shows a size to a user: GiB with two decimals, MiB with one below 1 GiB
    (``3.45 GiB``, ``512.0 MiB``, ``0.00 GiB`` for nothing). Tables that carry the unit in their
    title show bare numbers instead (render)."""
    if abs(nbytes) < GIB and nbytes != 0:
        return f"{nbytes / MIB:.1f} MiB"
    return f"{nbytes / GIB:.2f} GiB"


def ceil_div(a: int, b: int) -> int:
    """Integer ceiling of a / b for non-negative a and positive b."""
    return -(-a // b)


def round_up(a: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is >= a."""
    return ceil_div(a, multiple) * multiple
