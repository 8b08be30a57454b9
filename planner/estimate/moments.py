"""A phase's peak as the largest of its moments: what a traced step holds at the loss, inside the
lowest three and the top layer of each kind, and before or after the stack.

Estimate stage, pure. ``planner.judge.fit`` measures each moment on reduced copies of a model
(``TraceResult.moment_peaks``); ``planner.estimate.fitted`` extrapolates each moment in depth and
workload and takes the largest here. Why moments and not the phase peak itself
(docs/any-architecture.md, "Moments"): each moment is affine in the number of layers and a
polynomial in the workload, but which moment is the largest changes with both (the loss at
large batches, the end of backward with every gradient alive at small ones), so the phase peak
is a maximum of such terms, not one. Extrapolating the peak itself from a one- or two-layer copy
picks the copy's moment, not the full model's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

MOMENT_PHASES = ("forward", "backward")
"""Phases whose moments are kept (the optimizer step runs no layer)."""

GRADS = "/grads"
"""Suffix of a moment's parameter-gradient bytes (kept apart: under gradient accumulation and
DeepSpeed the ledger counts gradients elsewhere)."""


def moment_key(phase: str, label: str, grads: bool = False) -> str:
    """The quantity name of a moment: ``backward@k1:t0`` (activations, temporaries and buffers),
    ``backward@k1:t0/grads`` (its parameter gradients)."""
    return f"{phase}@{label}{GRADS if grads else ''}"


EDGE_LABELS = ("b0", "b1", "b2", "t0")
"""The layers of one kind told apart: the three lowest in the stack and the top one. Layers near
the bottom behave unlike the rest (layer 0's input is the embedding's output and needs no
gradient; under checkpointing layer 1's backward meets layer 0's recomputation), and between
the third and the top the moments change linearly with the position (one more layer held below,
one fewer gradient above), so their largest lies at one of these four."""


def layer_labels(layer_kinds: Sequence[int]) -> dict[int, list[str]]:
    """Labels of a copy's layers: for each kind, ``k{kind}:b0``, ``:b1``, ``:b2`` on its three
    lowest layers and ``:t0`` on its top one (a kind with fewer layers gives several labels to
    one layer; a layer between the third and the top gets none)."""
    out: dict[int, list[str]] = {}
    for kind in dict.fromkeys(layer_kinds):
        mine = [j for j, k in enumerate(layer_kinds) if k == kind]
        for label, pos in zip(EDGE_LABELS, (0, 1, 2, -1), strict=True):
            j = mine[pos] if pos < 0 else mine[min(pos, len(mine) - 1)]
            out.setdefault(j, []).append(f"k{kind}:{label}")
    return out


def moment_quantities(moment_peaks: Mapping[str, Mapping[str, Mapping[str, int]]],
                      layer_kinds: Sequence[int], n_kinds: int) -> dict[str, int]:
    """The moment quantities of one traced copy, every label present (a moment the copy did not
    reach holds nothing: 0), so that copies can be compared label by label.

    Args:
        moment_peaks: ``TraceResult.moment_peaks`` (phase -> moment -> bytes by category).
        layer_kinds: the kind index of each of the copy's layers, in stack order.
        n_kinds: kinds in the model (labels for every kind, even one the copy lacks: never).
    """
    out: dict[str, int] = {}
    for phase in MOMENT_PHASES:
        labels = ["pre", "post", *(f"k{k}:{end}" for k in range(n_kinds) for end in EDGE_LABELS)]
        for label in labels:
            out[moment_key(phase, label)] = 0
            out[moment_key(phase, label, grads=True)] = 0
        peaks = moment_peaks.get(phase, {})
        by_layer = layer_labels(layer_kinds)
        for moment, cats in peaks.items():
            held = int(cats.get("activations", 0)) + int(cats.get("temporaries", 0)) + int(cats.get("buffers", 0))
            grads = int(cats.get("gradients", 0))
            names = [moment] if moment in ("pre", "post") else by_layer.get(int(moment), [])
            for label in names:
                out[moment_key(phase, label)] = held
                out[moment_key(phase, label, grads=True)] = grads
    return out


def largest_moment(values: Mapping[str, float], phase: str) -> tuple[str, float, float] | None:
    """(label, activations + temporaries + buffers, gradients) of the moment of ``phase`` that
    holds the most, from extrapolated quantities; None when the values carry no moments."""
    prefix = f"{phase}@"
    best: tuple[str, float, float] | None = None
    for key, held in values.items():
        if not key.startswith(prefix) or key.endswith(GRADS):
            continue
        grads = values.get(key + GRADS, 0.0)
        if best is None or held + grads > best[1] + best[2]:
            best = (key[len(prefix):], held, grads)
    return best
