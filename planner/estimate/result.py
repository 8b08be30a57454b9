"""The estimate as a table: layer groups x categories, in bytes, per GPU and per host.

No arithmetic about models lives here, only the shape of the answer and how its rows add up.
GiB appear only in `planner.render`.
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
    BUFFERS = "buffers"  # engine buffers: gradient buckets, offload staging and temp buffers


class Place(StrEnum):
    """Where a byte lives."""

    GPU = "gpu"
    HOST = "host"
    NVME = "nvme"


PADDING_ROW = "(zero padding)"
"""Pseudo-group for DeepSpeed's alignment padding of flat ZeRO-1/2 buffers."""
ENGINE_ROW = "(engine)"
"""Pseudo-group for buffers that belong to the engine, not to a layer group."""


@dataclass(frozen=True, slots=True)
class Item:
    """Bytes one rank holds for one group, category and place."""

    group: str
    category: Category
    place: Place
    nbytes: int


@dataclass(frozen=True)
class Budget:
    """One memory budget (a GPU, or a node's host RAM) and what fills it.

    Attributes:
        capacity_bytes: what the budget holds, bytes.
        by_category: bytes per category.
    """

    capacity_bytes: int
    by_category: dict[Category, int]

    @property
    def total_bytes(self) -> int:
        """Sum over categories, bytes."""
        return sum(self.by_category.values())

    @property
    def free_bytes(self) -> int:
        """Capacity minus total; negative when over."""
        return self.capacity_bytes - self.total_bytes

    @property
    def fits(self) -> bool:
        """Whether the total is within capacity."""
        return self.total_bytes <= self.capacity_bytes


@dataclass(frozen=True)
class GroupRow:
    """One layer group's parameters and its share of the most loaded GPU and of one host."""

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
        groups: the table's rows, in model order (padding last).
        binding: ``"gpu"`` or ``"host"``: the budget with the least room left (relative).
        notes: facts the user should read with the numbers (assumptions, resolved defaults).
    """

    per_gpu: Budget
    host: Budget
    nvme_bytes: int
    groups: tuple[GroupRow, ...]
    binding: str
    notes: tuple[str, ...] = field(default=())

    @property
    def fits(self) -> bool:
        """Whether both budgets hold."""
        return self.per_gpu.fits and self.host.fits


def _zero() -> dict[Category, int]:
    return {c: 0 for c in Category}


def assemble(
    items: Iterable[Item],
    group_params: dict[str, tuple[int, int]],
    gpus_per_node: int,
    gpu_capacity: int,
    host_capacity: int,
    notes: Iterable[str] = (),
) -> Estimate:
    """Sum one rank's items into the per-GPU budget, a node's host budget and the group rows.

    Host bytes are per rank in ``items`` and multiplied by the ranks on a node.

    Args:
        items: what the most loaded rank holds.
        group_params: group name -> (params, trainable params), in model order.
        gpus_per_node: ranks per node.
        gpu_capacity: bytes per GPU.
        host_capacity: host RAM per node, bytes.
        notes: notes to carry.
    """
    gpu_rows: dict[str, dict[Category, int]] = defaultdict(_zero)
    host_rows: dict[str, dict[Category, int]] = defaultdict(_zero)
    nvme = 0
    for it in items:
        if it.place is Place.GPU:
            gpu_rows[it.group][it.category] += it.nbytes
        elif it.place is Place.HOST:
            host_rows[it.group][it.category] += it.nbytes * gpus_per_node
        else:
            nvme += it.nbytes * gpus_per_node
    names = list(group_params)
    names += [row for row in (PADDING_ROW, ENGINE_ROW) if row in gpu_rows or row in host_rows]
    rows = tuple(
        GroupRow(n, *group_params.get(n, (0, 0)), dict(gpu_rows.get(n) or _zero()), dict(host_rows.get(n) or _zero()))
        for n in names
    )
    per_gpu = Budget(gpu_capacity, {c: sum(r.gpu[c] for r in rows) for c in Category})
    host = Budget(host_capacity, {c: sum(r.host[c] for r in rows) for c in Category})
    binding = "gpu" if per_gpu.free_bytes / per_gpu.capacity_bytes <= host.free_bytes / host.capacity_bytes else "host"
    return Estimate(per_gpu, host, nvme, rows, binding, tuple(notes))
