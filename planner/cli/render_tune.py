"""Rendering of ``memplan tune``: the ranked candidates, the chosen plan's speed, the setups left
TIGHT or UNKNOWN, and the fixes, as rich tables or JSON. Only here and in `render` do bytes
become GiB.

The edge of the flow, with `cli`. Nothing here computes memory.
"""

from __future__ import annotations

from typing import Any

from rich.console import Group as RichGroup
from rich.table import Table
from rich.text import Text

from planner.cli.render import band_json, estimate_json, estimate_view, gib
from planner.estimate.result import Verdict
from planner.search.search import summarize_rejections
from planner.units import GIB


def _gives(c: Any) -> str:
    return "; ".join(g.text for g in c.gives_up) or "-"


def _how(c: Any) -> str:
    o = c.options
    if o.engine.value == "torch":
        return "torch DDP"
    off = [f"{k}>{v.value}" for k, v in (("opt", o.offload_optimizer), ("param", o.offload_param))
           if v.value != "none"]
    return f"ZeRO-{int(o.zero)}" + (f" {' '.join(off)}" if off else "")


def _trains(c: Any) -> str:
    o = c.options
    return f"LoRA r{o.lora.rank}" if o.lora else "full"


def candidates_table(candidates: list[Any], top: int) -> Table:
    """The ranked candidates: how each runs, its memory, its speed and what it gives up."""
    table = Table(title=f"what fits, best first (top {min(top, len(candidates))} of {len(candidates)})",
                  title_justify="left")
    table.add_column("#", justify="right", no_wrap=True)
    table.add_column("setup", ratio=3)
    for col in ("batch", "ctx", "GPU GiB\nexp/high", "host GiB", "tok/s"):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("gives up", ratio=2)
    for i, c in enumerate(candidates[:top], 1):
        o, w = c.options, c.workload
        setup = Text(f"{_how(c)}\n{o.precision.value} {o.optimizer.value} ckpt {'on' if o.grad_ckpt else 'off'}"
                     f" {_trains(c)}")
        ctx = f"{w.seq_len}" + (f"/{w.max_slice_nums}sl" if w.images else "")
        table.add_row(str(i), setup, f"{w.micro_batch}x{w.grad_accum}", ctx,
                      _exp_high(c.estimate.per_gpu.band), f"{c.estimate.host.total_bytes / GIB:.2f}",
                      f"{c.speed.tokens_per_s:,.0f}", Text(_gives(c)), style="bold" if i == 1 else None)
    return table


def _exp_high(band: Any) -> str:
    """``expected/high`` in GiB, two decimals for the expected figure and one for the high end."""
    return f"{band.expected / GIB:.2f}/{band.high / GIB:.1f}"


_TERMS = {
    "compute": "forward and backward matmuls at the GPU's dense peak x the MFU constant",
    "recompute": "the forward again under activation checkpointing",
    "zero_comm": "gradient reduction and ZeRO-3 parameter gathers over the GPUs' link",
    "offload": "offloaded states and parameters over PCIe (and NVMe)",
    "cpu_optimizer": "DeepSpeed's CPU Adam on the host's cores",
}


def speed_table(speed: Any) -> Table:
    """The chosen plan's time per optimizer step, term by term (docs/speed.md)."""
    table = Table(title="time per optimizer step (docs/speed.md)", title_justify="left")
    table.add_column("term")
    table.add_column("seconds", justify="right")
    table.add_column("what", style="dim")
    for name, sec in speed.terms.items():
        table.add_row(name, f"{sec:.3f}", _TERMS.get(name, ""))
    table.add_row("total", f"{speed.total_s:.3f}",
                  f"{speed.tokens_per_step:,} tokens -> {speed.tokens_per_s:,.0f} tokens/s", style="bold")
    return table


def _fix_line(fix: Any) -> Text:
    c = fix.candidate
    return Text(f"  {fix.change}: {c.name} fits with {gib(c.estimate.per_gpu.total_bytes)} per GPU, "
                f"{gib(c.estimate.host.total_bytes)} host, {c.speed.tokens_per_s:,.0f} tokens/s"
                + (f"; gives up {_gives(c)}" if c.gives_up else ""))


