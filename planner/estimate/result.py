"""The estimate as a table: layer groups x categories, in bytes, per GPU and per host, at the
phase of the step where each budget peaks.

No arithmetic about models lives here, only the shape of the answer and how its rows add up.
GiB appear only in `planner.cli.render`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum

from planner.estimate.band import Band as Band  # re-exported: estimates carry these types
from planner.estimate.band import GpuFigures as GpuFigures
from planner.estimate.band import Verdict as Verdict


class Category(StrEnum):
    """What a byte is for. Order is the order of the table's columns."""

    WEIGHTS = "weights"
    GRADIENTS = "gradients"
    MASTER_WEIGHTS = "master_weights"
    OPTIMIZER_STATES = "optimizer_states"
    ACTIVATIONS = "activations"  # saved for backward (and the forward's live outputs)
    TEMPORARIES = "temporaries"  # alive only inside one op or one phase
    BUFFERS = "buffers"  # engine buffers: gradient buckets, gathered ZeRO-3 params, offload staging
    OVERHEAD = "overhead"  # not tensors: CUDA context, library workspaces, allocator reserve, process


TENSOR_CATEGORIES = tuple(c for c in Category if c is not Category.OVERHEAD)


class Place(StrEnum):
    """Where a byte lives."""

    GPU = "gpu"
    HOST = "host"
    NVME = "nvme"


class Phase(StrEnum):
    """Where in the run a byte is alive. The peak is the largest phase, not the sum."""

    LOAD = "load"  # building the model and loading its weights, before training
    FORWARD = "forward"
    BACKWARD = "backward"
    OPTIMIZER = "optimizer"


STEP = frozenset({Phase.FORWARD, Phase.BACKWARD, Phase.OPTIMIZER})
ALWAYS = frozenset(Phase)
FROM_BACKWARD = frozenset({Phase.BACKWARD, Phase.OPTIMIZER})

PADDING_ROW = "(zero padding)"
"""Pseudo-group for DeepSpeed's alignment padding of flat ZeRO-1/2 buffers."""
ENGINE_ROW = "(engine)"
"""Pseudo-group for buffers that belong to the engine, not to a layer group."""
RUNTIME_ROW = "(runtime)"
"""Pseudo-group for overhead that is not tensors."""


@dataclass(frozen=True, slots=True)
class Unmodeled:
    """Bytes that a step holds and the ledger does not count.

    Attributes:
        text: one short phrase: which group, what is not modelled and why (``"activations of
            llm (model_type 'gpt2'): no activation model"``).
        place: the budget those bytes would be in.
    """

    text: str
    place: Place = Place.GPU


@dataclass(frozen=True, slots=True)
class Item:
    """Bytes one rank holds for one group, category and place, during some phases."""

    group: str
    category: Category
    place: Place
    nbytes: int
    phases: frozenset[Phase] = ALWAYS
    worst_nbytes: int | None = None
    """Where the size depends on the data (e.g. tokens routed to one expert): the most it can
    take, bytes; it counts in the high end of the band. None: ``nbytes`` is exact."""


