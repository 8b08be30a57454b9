"""memplan's estimate against published GPU memory measurements: per source, before and after.

Runs every row's flags through ``memplan estimate --json`` in this process (configs are relative
to the row file's folder), compares the figure the row measured (``measure_kind``: ``allocated``
= ``torch.cuda.max_memory_allocated``, ``reserved`` = ``max_memory_reserved``, ``nvidia-smi``;
``unstated`` is compared with reserved, and said so) and prints, per source and overall, the
median |error|, the signed median, the rows under-predicted by more than 10 %, and the band's
coverage (measured value inside low..high). Rows whose estimate is UNKNOWN are listed, never
counted as errors.

"Before" is what memplan printed before the band (one figure: tensors + 512 MiB context + 32 MiB
cuBLAS + 16 MiB NCCL per peer + 5 % of the tensors), compared with every kind; "before, per kind"
maps the same constants to the three figures (allocated = tensors, reserved = tensors x 1.05 +
32 MiB, nvidia-smi = the total). "After" is the band's expected figure of the matching kind.

Rows get the flags of ``tests/data/calibration/flag_overlay.json`` added (by id): what their source
states that the published row's flags could not say when it was collected (``--lora-dropout``);
``--no-overlay`` runs the rows as published.

``--fit`` prints the fragmentation fractions the calibration rows (the dev set and the rows of
the extra file marked ``"split": "calibration"``) give; held-out rows never enter it.

Usage::

    python tools/eval_dev.py                       # dev set + tests/data/calibration/measured_extra.jsonl
    python tools/eval_dev.py --markdown out.md --fit
    python tools/eval_dev.py --cache /tmp/rows.json  # reuse estimates between runs (slow rows trace)
    python tools/eval_dev.py --no-overlay            # the rows' own flags only
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEV = Path(os.environ.get("MEMPLAN_DEV_SET", "/work/shared/calibration/measured_dev.jsonl"))
EXTRA = ROOT / "tests" / "data" / "calibration" / "measured_extra.jsonl"
OVERLAY = ROOT / "tests" / "data" / "calibration" / "flag_overlay.json"
GIB = 2**30
MIB = 2**20
UNDER = -0.10
"""A row is under-predicted when the estimate is more than 10 % below the measurement."""

# memplan's runtime constants before the band (planner/estimate/runtime.py at e854ff5).
OLD_CONTEXT, OLD_CUBLAS, OLD_NCCL_PER_PEER, OLD_RESERVE = 512 * MIB, 32 * MIB, 16 * MIB, 0.05

SOURCES = (("torchtune", "torchtune"), ("pytorch/ao", "torchao"), ("PEFT", "PEFT"), ("litgpt", "LitGPT"),
           ("Raschka", "LoRA study"))


@dataclass
class Row:
    """One published measurement and memplan's figures for it."""

    id: str
    source: str
    split: str
    kind: str
    measured: float  # GiB
    trusted: bool
    verdict: str = ""
    unmodeled: list[str] = field(default_factory=list)
    tensor: float = 0.0  # GiB, tensors at the peak
    figures: dict[str, dict[str, float]] = field(default_factory=dict)  # kind -> low/expected/high GiB
    world: int = 1

    @property
    def figure(self) -> str:
        return {"allocated": "allocated", "nvidia-smi": "nvidia_smi"}.get(self.kind, "reserved")

    def after(self) -> dict[str, float]:
        return self.figures[self.figure]

    def before_single(self) -> float:
        nccl = OLD_NCCL_PER_PEER * (self.world - 1) / GIB
        return self.tensor * (1 + OLD_RESERVE) + (OLD_CONTEXT + OLD_CUBLAS) / GIB + nccl

    def before_kind(self) -> float:
        if self.kind == "allocated":
            return self.tensor
        if self.kind == "nvidia-smi":
            return self.before_single()
        return self.tensor * (1 + OLD_RESERVE) + OLD_CUBLAS / GIB


def source_of(text: str) -> str:
    """The short name of a row's source."""
    return next((name for key, name in SOURCES if key.lower() in text.lower()), text.split()[0])


def read_overlay(path: Path | None) -> dict[str, list[str]]:
    """Row id -> the flags to add (``flag_overlay.json``'s ``rows``); empty without a file."""
    if path is None:
        return {}
    rows = json.loads(path.read_text())["rows"]
    return {rid: list(entry["flags"]) for rid, entry in rows.items()}


def with_overlay(raw: dict, overlay: dict[str, list[str]]) -> dict:
    """The row with its overlay flags added; a flag the row already sets is an error (the overlay
    says only what the row could not)."""
    extra = overlay.get(raw["id"], [])
    clash = [f for f in extra if f.startswith("--") and f in raw["flags"]]
    if clash:
        raise ValueError(f"{raw['id']}: the overlay adds {', '.join(clash)}, which the row already sets")
    return dict(raw, flags=[*raw["flags"], *extra]) if extra else raw


