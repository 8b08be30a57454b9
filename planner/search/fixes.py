"""What would make a request fit that the search space cannot: more host RAM, more GPUs, or a
constraint relaxed. The ladders of bigger clusters are written once here; `memplan tune` (`fixes`)
and `memplan explain` (`planner.explain.diagnose`) both climb them.

Search stage (estimate -> **search** -> plan): each rung is searched with `search.search`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

from planner.estimate import RuntimeModel
from planner.profile.catalog import ModelSpec
from planner.profile.hardware import Cluster
from planner.search.search import search
from planner.search.space import Candidate, Constraints, Request, SearchResult, SearchSpace
from planner.units import GIB

HOST_RAM_SIZES_GIB = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)
"""Host RAM sizes a fix suggests: what workstation and server boards are sold with."""

MAX_GPUS = 64
"""The most GPUs, all nodes together, a "more GPUs" fix offers."""


def more_host_ram(cluster: Cluster) -> Iterator[Cluster]:
    """The same GPUs with the common host RAM sizes above the cluster's, smallest first."""
    for size in HOST_RAM_SIZES_GIB:
        if size * GIB > cluster.host_ram_bytes:
            yield replace(cluster, host_ram_bytes=size * GIB, note=None)


def more_gpus(cluster: Cluster) -> Iterator[Cluster]:
    """More GPUs of the same kind and RAM per node: doubling up to 8 per node, then doubling the
    nodes, up to `MAX_GPUS` in all."""
    nodes, per_node = cluster.nodes, cluster.gpus_per_node
    while nodes * per_node < MAX_GPUS:
        if per_node < 8:
            per_node *= 2
        else:
            nodes *= 2
        yield replace(cluster, nodes=nodes, gpus_per_node=per_node, note=None)


@dataclass(frozen=True)
class Fix:
    """A change outside the search space (or a relaxed constraint) and the best setup it allows."""

    change: str
    candidate: Candidate


def host_ram_fix(model: ModelSpec, cluster: Cluster, request: Request, constraints: Constraints,
                 space: SearchSpace, max_severity: int, runtime: RuntimeModel | None = None) -> Fix | None:
    """The smallest common host RAM size with which a setup giving up at most ``max_severity``
    fits, and that setup.

    Host RAM only caps what fits (no estimate depends on it): when the next size up does not do,
    the largest is tried before the ones between, and when that does not do either none will."""
    ladder = list(more_host_ram(cluster))
    for i, bigger in enumerate(ladder):
        found = _best_within(model, bigger, request, constraints, space, max_severity, runtime)
        if found:
            return Fix(f"host RAM {cluster.host_ram_bytes / GIB:.0f} -> {bigger.host_ram_bytes // GIB} GiB per node",
                       found)
        if i == 0 and len(ladder) > 2:
            if _best_within(model, ladder[-1], request, constraints, space, max_severity, runtime) is None:
                return None
    return None


def _best_within(model: ModelSpec, cluster: Cluster, request: Request, constraints: Constraints,
                 space: SearchSpace, max_severity: int, runtime: RuntimeModel | None = None) -> Candidate | None:
    """The best candidate on ``cluster`` that gives up at most ``max_severity``."""
    found = search(model, cluster, request, constraints, space, top=1, runtime=runtime).candidates
    return next((c for c in found if c.worst <= max_severity), None)


def more_gpus_fix(model: ModelSpec, cluster: Cluster, request: Request, constraints: Constraints,
                  space: SearchSpace, max_severity: int, runtime: RuntimeModel | None = None) -> Fix | None:
    """The fewest extra GPUs of the same kind (`more_gpus`: up to 8 per node, then more nodes, up
    to `MAX_GPUS` in all) with which a setup giving up at most ``max_severity`` fits. The global
    batch is kept when it divides; else it grows to the next multiple."""
    for bigger in more_gpus(cluster):
        req = request
        if request.global_batch is not None and request.global_batch % bigger.world_size:
            req = request.model_copy(update={"global_batch": -(-request.global_batch // bigger.world_size)
                                             * bigger.world_size})
        found = _best_within(model, bigger, req, constraints, space, max_severity, runtime)
        if found:
            return Fix(f"GPUs {cluster.label} -> {bigger.label}", found)
    return None


def fixes(model: ModelSpec, cluster: Cluster, request: Request, constraints: Constraints,
          space: SearchSpace, result: SearchResult, runtime: RuntimeModel | None = None) -> list[Fix]:
    """The smallest changes that make the request fit as asked (when the chosen plan gives
    something up), or make anything fit (when nothing does): more host RAM, more GPUs, and the
    constraints relaxed one at a time. Cheapest first: a constraint before hardware, RAM before
    GPUs."""
    chosen = result.chosen
    target = 0 if chosen is not None else 3
    if chosen is not None and not chosen.gives_up:
        return []
    out: list[Fix] = []
    if chosen is None:
        relaxed: list[tuple[str, Constraints]] = []
        if constraints.must_train:
            relaxed.append((f"drop --must-train {','.join(constraints.must_train)}",
                            constraints.model_copy(update={"must_train": ()})))
        if constraints.min_seq_len and constraints.min_seq_len > 256:
            relaxed.append((f"--min-seq-len {constraints.min_seq_len} -> 256",
                            constraints.model_copy(update={"min_seq_len": min(256, request.seq_len)})))
        if constraints.min_slice_nums and constraints.min_slice_nums > 1:
            relaxed.append((f"--min-slices {constraints.min_slice_nums} -> 1",
                            constraints.model_copy(update={"min_slice_nums": 1})))
        for text, c in relaxed:
            found = search(model, cluster, request, c, space, top=1, runtime=runtime).candidates
            if found:
                out.append(Fix(text, found[0]))
    for finder in (host_ram_fix, more_gpus_fix):
        fix = finder(model, cluster, request, constraints, space, target, runtime)
        if fix is not None:
            out.append(fix)
    return out

