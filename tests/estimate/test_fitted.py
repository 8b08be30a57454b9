"""The arithmetic of fitted terms (planner.estimate.fitted) and which traced step a setup needs
(planner.estimate.generic): exact solving, depth extrapolation, what the terms answer for, their
stored form, and the setups that cannot be traced. The traces themselves are judged in
tests/judge/test_fit.py."""

from __future__ import annotations

from fractions import Fraction

import pytest

from planner.estimate import generic
from planner.estimate.fitted import (
    BASIS,
    FIT_TOLERANCE,
    QUANTITIES,
    ActivationTerms,
    Sample,
    check_point,
    fit_points,
    fit_terms,
    point_terms,
    solve,
)
from planner.profile.architectures import TensorKind, TensorSpec, decoder_tensors
from planner.profile.catalog import Group
from planner.workload.inventory import Origin, Param
from planner.workload.options import Attention, Engine, LoraOptions, Optimizer, Precision, TrainingOptions, ZeroStage


def _poly(coeffs: tuple[int, ...], b: int, s: int) -> int:
    return coeffs[0] + coeffs[1] * s + coeffs[2] * b * s + coeffs[3] * s * s + coeffs[4] * b * s * s


def _samples(points, counts, per_layer, fixed) -> list[Sample]:  # noqa: ANN001
    """Synthetic traces: every quantity = fixed + sum over kinds of count x per-layer polynomial."""
    out = []
    for c in counts:
        for b, s in points:
            v = _poly(fixed, b, s) + sum(n * _poly(p, b, s) for n, p in zip(c, per_layer, strict=True))
            out.append(Sample(c, b, s, {q: v for q in QUANTITIES}))
    return out


def test_solve_is_exact() -> None:
    pts = fit_points(4, 2048)
    coeffs = (512, 8, 4096, 3, 64)
    got = solve(pts, [_poly(coeffs, b, s) for b, s in pts])
    assert got == tuple(Fraction(c) for c in coeffs)


def test_depth_and_workload_extrapolation() -> None:
    """Two layer kinds (say 20 sliding + 6 global): the fit from one of each and one more of each
    gives the full model anywhere in its range, exactly."""
    anchor = (4, 2048)
    pts = fit_points(*anchor)
    fixed, sliding, full = (10_000, 0, 2 * 151_936, 0, 0), (0, 8, 9_000, 0, 0), (0, 8, 9_000, 0, 16)
    samples = _samples(pts, [(4, 4), (5, 4), (4, 5)], [sliding, full], fixed)
    chk = check_point(*anchor)
    check = _samples([chk], [(4, 4)], [sliding, full], fixed)[0]
    terms = fit_terms(samples, ["sliding", "global"], [20, 6], pts, check)
    assert terms.check[2] == 0.0
    for b, s in [(4, 2048), (1, 1024), (3, 1536), (2, 2000)]:
        want = _poly(fixed, b, s) + 20 * _poly(sliding, b, s) + 6 * _poly(full, b, s)
        assert terms.covers(b, s)
        assert terms.value("backward", b, s) == want
    assert not terms.covers(4, 1000)  # under half the anchor's sequence: not fitted there
    assert not terms.covers(5, 2048)  # over its batch


def test_a_failed_check_keeps_the_terms_at_their_anchor() -> None:
    """A peak that moves between moments is not a polynomial: the check shows it, and the terms
    answer only where they are exact."""
    anchor = (4, 2048)
    pts = fit_points(*anchor)
    layer = (0, 0, 9_000, 0, 0)
    samples = _samples(pts, [(4,), (5,)], [layer], (0, 0, 0, 0, 0))
    check = Sample((4,), *check_point(*anchor), {q: 10**9 for q in QUANTITIES})
    terms = fit_terms(samples, ["layer"], [32], pts, check)
    assert terms.check[2] > FIT_TOLERANCE
    assert terms.covers(*anchor)
    assert not terms.covers(2, 2048)
    point = point_terms(_samples([(2, 2048)], [(4,), (5,)], [layer], (7, 0, 0, 0, 0)), ["layer"], [32], (2, 2048))
    assert point.covers(2, 2048) and not point.covers(2, 2047)
    assert point.value("forward", 2, 2048) == 7 + 32 * 9_000 * 2 * 2048


def test_stored_form_round_trips_and_rejects_tampering() -> None:
    pts = fit_points(2, 512)
    samples = _samples(pts, [(4,), (5,)], [(1, 2, 3, 0, 1)], (5, 0, 7, 0, 0))
    terms = fit_terms(samples, ["layer"], [24], pts, source="test")
    d = terms.to_dict()
    assert ActivationTerms.from_dict(d) == terms
    for broken in ({**d, "version": 99}, {**d, "base": {"forward": ["1"]}}, {**d, "kind_counts": [24, 1]}):
        with pytest.raises((ValueError, KeyError)):
            ActivationTerms.from_dict(broken)
    assert len(BASIS) == 5


def _group() -> Group:
    """A decoder group with a real inventory (qwen2's tensors), typed as an architecture without
    a simulator."""
    cfg = dict(model_type="qwen2", vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=2)
    return Group("llm", "decoder", tuple(decoder_tensors(cfg)), {**cfg, "model_type": "falcon"})


def _params(group: Group, frozen=lambda name: False) -> list[Param]:  # noqa: ANN001
    return [Param("llm", t, not frozen(t.name)) for t in group.tensors]


