"""Activations of any decoder transformers can build, from terms fitted to traces of reduced
copies of the real model (``planner.judge.fit`` traces; this module holds the arithmetic).

Estimate stage; pure arithmetic (no torch, no I/O). Where a hand-written simulator exists
(``planner.estimate.decoder``) it is used instead; on those architectures the two agree
(tests/judge/test_fit.py).

The model of a step (docs/activations.md, "Any architecture"):

* **Depth.** A decoder is a stack of layers of a few distinct kinds (dense or mixture-of-experts
  MLP, sliding-window or global attention...). Each figure of a step at the peak of a phase is
  affine in the number of layers of each kind: ``Q(n) = Q(base) + sum_k (n_k - b_k) * slope_k``,
  where *base* keeps the first ``b_k = min(4, n_k)`` layers of every kind (in the model's order)
  and ``slope_k`` is what one more layer of kind k adds (traced with a fifth one). A figure is
  taken at each *moment* of a phase (``planner.estimate.moments``) and the largest moment is the
  phase's.
* **Workload.** Each of those is a polynomial in the micro-batch B and the sequence S with the
  terms a training step has: ``c0 + c1*S + c2*B*S + c3*S^2 + c4*B*S^2`` (constants; per-position
  tensors shared by the batch, e.g. position ids; per-token activations; an attention mask
  shared by the batch; eager attention's scores per sequence). Five traced (B, S) points fix
  the five coefficients exactly; a sixth, outside them, checks the fit.
* **Regimes.** A sliding-window layer behaves differently past its window, so sequences up to
  the window and beyond it are fitted apart; a fit answers only inside its sequence range.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from typing import Any

from planner.estimate.ledger import block_bytes
from planner.estimate.moments import largest_moment
from planner.estimate.step_memory import StepMemory

FIT_VERSION = 2
"""Format of fitted terms; a cached entry of another version is fitted again."""

QUANTITIES = ("forward", "held", "backward", "backward_gradients", "optimizer", "buffers")
"""What a traced step gives, bytes beyond the model states (``TraceResult`` categories):
``forward``/``backward``/``optimizer``: activations + temporaries at that phase's peak;
``held``: what forward leaves for backward; ``backward_gradients``: parameter gradients alive at
the backward peak; ``buffers``: module buffers (rotary tables, masks registered by the model)."""

OPTIONAL_QUANTITIES = ("inputs",)
"""Measured where the step's inputs are more than ``input_ids`` and ``labels`` (a vision-language
step's pixel values, grid and position ids): every input tensor, bytes. Without it the inputs are
``INPUT_TENSORS`` of int64 [B, S]."""

BASIS = ("1", "S", "B*S", "S^2", "B*S^2")

PHASE_SUMS = {
    "forward": ("forward", "buffers"),
    "backward": ("backward", "backward_gradients", "buffers"),
    "optimizer": ("optimizer", "buffers"),
}
"""The quantities that add up to each phase's figure beyond the model states."""

INPUT_TENSORS = 2
"""``input_ids`` and ``labels``: int64 [B, S] each, alive the whole step."""
INT64 = 8


BASE_LAYERS = 4
"""Layers of each kind in the base copy (all of them where the model has no more). Four, so that
every moment ``planner.estimate.moments`` tells apart (the three lowest layers of a kind and its
top one) is a layer of its own: the lowest layers behave unlike the rest, and a one-layer copy
takes the bottom layer's moment for the top one's (docs/any-architecture.md, "Moments")."""


def base_counts(kind_counts: Sequence[int]) -> tuple[int, ...]:
    """Layers of each kind in the base copy."""
    return tuple(min(BASE_LAYERS, n) for n in kind_counts)


def one_more(counts: Sequence[int], kind: int) -> tuple[int, ...]:
    """``counts`` with one more layer of ``kind``: the copy whose difference is that kind's slope."""
    return tuple(n + (i == kind) for i, n in enumerate(counts))


