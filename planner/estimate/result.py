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


class Verdict(StrEnum):
    """What an estimate says about fitting. ``UNKNOWN``: nothing is over on the modelled part,
    but the ledger leaves something out (`Estimate.unmodeled`), so the total is a lower bound."""

    FITS = "FITS"
    DOES_NOT_FIT = "DOES NOT FIT"
    UNKNOWN = "UNKNOWN"


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
    """

    capacity_bytes: int
    by_category: dict[Category, int]
    peak_phase: Phase = Phase.OPTIMIZER
    phase_totals: dict[Phase, int] = field(default_factory=dict)
    phase_categories: dict[Phase, dict[Category, int]] = field(default_factory=dict)
    lower_bound: bool = False

    @property
    def total_bytes(self) -> int:
        """Sum over categories at the peak, bytes."""
        return sum(self.by_category.values())

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
        """Whether the total is beyond capacity (certain even for a lower bound)."""
        return self.total_bytes > self.capacity_bytes

    @property
    def fits(self) -> bool | None:
        """True within capacity, False over it, None when a lower bound is within it (unknown)."""
        if self.over:
            return False
        return None if self.lower_bound else True


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
    """

    per_gpu: Budget
    host: Budget
    nvme_bytes: int
    groups: tuple[GroupRow, ...]
    binding: str
    notes: tuple[str, ...] = field(default=())
    unmodeled: tuple[str, ...] = field(default=())

    @property
    def fits(self) -> bool | None:
        """True when everything is modelled and both budgets hold; False when a budget is over on
        its modelled part alone (a lower bound over is certain); None otherwise (unknown)."""
        if self.per_gpu.over or self.host.over:
            return False
        return None if self.unmodeled else True

    @property
    def verdict(self) -> Verdict:
        """`fits` in words: FITS, DOES NOT FIT or UNKNOWN."""
        return {True: Verdict.FITS, False: Verdict.DOES_NOT_FIT, None: Verdict.UNKNOWN}[self.fits]


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
    per_gpu = Budget(gpu_capacity, {c: sum(r.gpu[c] for r in rows) for c in Category}, gpu_peak, gpu_totals,
                     _by_phase(gpu_items, 1), Place.GPU in gaps)
    host = Budget(host_capacity, {c: sum(r.host[c] for r in rows) for c in Category}, host_peak, host_totals,
                  _by_phase(host_items, gpus_per_node), Place.HOST in gaps)
    binding = "gpu" if per_gpu.free_bytes / per_gpu.capacity_bytes <= host.free_bytes / host.capacity_bytes else "host"
    return Estimate(per_gpu, host, nvme, rows, binding, tuple(notes), tuple(dict.fromkeys(u.text for u in unmodeled)))