def read_rows(path: Path, split: str | None, overlay: dict[str, list[str]] | None = None) -> list[tuple[dict, Path]]:
    """The rows of a JSONL file (overlay flags added), each with the folder its configs are relative to."""
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            raw = with_overlay(json.loads(line), overlay or {})
            raw.setdefault("split", split or raw.get("split", "calibration"))
            out.append((raw, path.parent))
    return out


def run_row(raw: dict, folder: Path) -> dict:
    """``memplan estimate --json`` for one row, in this process."""
    from click.testing import CliRunner

    from planner.cli.main import main

    flags = list(raw["flags"])
    for i, flag in enumerate(flags[:-1]):
        if flag == "--model" and (folder / flags[i + 1]).exists():
            flags[i + 1] = str(folder / flags[i + 1])
    if "--json" not in flags:
        flags.append("--json")
    if "--host-ram" not in flags:
        flags += ["--host-ram", "4TiB"]  # the GPU figure never depends on it
    result = CliRunner().invoke(main, ["estimate", *flags])
    if result.exit_code != 0:
        raise RuntimeError(f"{raw['id']}: exit {result.exit_code}: {result.output[-400:]}")
    return json.loads(result.output[result.output.index("{"):])


def to_row(raw: dict, doc: dict) -> Row:
    """A row with memplan's figures from its estimate document."""
    figs = {k: {p: v / GIB for p, v in (("low", b["low_bytes"]), ("expected", b["expected_bytes"]),
                                        ("high", b["high_bytes"]))} for k, b in doc["gpu_figures"].items()}
    return Row(raw["id"], source_of(raw["source"]), raw["split"], raw["measure_kind"], raw["measured_gib"],
               raw["confidence"] in ("high", "medium"), doc["verdict"], doc["unmodeled"],
               doc["per_gpu"]["tensor_bytes"] / GIB, figs, doc["world_size"])


def error(est: float, measured: float) -> float:
    return (est - measured) / measured


@dataclass
class Summary:
    """Errors of one set of rows for one way of estimating."""

    n: int
    median_abs: float
    signed_median: float
    under: list[str]
    coverage: float | None = None
    above_high: list[str] = field(default_factory=list)


def summarize(rows: list[Row], how: str) -> Summary | None:
    """``how``: ``before`` (the one printed figure), ``before-kind`` or ``after`` (the band)."""
    if not rows:
        return None
    est = {"before": Row.before_single, "before-kind": Row.before_kind,
           "after": lambda r: r.after()["expected"]}[how]
    errs = [(r, error(est(r), r.measured)) for r in rows]
    out = Summary(len(rows), statistics.median(abs(e) for _, e in errs), statistics.median(e for _, e in errs),
                  [r.id for r, e in errs if e < UNDER])
    if how == "after":
        inside = [r for r in rows if r.after()["low"] <= r.measured <= r.after()["high"]]
        out.coverage = len(inside) / len(rows)
        out.above_high = [r.id for r in rows if r.measured > 1.10 * r.after()["high"]]
    return out


def table(rows: list[Row], title: str, by: str = "source") -> list[str]:
    """Markdown lines: per source (or per measured kind) and overall, before / before per kind /
    after."""
    lines = [f"### {title}", "", f"| {by} | rows | before: median \\|err\\| / signed / under >10 % | "
             "before per kind | after: median \\|err\\| / signed / under >10 % | band coverage | above high +10 % |",
             "|---|---|---|---|---|---|---|"]
    groups = sorted({getattr(r, by) for r in rows}) + ["all"]
    for g in groups:
        sel = [r for r in rows if g in ("all", getattr(r, by))]
        b, k, a = (summarize(sel, h) for h in ("before", "before-kind", "after"))
        if a is None or b is None or k is None:
            continue
        cell = lambda s: f"{s.median_abs:.1%} / {s.signed_median:+.1%} / {len(s.under)}"  # noqa: E731
        lines.append(f"| {g} | {a.n} | {cell(b)} | {cell(k)} | {cell(a)} | {a.coverage:.0%} | "
                     f"{', '.join(a.above_high) or '-'} |")
    return lines + [""]