@dataclass(frozen=True)
class Budget:
    """One memory budget (a GPU, or a node's host RAM) at its peak phase.

    Attributes:
        capacity_bytes: what the budget holds, bytes.
        by_category: bytes per category at the peak.
        peak_phase: the phase where the total is largest.
        phase_totals: the total of every phase, bytes.
        phase_categories: bytes per category at every phase.
        lower_bound: some bytes of this budget are not modelled (`Estimate.unmodeled`): every
            figure is the modelled part, a lower bound of the real one.
        spread: how far the band reaches below and above the total, bytes: (expected - low,
            high - expected). (0, 0): the total is exact.
    """

    capacity_bytes: int
    by_category: dict[Category, int]
    peak_phase: Phase = Phase.OPTIMIZER
    phase_totals: dict[Phase, int] = field(default_factory=dict)
    phase_categories: dict[Phase, dict[Category, int]] = field(default_factory=dict)
    lower_bound: bool = False
    spread: tuple[int, int] = (0, 0)

    @property
    def total_bytes(self) -> int:
        """Sum over categories at the peak, bytes: the band's expected figure."""
        return sum(self.by_category.values())

    @property
    def band(self) -> Band:
        """Low, expected and high of the total at the peak, bytes."""
        total = self.total_bytes
        return Band(total - self.spread[0], total, total + self.spread[1])

    @property
    def overhead_bytes(self) -> int:
        """The part of the total that is not tensors."""
        return self.by_category.get(Category.OVERHEAD, 0)

    @property
    def tensor_bytes(self) -> int:
        """Tensors alive at the peak."""
        return self.total_bytes - self.overhead_bytes

    @property
    def free_bytes(self) -> int:
        """Capacity minus total; negative when over."""
        return self.capacity_bytes - self.total_bytes

    @property
    def over(self) -> bool:
        """Whether the expected total is beyond capacity (for a lower bound: already on the
        modelled part)."""
        return self.total_bytes > self.capacity_bytes

    @property
    def verdict(self) -> Verdict:
        """DOES NOT FIT when over at the expected figure; UNKNOWN when a lower bound is not; else
        FITS or TIGHT from the band's high end."""
        if self.over:
            return Verdict.DOES_NOT_FIT
        if self.lower_bound:
            return Verdict.UNKNOWN
        return self.band.verdict(self.capacity_bytes)

    @property
    def fits(self) -> bool | None:
        """True when the high end fits, False over at the expected figure, None otherwise (TIGHT,
        or UNKNOWN for a lower bound)."""
        return {Verdict.FITS: True, Verdict.DOES_NOT_FIT: False}.get(self.verdict)


@dataclass(frozen=True)
class GroupRow:
    """One layer group's parameters and its share of each budget at that budget's peak."""

    name: str
    params: int
    trainable_params: int
    gpu: dict[Category, int]
    host: dict[Category, int]


@dataclass(frozen=True)
class Estimate:
    """The answer: per-GPU and host budgets, the group table, the verdict.

    Attributes:
        per_gpu: the most loaded rank's GPU.
        host: one node's host RAM (all its ranks together).
        nvme_bytes: bytes offloaded to NVMe per node.
        groups: the table's rows, in model order (pseudo-rows last).
        binding: ``"gpu"`` or ``"host"``: the budget with the least room left (relative).
        notes: facts the user should read with the numbers (assumptions, resolved defaults).
        unmodeled: what the step holds that the ledger does not count, one phrase each; where
            there is any, the budgets it would be in are lower bounds (`Budget.lower_bound`).
        gpu_figures: the most loaded GPU's allocated, reserved and nvidia-smi figures, each a
            band; ``device`` is ``per_gpu.band``.
        runtime: where the runtime constants come from (the sourced defaults, or a calibration
            profile: "memplan calibrate on rtx3090, 2026-12-05").
    """

    per_gpu: Budget
    host: Budget
    nvme_bytes: int
    groups: tuple[GroupRow, ...]
    binding: str
    notes: tuple[str, ...] = field(default=())
    unmodeled: tuple[str, ...] = field(default=())
    gpu_figures: GpuFigures | None = None
    runtime: str = ""

    @property
    def verdict(self) -> Verdict:
        """DOES NOT FIT when a budget's expected figure is over (on the modelled part alone where
        something is not modelled); else UNKNOWN when something is not modelled; else TIGHT when
        a budget's high end is over; else FITS."""
        budgets = (self.per_gpu, self.host)
        if any(b.over for b in budgets):
            return Verdict.DOES_NOT_FIT
        if self.unmodeled:
            return Verdict.UNKNOWN
        if any(b.band.verdict(b.capacity_bytes) is Verdict.TIGHT for b in budgets):
            return Verdict.TIGHT
        return Verdict.FITS

    @property
    def fits(self) -> bool | None:
        """True: FITS (every budget's high end holds); False: DOES NOT FIT; None: TIGHT or
        UNKNOWN (read `verdict`)."""
        return {Verdict.FITS: True, Verdict.DOES_NOT_FIT: False}.get(self.verdict)


def _zero() -> dict[Category, int]:
    return {c: 0 for c in Category}


def _by_phase(items: list[Item], scale: int) -> dict[Phase, dict[Category, int]]:
    out = {ph: _zero() for ph in Phase}
    for it in items:
        for ph in it.phases:
            out[ph][it.category] += it.nbytes * scale
    return out


