"""Rendering: estimates and profiles as rich tables, bars and JSON. Only here do bytes become GiB.

The edge of the flow, with `cli`. Nothing here computes memory.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.console import Group as RichGroup
from rich.table import Table
from rich.text import Text

from planner.estimate.result import Budget, Category, Estimate, Verdict
from planner.search.search import summarize_rejections
from planner.units import GIB, format_bytes

# One colour per category, shared by table headers and bars.
_COLORS = {
    Category.WEIGHTS: "cyan",
    Category.GRADIENTS: "magenta",
    Category.MASTER_WEIGHTS: "yellow",
    Category.OPTIMIZER_STATES: "green",
    Category.ACTIVATIONS: "red",
    Category.TEMPORARIES: "bright_red",
    Category.BUFFERS: "blue",
    Category.OVERHEAD: "white",
}
_LABELS = {
    Category.WEIGHTS: "weights",
    Category.GRADIENTS: "grads",
    Category.MASTER_WEIGHTS: "master",
    Category.OPTIMIZER_STATES: "optim",
    Category.ACTIVATIONS: "activ",
    Category.TEMPORARIES: "temps",
    Category.BUFFERS: "buffers",
    Category.OVERHEAD: "overhead",
}


gib = format_bytes
"""Bytes as GiB with two decimals (MiB below 1 GiB): `units.format_bytes`."""


def count(n: int) -> str:
    """A parameter count: 7.61B, 68.6M, 1,152."""
    if n >= 10**9:
        return f"{n / 1e9:.2f}B"
    if n >= 10**6:
        return f"{n / 1e6:.1f}M"
    return f"{n:,}"


def _gib_cell(nbytes: int) -> str:
    """A table cell in GiB (the unit is in the title): ``-`` for nothing, ``<0.01`` for crumbs."""
    if nbytes == 0:
        return "-"
    if nbytes < GIB // 100:
        return "<0.01"
    return f"{nbytes / GIB:.2f}"


def group_table(est: Estimate, title: str, place: str) -> Table:
    """Layer groups x categories for one budget (``"gpu"``: the most loaded GPU; ``"host"``:
    one node's RAM), in GiB."""
    budget = est.per_gpu if place == "gpu" else est.host
    table = Table(title=title, title_justify="left", show_footer=True, pad_edge=False)
    table.add_column("group", footer="total")
    table.add_column("params", justify="right", footer=count(sum(r.params for r in est.groups)))
    table.add_column("trained", justify="right", footer=count(sum(r.trainable_params for r in est.groups)))
    shown = [c for c in Category if budget.by_category[c]] or [Category.WEIGHTS]  # empty columns hidden
    for c in shown:
        table.add_column(_LABELS[c], justify="right", style=_COLORS[c], footer=_gib_cell(budget.by_category[c]))
    table.add_column("total", justify="right", style="bold", footer=_gib_cell(budget.total_bytes))
    for r in est.groups:
        cells = r.gpu if place == "gpu" else r.host
        if not r.params and not any(cells.values()):
            continue  # a pseudo-row (padding, engine) with nothing in this budget
        table.add_row(
            r.name,
            count(r.params) if r.params else "",
            count(r.trainable_params) if r.trainable_params else "-",
            *(_gib_cell(cells[c]) for c in shown),
            _gib_cell(sum(cells.values())),
        )
    return table


def bar(label: str, budget: Budget, width: int = 50) -> Text:
    """A stacked bar of each category's share of a budget's capacity, then the totals."""
    text = Text(f"{label:<10}")
    cap = max(budget.capacity_bytes, 1)
    scale = max(cap, budget.total_bytes)
    used = 0
    for c in Category:
        cells = round(budget.by_category[c] / scale * width)
        text.append("█" * cells, style=_COLORS[c])
        used += cells
    cap_cell = round(cap / scale * width)
    if used < cap_cell:
        text.append("·" * (cap_cell - used), style="dim")
    if budget.total_bytes > cap:
        text.append("│", style="bold red")
    pct = budget.total_bytes / cap * 100
    style = "red" if budget.over else "yellow" if budget.lower_bound else "green"
    text.append(f"  {needs(budget)} / {gib(budget.capacity_bytes)} ({pct:.0f}%)", style=style)
    return text


def needs(budget: Budget) -> str:
    """A budget's total, ``at least`` where it is a lower bound (some bytes are not modelled)."""
    return f"{'at least ' if budget.lower_bound else ''}{gib(budget.total_bytes)}"


def legend() -> Text:
    """Colour key of the bars."""
    text = Text(" " * 10)
    for c in Category:
        text.append("█ ", style=_COLORS[c])
        text.append(f"{c.value}  ")
    return text


def verdict(est: Estimate) -> Text:
    """One line: FITS, DOES NOT FIT or UNKNOWN, with the binding budget and its margin (FITS),
    the budgets over (DOES NOT FIT) or the modelled part as a lower bound (UNKNOWN)."""
    budget = est.per_gpu if est.binding == "gpu" else est.host
    where = "per GPU" if est.binding == "gpu" else "host RAM per node"
    if est.verdict is Verdict.UNKNOWN:
        parts = ", ".join(f"{name} needs {needs(b)} of {gib(b.capacity_bytes)}"
                          for name, b in (("per GPU", est.per_gpu), ("host RAM per node", est.host)))
        return Text(f"UNKNOWN: {parts}; what is not modelled (above) may or may not fit in the rest.",
                    style="bold yellow")
    if est.verdict is Verdict.FITS:
        return Text(
            f"FITS: {where} is the binding budget, {gib(budget.free_bytes)} left "
            f"({budget.free_bytes / budget.capacity_bytes:.0%} of {gib(budget.capacity_bytes)}).",
            style="bold green",
        )
    over = [(name, b) for name, b in (("per GPU", est.per_gpu), ("host RAM per node", est.host)) if b.over]
    parts = ", ".join(
        f"{name} needs {needs(b)} of {gib(b.capacity_bytes)} ({gib(-b.free_bytes)} over)" for name, b in over
    )
    alone = " on the modelled part alone" if est.unmodeled else ""
    return Text(f"DOES NOT FIT{alone}: {parts}; binding: {where}.", style="bold red")


def unmodeled_lines(est: Estimate) -> list[Text]:
    """What the estimate leaves out, one line each."""
    return [Text(f"not modelled: {u}", style="yellow") for u in est.unmodeled]


def estimate_view(est: Estimate, title: str) -> RichGroup:
    """The whole `memplan estimate` screen."""
    lower = " (a lower bound)"
    gpu_title = (f"per GPU (most loaded rank) at the {est.per_gpu.peak_phase} peak, GiB"
                 f"{lower if est.per_gpu.lower_bound else ''}")
    parts: list[Any] = [Text(title, style="bold"), group_table(est, gpu_title, "gpu")]
    if est.host.total_bytes:
        host_title = (f"host RAM per node (all its ranks) at the {est.host.peak_phase} peak, GiB"
                      f"{lower if est.host.lower_bound else ''}")
        parts.append(group_table(est, host_title, "host"))
    parts += [Text(""), bar("per GPU", est.per_gpu), bar("host", est.host), legend()]
    if est.nvme_bytes:
        parts.append(Text(f"NVMe per node: {gib(est.nvme_bytes)}"))
    for note in est.notes:
        parts.append(Text(f"note: {note}", style="dim"))
    parts += unmodeled_lines(est)
    parts += [Text(""), verdict(est)]
    return RichGroup(*parts)


def _budget_json(b: Budget) -> dict[str, Any]:
    return {
        "total_bytes": b.total_bytes,
        "capacity_bytes": b.capacity_bytes,
        "tensor_bytes": b.tensor_bytes,
        "overhead_bytes": b.overhead_bytes,
        "peak_phase": b.peak_phase.value,
        "phase_totals": {ph.value: v for ph, v in b.phase_totals.items()},
        "by_phase": {ph.value: {c.value: v for c, v in cats.items()} for ph, cats in b.phase_categories.items()},
        "by_category": {c.value: v for c, v in b.by_category.items()},
        "lower_bound": b.lower_bound,
    }


def estimate_json(est: Estimate, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``--json`` document of an estimate (keys documented in docs/cli.md)."""
    doc: dict[str, Any] = dict(extra or {})
    doc.update(
        per_gpu=_budget_json(est.per_gpu),
        host=_budget_json(est.host) | {"nvme_bytes": est.nvme_bytes},
        groups=[
            {
                "name": r.name,
                "params": r.params,
                "trainable_params": r.trainable_params,
                "by_category": {c.value: v for c, v in r.gpu.items()},
                "host_by_category": {c.value: v for c, v in r.host.items()},
            }
            for r in est.groups
        ],
        fits=est.fits,
        verdict=est.verdict.value,
        unmodeled=list(est.unmodeled),
        binding=est.binding,
        notes=list(est.notes),
    )
    return doc


def console() -> Console:
    """The console all commands print to."""
    return Console(highlight=False)


def _err(e: float | None) -> str:
    return "" if e is None else f"{e:+.1%}"


def trace_view(report: Any) -> RichGroup:
    """`memplan trace`: the estimate beside the traced step."""
    req = report.request
    title = (f"{report.model} ({report.group}), {req['precision']}, {req['optimizer']}, attn {req['attn']}, "
             f"ckpt {'on' if req['grad_ckpt'] else 'off'}, {req['micro_batch']} x {req['seq_len']} tokens, "
             f"traced on fake {req['device']} in {report.seconds:.0f} s")
    table = Table(title="at each one's peak, GiB", title_justify="left")
    for col, just in (("", "left"), ("estimate", "right"), ("traced", "right"), ("error", "right")):
        table.add_column(col, justify=just)
    for r in (*report.at_peak, report.peak):
        table.add_row(r.label, _gib_cell(r.estimate), _gib_cell(r.traced), _err(r.error))
    table.add_row("peak phase", report.peak_phase[0], report.peak_phase[1], "")
    phases = Table(title="peak of each phase, GiB", title_justify="left")
    for col in ("phase", "estimate", "traced", "error"):
        phases.add_column(col, justify="left" if col == "phase" else "right")
    for r in report.phases:
        phases.add_row(r.label, _gib_cell(r.estimate), _gib_cell(r.traced), _err(r.error))
    modules = Table(title="traced peak while each module ran (largest 8), GiB", title_justify="left")
    modules.add_column("module")
    modules.add_column("peak", justify="right")
    for name, nbytes in sorted(report.modules.items(), key=lambda kv: -kv[1])[:8]:
        modules.add_row(name, _gib_cell(nbytes))
    parts: list[Any] = [Text(title, style="bold"), table, phases, modules]
    parts += [Text(f"note: {n}", style="dim") for n in report.notes]
    return RichGroup(*parts)


# --- memplan tune ---------------------------------------------------------------------------------


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
    for col in ("batch", "ctx", "GPU GiB", "host GiB", "tok/s"):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("gives up", ratio=2)
    for i, c in enumerate(candidates[:top], 1):
        o, w = c.options, c.workload
        setup = Text(f"{_how(c)}\n{o.precision.value} {o.optimizer.value} ckpt {'on' if o.grad_ckpt else 'off'}"
                     f" {_trains(c)}")
        ctx = f"{w.seq_len}" + (f"/{w.max_slice_nums}sl" if w.images else "")
        table.add_row(str(i), setup, f"{w.micro_batch}x{w.grad_accum}", ctx,
                      f"{c.estimate.per_gpu.total_bytes / GIB:.2f}", f"{c.estimate.host.total_bytes / GIB:.2f}",
                      f"{c.speed.tokens_per_s:,.0f}", Text(_gives(c)), style="bold" if i == 1 else None)
    return table


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
                             f"global batch {result.global_batch}, margin {result.margin:.0%}", style="dim")]
    chosen = result.chosen
    if chosen is None:
        fully = " that memplan models fully" if result.unknown else ""
        parts.append(Text(f"NOTHING FITS in the search space{fully}.", style="bold red"))
        near = sorted(result.rejections, key=lambda r: r.over_bytes)[:3]
        for r in near:
            parts.append(Text(f"  nearest: {r.name}: {r.budget} {gib(r.over_bytes)} over", style="red"))
        if result.unknown:
            parts.append(unknown_line(result.unknown))
    else:
        parts += [candidates_table(result.candidates, top), Text("")]
        wl = chosen.workload
        parts.append(Text(f"chosen: {chosen.name}  (micro-batch {wl.micro_batch} x accumulation {wl.grad_accum})",
                          style="bold green"))
        parts.append(estimate_view(chosen.estimate, "its estimate"))
        parts.append(speed_table(chosen.speed))
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