def row_lines(rows: list[Row]) -> list[str]:
    """Markdown lines, one per row: the measured figure, before, after (low / expected / high)."""
    lines = ["| row | kind | conf. | measured GiB | before | after low / expected / high | error | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        a = r.after()
        kind = r.kind if r.kind != "unstated" else "unstated (vs reserved)"
        lines.append(f"| {r.id} | {kind} | {'trusted' if r.trusted else 'low'} | {r.measured:.2f} | "
                     f"{r.before_single():.2f} | {a['low']:.2f} / {a['expected']:.2f} / {a['high']:.2f} | "
                     f"{error(a['expected'], r.measured):+.1%} | {r.verdict} |")
    return lines + [""]


def fit(rows: list[Row]) -> list[str]:
    """The fragmentation fractions the trusted calibration rows with a stated reserved figure give:
    ``measured / allocated_expected - 1``; expected = their median, high = their largest."""
    pairs = [(r.id, r.measured / r.figures["allocated"]["expected"] - 1) for r in rows
             if r.kind == "reserved" and r.trusted and r.split == "calibration"]
    if not pairs:
        return ["no trusted reserved row to fit on", ""]
    values = sorted(f for _, f in pairs)
    lines = [f"fragmentation (reserved / allocated - 1) over {len(pairs)} trusted calibration rows: "
             f"median {statistics.median(values):.3f}, max {values[-1]:.3f}, min {values[0]:.3f}"]
    lines += [f"  {i}: {f:+.3f}" for i, f in sorted(pairs, key=lambda p: p[1])]
    return lines + [""]


def code_fingerprint() -> str:
    """A hash of memplan's sources: a cached estimate counts only for the code that made it."""
    digest = hashlib.sha256()
    for path in sorted((ROOT / "planner").rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def collect(paths: Iterable[tuple[Path, str | None]], cache: Path | None,
            overlay: dict[str, list[str]] | None = None) -> tuple[list[Row], list[tuple[str, str]]]:
    """Every row's estimate (from the cache where it holds the same flags and code); UNKNOWN rows
    apart."""
    known = json.loads(cache.read_text()) if cache and cache.exists() else {}
    code = code_fingerprint()
    rows, unknown = [], []
    seen: set[str] = set()
    for path, split in paths:
        for raw, folder in read_rows(path, split, overlay):
            seen.add(raw["id"])
            key = json.dumps([raw["flags"], str(folder), code])
            doc = known.get(raw["id"], {}).get("doc") if known.get(raw["id"], {}).get("key") == key else None
            if doc is None:
                print(f"estimating {raw['id']}...", file=sys.stderr, flush=True)
                doc = run_row(raw, folder)
                known[raw["id"]] = {"key": key, "doc": doc}
            if doc["verdict"] == "UNKNOWN":
                unknown.append((raw["id"], "; ".join(doc["unmodeled"])))
                continue
            rows.append(to_row(raw, doc))
    if cache:
        cache.write_text(json.dumps(known))
    missing = sorted(set(overlay or {}) - seen)
    if missing:
        raise ValueError(f"the overlay names rows that are not in the data: {', '.join(missing)}")
    return rows, unknown


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dev", type=Path, default=DEV, help="the dev set (JSONL)")
    parser.add_argument("--extra", type=Path, default=EXTRA, help="more rows, each with a split (JSONL)")
    parser.add_argument("--markdown", type=Path, help="also write the tables to this file")
    parser.add_argument("--cache", type=Path, help="keep the estimates here between runs")
    parser.add_argument("--fit", action="store_true", help="print the fragmentation the calibration rows give")
    parser.add_argument("--overlay", type=Path, default=OVERLAY, help="flags added to rows by id (JSON)")
    parser.add_argument("--no-overlay", action="store_true", help="run the rows' own flags only")
    args = parser.parse_args(argv)
    os.environ["MEMPLAN_CONFIG_DIR"] = tempfile.mkdtemp(prefix="memplan-eval-")  # no user calibration
    paths = [(args.dev, "dev")] + ([(args.extra, None)] if args.extra.exists() else [])
    overlay = {} if args.no_overlay else read_overlay(args.overlay)
    rows, unknown = collect(paths, args.cache, overlay)
    dev = [r for r in rows if r.split == "dev"]
    cal = [r for r in rows if r.split == "calibration"]
    held = [r for r in rows if r.split == "held_out"]
    lines: list[str] = []
    lines += table(dev, f"dev set ({len(dev)} rows)")
    if cal:
        lines += table(cal, f"extra rows, calibration part ({len(cal)} rows)")
    if held:
        lines += table(held, f"extra rows, held out ({len(held)} rows)")
    trusted = [r for r in rows if r.trusted and r.split != "held_out"]
    lines += table(trusted, "trusted rows (high/medium), dev + calibration")
    lines += table([r for r in rows if r.trusted], "trusted rows, every part, by the figure measured", by="kind")
    lines += ["### every row", ""] + row_lines(rows)
    if unknown:
        lines += ["UNKNOWN (not counted): " + "; ".join(f"{i}: {why}" for i, why in unknown), ""]
    if args.fit:
        for r in dev:
            r.split = "calibration" if r.split == "dev" else r.split
        lines += fit(dev + cal)
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