def _peak(items: list[Item], scale: int) -> tuple[Phase, dict[Phase, int]]:
    totals = {ph: sum(it.nbytes for it in items if ph in it.phases) * scale for ph in Phase}
    # Ties go to the later phase of the step (the optimizer step holds everything so far).
    order = [Phase.LOAD, Phase.FORWARD, Phase.BACKWARD, Phase.OPTIMIZER]
    peak = max(order, key=lambda ph: (totals[ph], order.index(ph)))
    return peak, totals


def assemble(
    items: Iterable[Item],
    group_params: dict[str, tuple[int, int]],
    gpus_per_node: int,
    gpu_capacity: int,
    host_capacity: int,
    notes: Iterable[str] = (),
    unmodeled: Iterable[Unmodeled] = (),
    spreads: Spreads | None = None,
) -> Estimate:
    """Sum one rank's items into the per-GPU budget, a node's host budget and the group rows,
    each at its own peak phase. Host bytes are per rank in ``items`` and multiplied by the ranks
    on a node.

    Args:
        items: what the most loaded rank holds, with the phases each is alive in.
        group_params: group name -> (params, trainable params), in model order.
        gpus_per_node: ranks per node.
        gpu_capacity: bytes per GPU.
        host_capacity: host RAM per node, bytes.
        notes: notes to carry.
        unmodeled: what the items leave out; the budgets of its places become lower bounds.
        spreads: the bands around the totals and the GPU's three figures (`Spreads`); None:
            every total is exact.
    """
    items = list(items)
    unmodeled = list(unmodeled)
    gaps = {u.place for u in unmodeled}
    gpu_items = [it for it in items if it.place is Place.GPU]
    host_items = [it for it in items if it.place is Place.HOST]
    nvme = sum(it.nbytes for it in items if it.place is Place.NVME) * gpus_per_node
    gpu_peak, gpu_totals = _peak(gpu_items, 1)
    host_peak, host_totals = _peak(host_items, gpus_per_node)
    gpu_rows: dict[str, dict[Category, int]] = defaultdict(_zero)
    host_rows: dict[str, dict[Category, int]] = defaultdict(_zero)
    for it in gpu_items:
        if gpu_peak in it.phases:
            gpu_rows[it.group][it.category] += it.nbytes
    for it in host_items:
        if host_peak in it.phases:
            host_rows[it.group][it.category] += it.nbytes * gpus_per_node
    names = list(group_params)
    names += [r for r in (PADDING_ROW, ENGINE_ROW, RUNTIME_ROW) if r in gpu_rows or r in host_rows]
    rows = tuple(
        GroupRow(n, *group_params.get(n, (0, 0)), dict(gpu_rows.get(n) or _zero()), dict(host_rows.get(n) or _zero()))
        for n in names
    )
    spreads = spreads or Spreads()
    per_gpu = Budget(gpu_capacity, {c: sum(r.gpu[c] for r in rows) for c in Category}, gpu_peak, gpu_totals,
                     _by_phase(gpu_items, 1), Place.GPU in gaps, spreads.gpu)
    host = Budget(host_capacity, {c: sum(r.host[c] for r in rows) for c in Category}, host_peak, host_totals,
                  _by_phase(host_items, gpus_per_node), Place.HOST in gaps,
                  (spreads.host[0] * gpus_per_node, spreads.host[1] * gpus_per_node))
    binding = "gpu" if per_gpu.free_bytes / per_gpu.capacity_bytes <= host.free_bytes / host.capacity_bytes else "host"
    return Estimate(per_gpu, host, nvme, rows, binding, tuple(notes), tuple(dict.fromkeys(u.text for u in unmodeled)),
                    spreads.figures, spreads.runtime)


@dataclass(frozen=True)
class Spreads:
    """What the runtime model adds to the ledger's totals for `assemble`.

    Attributes:
        gpu: (expected - low, high - expected) of the GPU total, bytes.
        host: the same for one rank's host bytes (times the ranks on a node in the budget).
        figures: the GPU's allocated, reserved and nvidia-smi bands.
        runtime: where the runtime constants come from, named in the output.
    """

    gpu: tuple[int, int] = (0, 0)
    host: tuple[int, int] = (0, 0)
    figures: GpuFigures | None = None
    runtime: str = ""
