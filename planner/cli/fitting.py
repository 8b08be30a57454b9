"""Fitted activation terms for the commands: run the command's estimates, and where a decoder
without a simulator had no terms, read them from the user's cache or fit them (tracing reduced
copies of the real model, ``planner.judge.fit``), then run the estimates again.

CLI stage: it joins the estimate (pure), the cache (profile) and the judge (torch, in worker
processes). Progress goes to stderr, one updating line.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from planner.estimate import generic
from planner.estimate.fitted import FIT_TOLERANCE, FIT_VERSION, ActivationTerms
from planner.profile.cache import cache_key, read_entry, write_entry

T = TypeVar("T")

CACHE_KIND = "activations"

MAX_FITS = 4
"""Setups fitted for one command at most (each traces ~10-20 reduced copies, ~10-20 s on two
cores); candidates of a search beyond them stay UNKNOWN and are named."""

MAX_ROUNDS = 3


def _entry_key(want: generic.Want) -> str:
    from planner.judge.fit import versions

    return cache_key(str(FIT_VERSION), generic.config_key(want.config), want.spec.key(), versions())


def _cached(want: generic.Want) -> list[ActivationTerms]:
    entry = read_entry(CACHE_KIND, _entry_key(want), FIT_VERSION)
    out = []
    for raw in (entry or {}).get("terms", []):
        try:
            out.append(ActivationTerms.from_dict(raw))
        except (ValueError, KeyError, TypeError, ZeroDivisionError):
            return []  # an entry not as written: refit, never trust
    return out


def _store(want: generic.Want, terms: list[ActivationTerms]) -> None:
    write_entry(CACHE_KIND, _entry_key(want), FIT_VERSION, {"terms": [t.to_dict() for t in terms]})


def _covers_all(terms: list[ActivationTerms], want: generic.Want) -> bool:
    return all(any(t.covers(b, s) for t in terms) for b, s in want.workloads)


def with_fitted_terms(run: Callable[[], T], say: Callable[[str], None] | None = None,
                      max_fits: int = MAX_FITS, notes: list[str] | None = None) -> tuple[T, list[str]]:
    """``run()`` (a command's estimates), again after the terms it lacked are read or fitted.

    Args:
        run: the command's estimates; pure, run again after new terms are registered.
        say: progress, one short line at a time.
        max_fits: setups fitted at most.
        notes: a list to append the notes to before ``run`` is run again (the command's own
            notes list, which ``run`` reads), or None for a new one.

    Returns:
        the last result, and the notes: which setups were fitted, and which failed (with the
        judge's one-line reason; those stay unmodelled, so their verdict stays UNKNOWN).
    """
    say = say or (lambda msg: None)
    notes = [] if notes is None else notes
    fitted = 0
    tried: set[tuple[str, str]] = set()
    generic.forget_used()
    result = run()
    for _ in range(MAX_ROUNDS):
        wants = [w for w in generic.wanted() if (generic.config_key(w.config), w.spec.key()) not in tried]
        if not wants:
            break
        generic.forget_wanted()
        for want in wants:
            tried.add((generic.config_key(want.config), want.spec.key()))
            have = _cached(want)
            for t in have:
                generic.register(want.config, want.spec, t, origin="cache")
            if _covers_all(have, want):
                continue
            if fitted >= max_fits:
                notes.append(f"{len(wants) - wants.index(want)} more setups not traced (at most {max_fits} "
                             "per command); their candidates stay UNKNOWN")
                break
            fitted += 1
            new = _fit_want(want, have, say, notes)
            for t in new:
                generic.register(want.config, want.spec, t)
            if new:
                _store(want, [*have, *new])
        generic.forget_used()
        result = run()
    by_type: dict[str, list[tuple[ActivationTerms, bool]]] = {}
    for mtype, terms, origin in generic.used():
        by_type.setdefault(mtype, []).append((terms, origin == "cache"))
    summary = [_summary(mtype, terms) for mtype, terms in by_type.items()]
    if summary:
        notes += summary
        result = run()  # once more, so the estimates carry the notes
    return result, notes


def _summary(model_type: str, used: list[tuple[ActivationTerms, bool]]) -> str:
    """One note per decoder type on where its activations came from."""
    if len(used) == 1:
        return describe(used[0][0], model_type, cached=used[0][1])
    first = used[0][0]
    kinds = ", ".join(f"{n} x {k}" for n, k in zip(first.kind_counts, first.kinds, strict=True))
    ranges = [t.check[2] for t, _ in used if 0 <= t.check[2] <= FIT_TOLERANCE]
    cached = sum(1 for _, c in used if c)
    over = f"{len(ranges)} over a range of workloads (checked within {max(ranges):.2%}), " if ranges else ""
    return (f"activations of {_what(model_type, first)} ({kinds}) from traces of reduced copies of the real model: "
            f"{len(used)} sets of terms ({over}{len(used) - len(ranges)} exact at one workload each; "
            f"{cached} from the cache), extrapolated in depth")


MAX_POINTS = 8
"""Workloads of one setup traced one by one at most, where a fit across them cannot hold."""


def _fit_want(want: generic.Want, have: list[ActivationTerms], say: Callable[[str], None],
              notes: list[str]) -> list[ActivationTerms]:
    """Terms for every workload ``want`` asked at: one workload, traced there (exact); several,
    a fit anchored at the largest, then each one it does not cover traced on its own."""
    todo = sorted(w for w in want.workloads if not any(t.covers(*w) for t in have))
    if not todo:
        return []
    new: list[ActivationTerms] = []
    # With images the step also has terms in B alone (the tower's), which the (B, S) basis has
    # not: each workload is traced on its own, exact there.
    if len(todo) > 1 and not want.spec.images:
        terms = _fit(want, want.anchor, False, say, notes)
        if terms is None:
            return []
        new.append(terms)
        todo = [w for w in todo if not terms.covers(*w)]
    skipped = todo[MAX_POINTS:]
    for point in todo[:MAX_POINTS]:
        terms = _fit(want, point, True, say, notes)
        if terms is None:
            break
        new.append(terms)
    if skipped:
        notes.append(f"{len(skipped)} workloads of {want.config.get('model_type', '?')} not traced (at most "
                     f"{MAX_POINTS} one by one); they stay UNKNOWN")
    return new


def _fit(want: generic.Want, anchor: tuple[int, int], at_anchor_only: bool, say: Callable[[str], None],
         notes: list[str]) -> ActivationTerms | None:
    from planner.judge.fit import fit_activation_terms
    from planner.judge.protocol import TraceError

    model_type = want.config.get("model_type", "?")
    b, s = anchor
    say(f"{model_type}: tracing reduced copies at {b} x {s} tokens ({want.spec.precision}, {want.spec.attn})")
    try:
        terms = fit_activation_terms(want.config, want.spec, anchor, progress=lambda m: say(f"{model_type}: {m}"),
                                     at_anchor_only=at_anchor_only)
    except TraceError as exc:
        reason = _last_line(str(exc))
        generic.fail(want.config, want.spec, reason)
        notes.append(f"{model_type} ({want.spec.precision}, {want.spec.attn}) could not be traced: {reason}")
        return None
    return terms


def describe(terms: ActivationTerms, model_type: str, cached: bool = False) -> str:
    """One note on where a decoder's activations came from."""
    kinds = ", ".join(f"{n} x {k}" for n, k in zip(terms.kind_counts, terms.kinds, strict=True))
    b, s = terms.anchor
    where = " (from the cache)" if cached else ""
    if terms.check[2] < 0:
        return (f"activations of {_what(model_type, terms)} ({kinds}) from traces of reduced copies at "
                f"{b} x {s} tokens, extrapolated in depth{where}")
    return (f"activations of {_what(model_type, terms)} ({kinds}) fitted to traces of reduced copies around "
            f"{b} x {s} tokens; check {terms.check[2]:.2%} off at {terms.check[0]} x {terms.check[1]}{where}")


def _what(model_type: str, terms: ActivationTerms) -> str:
    """What the terms stand for: a decoder, or a vision-language model's whole step."""
    if model_type not in generic.VLM_TYPES:
        return f"the {model_type} decoder"
    if any(k.startswith("vision: ") for k in terms.kinds):
        return f"the {model_type} step (language model, vision tower and projector)"
    return f"the {model_type} step (text only: the language model)"


def _last_line(text: str) -> str:
    """The judge's reason in one line: the last line of the worker's traceback."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else "unknown error"
    return last[:300]


def run_with_terms(run: Callable[[], T], notes: list[str]) -> T:
    """``with_fitted_terms`` for a command: progress on stderr (one updating line on a terminal),
    the notes appended to ``notes``, which ``run`` passes to its estimates."""
    from rich.console import Console

    console = Console(stderr=True)
    status = None

    def say(msg: str) -> None:
        nonlocal status
        if not console.is_terminal:
            return
        if status is None:
            status = console.status(msg)
            status.start()
        else:
            status.update(msg)

    try:
        result, _ = with_fitted_terms(run, say, notes=notes)
    finally:
        if status is not None:
            status.stop()
    return result