def basis(micro_batch: int, seq_len: int) -> tuple[int, ...]:
    """The basis functions at (B, S), in the order of ``BASIS``."""
    b, s = micro_batch, seq_len
    return (1, s, b * s, s * s, b * s * s)


FIT_TOLERANCE = 0.01
"""Largest error of the fit at its check point (relative, on each phase's figure) for the terms
to answer away from their anchor workload. Above it, the step's peak moves between moments
(the loss, a layer's attention) across the fitted range, which a polynomial cannot follow: the
terms then answer at their anchor only, where they are exact."""


def fit_points(micro_batch: int, seq_len: int) -> list[tuple[int, int]]:
    """Five (B, S) points that fix the five coefficients, anchored at the workload (B, S) asked
    for: S at three lengths from half to all of it (a quadratic in S), B at 1 and B (2 and 1
    when B is 1): the batches a search tries lie between, and its most common one, 1, is traced.
    The anchor is one of them, so the terms are exact there."""
    b, s = micro_batch, seq_len
    other = 1 if b > 1 else 2
    return [(b, s), (other, s), (b, s // 2), (other, s // 2), (1, (3 * s) // 4)]


def batch_range(micro_batch: int) -> tuple[int, int]:
    """The micro-batches terms anchored at ``micro_batch`` were fitted over."""
    return (1, max(micro_batch, 2))


def check_point(micro_batch: int, seq_len: int) -> tuple[int, int]:
    """A (B, S) point inside the fitted range but none of the fit points: five eighths of the
    sequence, at the anchor's batch (2 when it is 1)."""
    return (max(micro_batch, 2), (5 * seq_len) // 8)


NO_CHECK = -1.0
"""The check error of terms traced at one workload only (they answer there alone)."""

MIN_ANCHOR_SEQ = 16
"""The shortest anchor sequence: its half, three quarters and five eighths must differ."""


def solve(points: Sequence[tuple[int, int]], values: Sequence[int]) -> tuple[Fraction, ...]:
    """The coefficients of ``BASIS`` through five (B, S) -> value points, exactly (Gaussian
    elimination over fractions).

    Raises:
        ValueError: the points do not determine the coefficients.
    """
    n = len(BASIS)
    if len(points) != n or len(values) != n:
        raise ValueError(f"need {n} points and values")
    rows = [[Fraction(x) for x in basis(b, s)] + [Fraction(v)] for (b, s), v in zip(points, values, strict=True)]
    for col in range(n):
        pivot = next((r for r in range(col, n) if rows[r][col] != 0), None)
        if pivot is None:
            raise ValueError("the fit points do not determine the coefficients")
        rows[col], rows[pivot] = rows[pivot], rows[col]
        for r in range(n):
            if r != col and rows[r][col] != 0:
                f = rows[r][col] / rows[col][col]
                rows[r] = [a - f * c for a, c in zip(rows[r], rows[col], strict=True)]
    return tuple(rows[i][n] / rows[i][i] for i in range(n))


@dataclass(frozen=True)
class FitSpec:
    """What changes the fitted terms besides the model: how the step runs and what trains.

    Attributes:
        precision: the traced precision (``fp32``, ``amp-bf16``, ``amp-fp16``, ``pure-bf16``;
            a DeepSpeed module is traced as its 16-bit or fp32 module without autocast).
        attn: ``eager`` or ``sdpa``.
        grad_ckpt: non-reentrant gradient checkpointing, as HF Trainer enables it.
        optimizer: the trace's optimizer (``planner.judge.protocol.OPTIMIZERS``), ``none`` where
            the engine's optimizer is modelled elsewhere (DeepSpeed).
        clip: HF Trainer's gradient clipping runs on the module's gradients.
        frozen_parts: non-layer parts frozen entirely (``embed_tokens``, ``norm``, ``lm_head``).
        frozen_layer_names: parameter names inside a layer (``self_attn.q_proj.weight``) frozen in
            every layer.
        lora: ``{"r": .., "targets": [...]}`` or None.
        frozen_groups: a vision-language step's groups frozen entirely (``vision_tower``,
            ``multi_modal_projector``); the LLM's own freezing is in the fields above.
        images: a vision-language step's images per sample (0: text only).
        image_size: (width, height) in pixels of each image as its processor hands it to the
            tower (the family's rule, ``planner.workload.vision``); (0, 0) without images.
    """

    precision: str
    attn: str
    grad_ckpt: bool
    optimizer: str
    clip: bool
    frozen_parts: tuple[str, ...] = ()
    frozen_layer_names: tuple[str, ...] = ()
    lora: dict | None = None
    frozen_groups: tuple[str, ...] = ()
    images: int = 0
    image_size: tuple[int, int] = (0, 0)

    def key(self) -> str:
        """A canonical string of every field (the terms' key within one model); the
        vision-language fields only where set, so a text model's key is what it always was."""
        d = asdict(self)
        for name in ("frozen_groups", "images", "image_size"):
            if not any(d[name]) if isinstance(d[name], tuple | list) else not d[name]:
                del d[name]
        return json.dumps(d, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class Sample:
    """One traced step of a reduced copy: layers of each kind, workload, measured quantities."""

    counts: tuple[int, ...]
    micro_batch: int
    seq_len: int
    values: Mapping[str, int]


@dataclass(frozen=True)
class ActivationTerms:
    """Fitted step memory of one decoder under one set of step options.

    Attributes:
        kinds: a short description of each distinct layer kind.
        kind_counts: layers of each kind in the full model.
        anchor: the (B, S) the fit points were chosen around; the terms are exact there.
        base: quantity -> coefficients (``BASIS``) of the base copy (``base_counts``).
        slopes: per kind, quantity -> coefficients of one more layer of that kind (empty for a
            kind with one layer).
        check: (B, S) of the check trace, and the largest relative error of the fit there over
            the quantities (the full-depth figures are not traced; see docs/activations.md);
            ``NO_CHECK`` for terms traced at their anchor alone.
        source: what was traced (versions, kernels), for the output and the cache.
    """

    kinds: tuple[str, ...]
    kind_counts: tuple[int, ...]
    anchor: tuple[int, int]
    base: Mapping[str, tuple[Fraction, ...]]
    slopes: tuple[Mapping[str, tuple[Fraction, ...]], ...]
    check: tuple[int, int, float] = (0, 0, 0.0)
    source: str = ""
    notes: tuple[str, ...] = field(default=())

    def covers(self, micro_batch: int, seq_len: int) -> bool:
        """Whether the terms answer at (B, S): at their anchor always; elsewhere inside the
        fitted range (half to all of the anchor's sequence, batches from 1 to the anchor's) when
        the check trace agreed within ``FIT_TOLERANCE``."""
        b, s = self.anchor
        if (micro_batch, seq_len) == (b, s):
            return True
        lo, hi = batch_range(b)
        return 0 <= self.check[2] <= FIT_TOLERANCE and s // 2 <= seq_len <= s and lo <= micro_batch <= hi

    def value(self, quantity: str, micro_batch: int, seq_len: int) -> int:
        """One quantity of the full model at (B, S), bytes (never below zero)."""
        x = basis(micro_batch, seq_len)
        total = sum(c * v for c, v in zip(self.base[quantity], x, strict=True))
        for n, b, slope in zip(self.kind_counts, base_counts(self.kind_counts), self.slopes, strict=True):
            if n > b and slope:
                total += (n - b) * sum(c * v for c, v in zip(slope[quantity], x, strict=True))
        return max(0, round(total))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (coefficients as "p/q" strings: exact)."""

        def coeffs(m: Mapping[str, tuple[Fraction, ...]]) -> dict[str, list[str]]:
            return {q: [str(c) for c in cs] for q, cs in m.items()}

        return {
            "version": FIT_VERSION,
            "kinds": list(self.kinds),
            "kind_counts": list(self.kind_counts),
            "anchor": list(self.anchor),
            "base": coeffs(self.base),
            "slopes": [coeffs(s) for s in self.slopes],
            "check": list(self.check),
            "source": self.source,
            "notes": list(self.notes),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ActivationTerms:
        """Inverse of ``to_dict``.

        Raises:
            ValueError: not terms of this format (a cache entry from elsewhere).
        """
        if d.get("version") != FIT_VERSION:
            raise ValueError("fitted terms of another format version")

        def coeffs(m: Any) -> dict[str, tuple[Fraction, ...]]:
            if not isinstance(m, dict):
                raise ValueError("coefficients must be a mapping")
            out = {}
            moments = sorted(q for q in m if isinstance(q, str) and "@" in q)
            for q in (*QUANTITIES, *(q for q in OPTIONAL_QUANTITIES if q in m), *moments):
                cs = m.get(q)
                if not isinstance(cs, list) or len(cs) != len(BASIS):
                    raise ValueError(f"coefficients of {q!r} missing or malformed")
                out[q] = tuple(Fraction(str(c)) for c in cs)
            return out

        kinds = tuple(str(k) for k in d["kinds"])
        counts = tuple(int(n) for n in d["kind_counts"])
        slopes = tuple(coeffs(s) if s else {} for s in d["slopes"])
        if not (len(kinds) == len(counts) == len(slopes)) or any(n < 1 for n in counts):
            raise ValueError("kinds, counts and slopes disagree")
        ab, as_ = (int(x) for x in d["anchor"])
        b, s, err = d["check"]
        return cls(kinds, counts, (ab, as_), coeffs(d["base"]), slopes, (int(b), int(s), float(err)),
                   str(d.get("source", "")), tuple(str(n) for n in d.get("notes", ())))

    def step_memory(self, micro_batch: int, seq_len: int, extra_backward: int = 0) -> StepMemory:
        """The step's memory beyond the model states at (B, S), in the simulators' form.

        Args:
            micro_batch, seq_len: the micro-step's shape (where ``covers`` holds).
            extra_backward: kernel workspaces the trace cannot see, alive at the backward peak
                (bytes): FlashAttention-2's backward scratch.

        Raises:
            ValueError: ``seq_len`` outside the fitted range.
        """
        if not self.covers(micro_batch, seq_len):
            raise ValueError(f"({micro_batch}, {seq_len}) outside what the terms fitted at {self.anchor} answer")
        v = {q: self.value(q, micro_batch, seq_len) for q in self.base}
        inputs = (self.value("inputs", micro_batch, seq_len) if "inputs" in self.base
                  else INPUT_TENSORS * block_bytes(micro_batch * seq_len * INT64))
        fwd, bwd, grads = _phase_figures(v)
        bwd += extra_backward
        v["backward_gradients"] = grads
        phases = {"forward": fwd, "backward": bwd + v["backward_gradients"], "optimizer": v["optimizer"]}
        return StepMemory(
            forward_activations=fwd,
            forward_temporaries=0,
            held_for_backward=v["held"] + v["buffers"],
            backward_activations=bwd,
            backward_temporaries=0,
            backward_gradients=v["backward_gradients"],
            optimizer_gradients=0,
            optimizer_temporaries=v["optimizer"] + v["buffers"],
            inputs=inputs,
            peak_phase=max(phases, key=lambda p: phases[p]),
        )


def _phase_figures(v: Mapping[str, float]) -> tuple[float, float, float]:
    """(forward, backward activations + temporaries + buffers, backward gradients) of a step from
    its quantities: each phase's largest moment where moments were measured
    (``planner.estimate.moments``), else the traced phase peaks."""
    fwd = largest_moment(v, "forward")
    bwd = largest_moment(v, "backward")
    if fwd is None or bwd is None:
        return v["forward"] + v["buffers"], v["backward"] + v["buffers"], v["backward_gradients"]
    return fwd[1] + fwd[2], bwd[1], bwd[2]


def point_terms(samples: Sequence[Sample], kinds: Sequence[str], kind_counts: Sequence[int],
                point: tuple[int, int], source: str = "") -> ActivationTerms:
    """Terms that answer at one workload only, exactly: the copies traced at ``point`` and
    extrapolated in depth (a constant in B and S; no check, so ``covers`` holds at ``point`` only).

    Raises:
        ValueError: a needed sample is missing.
    """
    by = {s.counts: s.values for s in samples if (s.micro_batch, s.seq_len) == point}
    zero = (Fraction(0),) * (len(BASIS) - 1)
    quantities = _measured(samples)

    def const(counts: tuple[int, ...]) -> dict[str, tuple[Fraction, ...]]:
        if counts not in by:
            raise ValueError(f"no traced sample for {counts} at {point}")
        return {q: (Fraction(by[counts][q]), *zero) for q in quantities}

    first = base_counts(kind_counts)
    base = const(first)
    slopes = []
    for k, n in enumerate(kind_counts):
        if n <= BASE_LAYERS:
            slopes.append({})
            continue
        more = const(one_more(first, k))
        slopes.append({q: tuple(a - b for a, b in zip(more[q], base[q], strict=True)) for q in quantities})
    return ActivationTerms(tuple(kinds), tuple(kind_counts), point, base, tuple(slopes), (0, 0, NO_CHECK), source)


def _measured(samples: Sequence[Sample]) -> tuple[str, ...]:
    """The quantities every sample holds: ``QUANTITIES`` and the optional ones all of them measured."""
    extra = tuple(q for q in OPTIONAL_QUANTITIES if samples and all(q in s.values for s in samples))
    moments = tuple(sorted(q for q in (samples[0].values if samples else {})
                           if "@" in q and all(q in s.values for s in samples)))
    return (*QUANTITIES, *extra, *moments)


def fit_terms(samples: Sequence[Sample], kinds: Sequence[str], kind_counts: Sequence[int],
              points: Sequence[tuple[int, int]],
              check: Sample | None = None, source: str = "") -> ActivationTerms:
    """Fit the terms from traced samples: the base copy (``base_counts``) at the five
    ``points``, and for each kind with more than one layer the copy with one more of it.

    Raises:
        ValueError: a needed sample is missing.
    """
    by = {(s.counts, s.micro_batch, s.seq_len): s.values for s in samples}
    first = base_counts(kind_counts)
    quantities = _measured(samples)

    def coefficients(counts: tuple[int, ...]) -> dict[str, tuple[Fraction, ...]]:
        try:
            rows = [by[(counts, b, s)] for b, s in points]
        except KeyError as exc:
            raise ValueError(f"no traced sample for {exc.args[0]}") from None
        return {q: solve(points, [r[q] for r in rows]) for q in quantities}

    base = coefficients(first)
    slopes: list[dict[str, tuple[Fraction, ...]]] = []
    for k, n in enumerate(kind_counts):
        if n <= BASE_LAYERS:
            slopes.append({})
            continue
        more = one_more(first, k)
        with_more = coefficients(more)
        slopes.append({q: tuple(a - b for a, b in zip(with_more[q], base[q], strict=True)) for q in quantities})
    anchor = points[0]
    terms = ActivationTerms(tuple(kinds), tuple(kind_counts), anchor, base, tuple(slopes), source=source)
    if check is None:
        return terms
    # The check compares what the ledger uses: each phase's total at (B, S), the largest moment
    # where moments were measured, against the traced phase peak.
    x = basis(check.micro_batch, check.seq_len)
    got = {q: float(sum(c * v for c, v in zip(base[q], x, strict=True))) for q in base}
    fwd, bwd, grads = _phase_figures(got)
    have_by_phase = {"forward": fwd, "backward": bwd + grads, "optimizer": got["optimizer"] + got["buffers"]}
    worst = 0.0
    for phase in PHASE_SUMS:
        want = sum(check.values[q] for q in PHASE_SUMS[phase])
        worst = max(worst, abs(have_by_phase[phase] - want) / max(want, 1))
    return ActivationTerms(terms.kinds, terms.kind_counts, anchor, base, terms.slopes,
                           (check.micro_batch, check.seq_len, round(worst, 6)), source)