def test_fit_spec_follows_the_engine() -> None:
    g = _group()
    torch_amp = TrainingOptions(engine=Engine.TORCH, precision=Precision.AMP_BF16, optimizer=Optimizer.ADAMW_FOREACH)
    spec = generic.fit_spec(g, _params(g), torch_amp)
    assert (spec.precision, spec.optimizer, spec.clip) == ("amp-bf16", "adamw-foreach", True)
    ds = TrainingOptions(engine=Engine.DEEPSPEED, zero=ZeroStage.PARAMETERS, precision=Precision.AMP_BF16)
    spec = generic.fit_spec(g, _params(g), ds)
    assert (spec.precision, spec.optimizer, spec.clip) == ("pure-bf16", "none", False)  # a bf16 module, no autocast
    assert "flash_attention_2" in generic.fit_spec(g, _params(g), torch_amp.model_copy(
        update={"attn": Attention.FLASH_ATTENTION_2}))


def test_fit_spec_freezing_and_lora() -> None:
    g = _group()
    opts = TrainingOptions(engine=Engine.TORCH)
    spec = generic.fit_spec(g, _params(g, lambda n: n.startswith("model.embed_tokens")), opts)
    assert spec.frozen_parts == ("embed_tokens",) and spec.frozen_layer_names == ()
    spec = generic.fit_spec(g, _params(g, lambda n: ".self_attn." in n), opts)
    assert "self_attn.q_proj.weight" in spec.frozen_layer_names and spec.frozen_parts == ()
    why = generic.fit_spec(g, _params(g, lambda n: n.startswith("model.layers.0.")), opts)
    assert isinstance(why, str) and "layer range" in why
    base = [Param("llm", t, False) for t in g.tensors]
    adapter = Param("llm", TensorSpec("model.layers.0.self_attn.q_proj.lora_A.weight", (8, 64), TensorKind.LINEAR),
                    True, Origin.LORA)
    lora = TrainingOptions(engine=Engine.TORCH, lora=LoraOptions(rank=8, targets=("q_proj", "v_proj"), dropout=0.1))
    spec = generic.fit_spec(g, [*base, adapter], lora)
    assert spec.lora == {"r": 8, "targets": ["q_proj", "v_proj"], "dropout": 0.1}
    copy = Param("llm", g.tensors[0], True, Origin.COPY)
    assert isinstance(generic.fit_spec(g, [*base, adapter, copy], lora), str)


def test_lookup_remembers_what_is_missing() -> None:
    g = _group()
    spec = generic.fit_spec(g, _params(g), TrainingOptions(engine=Engine.TORCH))
    generic.forget_wanted()
    assert generic.lookup(g.config, spec, 2, 512) is None
    assert generic.lookup(g.config, spec, 4, 256) is None
    (want,) = generic.wanted()
    assert want.workloads == {(2, 512), (4, 256)} and want.anchor == (4, 512)
    pts = fit_points(*want.anchor)
    terms = fit_terms(_samples(pts, [(3,)], [(0, 0, 100, 0, 0)], (0,) * 5), ["layer"], [3], pts,
                      _samples([check_point(*want.anchor)], [(3,)], [(0, 0, 100, 0, 0)], (0,) * 5)[0])
    generic.register(g.config, spec, terms)
    assert generic.wanted() == []
    assert generic.lookup(g.config, spec, 2, 512) is terms


def test_the_phase_peak_is_its_largest_moment() -> None:
    """Two moments of backward, each exact in depth and workload: at the top layer (activations
    of every layer held) and at the bottom (every gradient alive). Which is larger changes with
    the workload; the phase figure follows the larger, which a fit of the peak itself cannot."""
    anchor = (4, 2048)
    pts = fit_points(*anchor)
    def sample(counts: tuple[int, ...], b: int, s: int) -> Sample:
        n = counts[0]
        act_top = n * 4_000 * b * s  # every layer's saved activations
        grads_bottom = n * 300_000_000  # every layer's gradient
        values = {q: 0 for q in QUANTITIES}
        for phase in ("forward", "backward"):
            for label in ("pre", "post", *(f"k0:{e}" for e in ("b0", "b1", "b2", "t0"))):
                values[f"{phase}@{label}"] = 0
                values[f"{phase}@{label}/grads"] = 0
        values["backward@k0:t0"] = act_top
        values["backward@k0:b0"] = 1_000 * b * s
        values["backward@k0:b0/grads"] = grads_bottom
        values["forward@post"] = act_top
        # The traced phase peaks (what the check compares with): the larger moment.
        values["forward"] = act_top
        bottom = (1_000 * b * s, grads_bottom)
        values["backward"], values["backward_gradients"] = max((act_top, 0), bottom, key=sum)
        return Sample(counts, b, s, values)

    samples = [sample(c, b, s) for c in [(4,), (5,)] for b, s in pts]
    check = sample((4,), *check_point(*anchor))
    terms = fit_terms(samples, ["layer"], [24], pts, check)
    assert terms.check[2] == 0.0
    for b, s in [(4, 2048), (1, 1024), (2, 1024)]:
        mem = terms.step_memory(b, s)
        top, bottom = 24 * 4_000 * b * s, 1_000 * b * s + 24 * 300_000_000
        assert mem.backward_activations + mem.backward_gradients == max(top, bottom)
        assert mem.backward_gradients == (24 * 300_000_000 if bottom > top else 0)