def tune_view(result: Any, fixes: list[Any], files: list[Any], out: Any, seconds: float, notes: list[str],
              title: str, top: int) -> RichGroup:
    """The whole `memplan tune` screen."""
    rejected = ", ".join(f"{n} by {b}" for b, n in sorted(summarize_rejections(result.rejections).items())) or "none"
    parts: list[Any] = [Text(title, style="bold"),
                        Text(f"searched {result.evaluated} estimates in {seconds:.2f} s; rejected: {rejected}; "
                             f"global batch {result.global_batch}, margin {result.margin:.0%} kept free at the "
                             "high end of each band", style="dim")]
    chosen = result.chosen
    if chosen is None:
        fully = " that memplan models fully" if result.unknown else ""
        parts.append(Text(f"NOTHING FITS in the search space{fully}.", style="bold red"))
        near = sorted(result.rejections, key=lambda r: r.over_bytes)[:3]
        for r in near:
            parts.append(Text(f"  nearest: {r.name}: {r.budget} {gib(r.over_bytes)} over", style="red"))
        if result.tight:
            parts.append(tight_line(result.tight, result.margin))
        if result.unknown:
            parts.append(unknown_line(result.unknown))
    else:
        parts += [candidates_table(result.candidates, top), Text("")]
        wl = chosen.workload
        parts.append(Text(f"chosen: {chosen.name}  (micro-batch {wl.micro_batch} x accumulation {wl.grad_accum})",
                          style="bold green"))
        parts.append(estimate_view(chosen.estimate, "its estimate"))
        parts.append(speed_table(chosen.speed))
        if result.tight:
            parts.append(tight_line(result.tight, result.margin))
        if result.unknown:
            parts.append(unknown_line(result.unknown))
    if fixes:
        head = "to get the request as asked:" if chosen is not None else "what would make it fit:"
        parts.append(Text(head, style="bold"))
        parts += [_fix_line(f) for f in fixes]
    if files:
        written = [f.name for f in files if f.text is not None]
        parts.append(Text(f"wrote {out}/: {', '.join(written)}", style="bold"))
        parts += [Text(f"  no {f.name}: {f.skipped}", style="dim") for f in files if f.text is None]
    parts += [Text(f"note: {n}", style="dim") for n in notes]
    return RichGroup(*parts)


def unknown_line(unknown: list[Any]) -> Text:
    """One line for the setups left UNKNOWN: how many, the first tried (the least relaxed), and what
    their estimates leave out."""
    least = unknown[0]
    missing = "; ".join(dict.fromkeys(m for u in unknown for m in u.unmodeled))
    return Text(f"UNKNOWN, not ranked: {len(unknown)} setups fit on their modelled part alone (e.g. {least.name}, "
                f"whose modelled part takes {gib(least.gpu_bytes)} per GPU and {gib(least.host_bytes)} host), but "
                f"their estimates leave out: {missing}", style="yellow")


def tight_line(tight: list[Any], margin: float) -> Text:
    """One line for the setups left TIGHT: how many, the first tried, and its band against the
    usable memory. Never chosen: the high end of their band is over."""
    first = tight[0]
    return Text(f"TIGHT, not chosen: {len(tight)} setups fit at the expected figure but not at the high end of "
                f"the band with the {margin:.0%} margin (e.g. {first.name}: per GPU {gib(first.gpu.expected)} "
                f"expected, {gib(first.gpu.high)} high, of {gib(first.gpu_usable_bytes)} usable). They may run; "
                "memplan does not promise it.", style="yellow")


def tight_json(t: Any) -> dict[str, Any]:
    """One TIGHT setup in ``memplan tune --json``."""
    return {"name": t.name, "fits": None, "verdict": Verdict.TIGHT.value, "per_gpu_band": band_json(t.gpu),
            "host_band": band_json(t.host), "per_gpu_usable_bytes": t.gpu_usable_bytes,
            "host_usable_bytes": t.host_usable_bytes}


def unknown_json(u: Any) -> dict[str, Any]:
    """One UNKNOWN setup in ``memplan tune --json``."""
    return {"name": u.name, "fits": None, "verdict": Verdict.UNKNOWN.value, "unmodeled": list(u.unmodeled),
            "per_gpu_bytes": u.gpu_bytes, "host_bytes": u.host_bytes}


def candidate_json(c: Any) -> dict[str, Any]:
    """One candidate in ``memplan tune --json``."""
    return {
        "name": c.name,
        "settings": {"options": c.options.model_dump(mode="json"), "workload": c.workload.model_dump(mode="json")},
        "per_gpu_bytes": c.estimate.per_gpu.total_bytes,
        "host_bytes": c.estimate.host.total_bytes,
        "per_gpu_band": band_json(c.estimate.per_gpu.band),
        "host_band": band_json(c.estimate.host.band),
        "nvme_bytes": c.estimate.nvme_bytes,
        "tokens_per_s": c.speed.tokens_per_s,
        "step_seconds": dict(c.speed.terms),
        "gives_up": [g.model_dump() for g in c.gives_up],
    }


def tune_json(result: Any, fixes: list[Any], files: list[Any], out: Any, seconds: float,
              notes: list[str]) -> dict[str, Any]:
    """The ``memplan tune --json`` document (keys in docs/tune.md)."""
    chosen = result.chosen
    doc: dict[str, Any] = {
        "candidates": [candidate_json(c) for c in result.candidates],
        "chosen": None,
        "tight": [tight_json(x) for x in result.tight],
        "unknown": [unknown_json(u) for u in result.unknown],
        "fixes": [{"change": f.change, "candidate": candidate_json(f.candidate)} for f in fixes],
        "evaluated": result.evaluated,
        "rejected": summarize_rejections(result.rejections),
        "global_batch": result.global_batch,
        "margin": result.margin,
        "seconds": seconds,
        "notes": notes,
    }
    if chosen is not None:
        doc["chosen"] = candidate_json(chosen) | {
            "estimate": estimate_json(chosen.estimate),
            "out": str(out),
            "files": [f.name for f in files if f.text is not None],
            "skipped": {f.name: f.skipped for f in files if f.text is None},
        }
    return doc
