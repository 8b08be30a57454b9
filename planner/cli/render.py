"""Rendering: estimates and profiles as rich tables, bars and JSON. Only here do bytes become GiB.

The edge of the flow, with `cli`. Nothing here computes memory.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.console import Group as RichGroup
from rich.table import Table
from rich.text import Text

from planner.estimate.result import Band, Budget, Category, Estimate, Verdict
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
    band = budget.band
    if band.low != band.high:  # the total row carries the band: expected, then its low and high ends
        table.columns[0].footer = "total\n  low\n  high"
        total_footer = "\n".join(_gib_cell(v) for v in (band.expected, band.low, band.high))
    else:
        total_footer = _gib_cell(budget.total_bytes)
    table.add_column("total", justify="right", style="bold", footer=total_footer)
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


BAR_LINE = 80
"""Columns a bar line takes, label and figures included."""


def bar(label: str, budget: Budget, width: int | None = None) -> Text:
    """A stacked bar of each category's share of a budget's capacity at the expected figure, a
    shaded run from there to the band's high end, then the figures: expected (low-high) of the
    capacity. Fits `BAR_LINE` columns unless ``width`` is given."""
    band = budget.band
    cap = max(budget.capacity_bytes, 1)
    figures = f"  {needs(budget)}{_range(band)} / {gib(budget.capacity_bytes)} ({band.expected / cap:.0%})"
    width = width or max(20, BAR_LINE - 10 - len(figures))
    scale = max(cap, band.high)
    text = Text(f"{label:<10}")
    used = 0
    for c in Category:
        cells = round(budget.by_category[c] / scale * width)
        text.append("█" * cells, style=_COLORS[c])
        used += cells
    high_cell = max(used, round(band.high / scale * width))
    text.append("▒" * (high_cell - used), style=_VERDICT_STYLE[budget.verdict])
    cap_cell = round(cap / scale * width)
    if high_cell < cap_cell:
        text.append("·" * (cap_cell - high_cell), style="dim")
    elif band.high > cap:
        text.append("│", style="bold red")
    text.append(figures, style=_VERDICT_STYLE[budget.verdict])
    return text


_VERDICT_STYLE = {Verdict.FITS: "green", Verdict.TIGHT: "yellow", Verdict.UNKNOWN: "yellow",
                  Verdict.DOES_NOT_FIT: "red"}


def _range(band: Band) -> str:
    """`` (low-high)`` in GiB, or nothing for an exact figure."""
    if band.low == band.high:
        return ""
    return f" ({band.low / GIB:.2f}-{band.high / GIB:.2f})"


def needs(budget: Budget) -> str:
    """A budget's expected total, ``at least`` where it is a lower bound (some bytes are not
    modelled)."""
    return f"{'at least ' if budget.lower_bound else ''}{gib(budget.total_bytes)}"


def figures_table(est: Estimate) -> Table | None:
    """The most loaded GPU's three figures as a user meets them, low / expected / high, GiB."""
    f = est.gpu_figures
    if f is None:
        return None
    bound = " (lower bounds)" if est.per_gpu.lower_bound else ""
    table = Table(title=f"per GPU as you will see it, GiB{bound}", title_justify="left", pad_edge=False)
    table.add_column("figure")
    for col in ("low", "expected", "high"):
        table.add_column(col, justify="right")
    rows = (("torch.cuda.max_memory_allocated()", f.allocated), ("torch.cuda.max_memory_reserved()", f.reserved),
            ("nvidia-smi (this process)", f.device))
    for name, band in rows:
        table.add_row(name, *(f"{v / GIB:.2f}" for v in (band.low, band.expected, band.high)))
    return table


def legend() -> Text:
    """Colour key of the bars, in one line of 80 columns."""
    text = Text()
    for c in Category:
        text.append("█", style=_COLORS[c])
        text.append(f" {_LABELS[c]} ")
    text.append("▒", style="yellow")
    text.append(" band")
    return text


def verdict(est: Estimate) -> Text:
    """One line: FITS (the binding budget and its room at the high end), TIGHT (the budgets whose
    high end is over), DOES NOT FIT (the budgets over at the expected figure) or UNKNOWN (the
    modelled part as a lower bound)."""
    named = (("per GPU", est.per_gpu), ("host RAM per node", est.host))
    budget = est.per_gpu if est.binding == "gpu" else est.host
    where = "per GPU" if est.binding == "gpu" else "host RAM per node"
    if est.verdict is Verdict.UNKNOWN:
        parts = ", ".join(f"{name} needs {needs(b)} of {gib(b.capacity_bytes)}" for name, b in named)
        return Text(f"UNKNOWN: {parts}; what is not modelled (above) may or may not fit in the rest.",
                    style="bold yellow")
    if est.verdict is Verdict.FITS:
        room = budget.capacity_bytes - budget.band.high
        return Text(
            f"FITS: {where} is the binding budget, {gib(room)} left at the high end of its band "
            f"({room / budget.capacity_bytes:.0%} of {gib(budget.capacity_bytes)}).",
            style="bold green",
        )
    if est.verdict is Verdict.TIGHT:
        tight = [(n, b) for n, b in named if b.band.verdict(b.capacity_bytes) is Verdict.TIGHT]
        parts = ", ".join(f"{n} expects {gib(b.total_bytes)} of {gib(b.capacity_bytes)} but may reach "
                          f"{gib(b.band.high)} ({gib(b.band.high - b.capacity_bytes)} over)" for n, b in tight)
        return Text(f"TIGHT: {parts}; fragmentation and workspaces decide (docs/runtime.md). Leave room: "
                    "a smaller micro-batch, or memplan tune.", style="bold yellow")
    over = [(name, b) for name, b in named if b.over]
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
    figures = figures_table(est)
    parts += [figures] if figures is not None else []
    parts += [Text(""), bar("per GPU", est.per_gpu), bar("host", est.host), legend()]
    if est.runtime:
        parts.append(Text(f"runtime constants: {est.runtime}", style="dim"))
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
        "band": band_json(b.band),
        "verdict": b.verdict.value,
    }


def band_json(band: Band) -> dict[str, int]:
    """A band in ``--json``: its three points, bytes."""
    return {"low_bytes": band.low, "expected_bytes": band.expected, "high_bytes": band.high}


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
        gpu_figures=None if est.gpu_figures is None else {
            "allocated": band_json(est.gpu_figures.allocated),
            "reserved": band_json(est.gpu_figures.reserved),
            "nvidia_smi": band_json(est.gpu_figures.device),
        },
        runtime=est.runtime,
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
