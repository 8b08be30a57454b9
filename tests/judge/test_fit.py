"""Any architecture: terms fitted to traces of reduced copies (planner.judge.fit) against full-depth
traces of the same step (planner.judge.trace), and against the hand-written simulator where one
exists.

Tiny widths keep each trace to a second or two; depth, layer kinds, moments and the (B, S) terms
are what is tested: GPT-2 (learned positions, dropout on: what the simulators do not model),
Gemma 2 (sliding and global layers alternating, eager attention with soft-capping,
checkpointing: two layer kinds), DeepSeek-V2 (a dense first layer, then mixture-of-experts
layers with multi-head latent attention: two kinds, one of them alone) and Qwen2 (the
simulator's own architecture). Every model is deeper than its copies, so the depth is
extrapolated, not traced.
"""

from __future__ import annotations

import pytest

from planner.estimate.decoder import decoder_step_memory
from planner.estimate.fitted import FIT_TOLERANCE, FitSpec
from planner.judge.fit import _quantities, fit_activation_terms
from planner.judge.protocol import TraceRequest
from planner.judge.trace import trace_step

pytestmark = pytest.mark.judge

GPT2 = dict(model_type="gpt2", vocab_size=1000, n_embd=128, n_layer=8, n_head=4, n_positions=2048)
GEMMA2 = dict(model_type="gemma2", vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=10,
              num_attention_heads=4, num_key_value_heads=2, head_dim=32, sliding_window=4096)
DEEPSEEK = dict(model_type="deepseek_v2", vocab_size=1000, hidden_size=128, intermediate_size=384,
                moe_intermediate_size=64, num_hidden_layers=7, num_attention_heads=4, num_key_value_heads=4,
                n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
                kv_lora_rank=32, q_lora_rank=None, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)
QWEN2 = dict(model_type="qwen2", vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2)

DEPTH = {
    # one kind, 8 layers from copies of 4 and 5
    "gpt2-amp": (GPT2, FitSpec("amp-bf16", "sdpa", False, "adamw-fused", True), (2, 512)),
    # two kinds alternating (5 sliding, 5 global), eager with soft-capping, checkpointed: copies of
    # 8 and 9 layers
    "gemma2-eager-ckpt": (GEMMA2, FitSpec("pure-bf16", "eager", True, "adamw-fused", True), (1, 512)),
    # a dense first layer and 6 mixture-of-experts layers (grouped_mm), as a DeepSpeed module:
    # copies of 5 and 6 layers
    "deepseek-v2-moe": (DEEPSEEK, FitSpec("pure-bf16", "sdpa", False, "none", False), (2, 512)),
}
KINDS = {"gpt2-amp": [8], "gemma2-eager-ckpt": [5, 5], "deepseek-v2-moe": [1, 6]}


def _full(cfg: dict, spec: FitSpec, b: int, s: int) -> dict[str, int]:
    """The full-depth model's quantities at (B, S), traced."""
    req = TraceRequest(model_config=cfg, precision=spec.precision, optimizer=spec.optimizer, grad_ckpt=spec.grad_ckpt,
                       attn=spec.attn, micro_batch=b, seq_len=s, steps=1 if spec.optimizer == "none" else 2,
                       max_grad_norm=1.0 if spec.clip else None)
    return _quantities(trace_step(req, timeout=600))


def _phase(values: dict[str, int]) -> dict[str, int]:
    return {"forward": values["forward"] + values["buffers"],
            "backward": values["backward"] + values["backward_gradients"] + values["buffers"],
            "optimizer": values["optimizer"] + values["buffers"]}


def _assert_close(name: str, terms, cfg: dict, spec: FitSpec, b: int, s: int, tol: float) -> None:  # noqa: ANN001
    want = _phase(_full(cfg, spec, b, s))
    mem = terms.step_memory(b, s)
    have = {"forward": mem.phase_bytes("forward") - mem.inputs,
            "backward": mem.phase_bytes("backward") - mem.inputs,
            "optimizer": mem.optimizer_temporaries}
    for phase, v in want.items():
        err = abs(have[phase] - v) / max(v, 1)
        assert err <= tol or abs(have[phase] - v) <= 64 * 512, (
            f"{name} at {b} x {s}, {phase}: fit {have[phase]:,} vs trace {v:,} ({err:.2%})")


@pytest.mark.parametrize("name", list(DEPTH))
def test_depth_extrapolation_matches_the_full_trace(name: str) -> None:
    """Copies of four and five layers of each kind, traced at the workload, extrapolated to the
    full depth: the full model's traced step, phase by phase, within 1%."""
    cfg, spec, anchor = DEPTH[name]
    terms = fit_activation_terms(cfg, spec, anchor, timeout=600, at_anchor_only=True)
    assert sorted(terms.kind_counts) == sorted(KINDS[name]) and len(terms.kinds) == len(KINDS[name])
    _assert_close(name, terms, cfg, spec, *anchor, tol=0.01)


def test_fit_over_workloads_matches_the_full_trace() -> None:
    """Terms fitted at five workloads around the anchor, with a check: the full model's step at a
    workload that is none of them (the smallest batch, 7/8 of the sequence), within 1%."""
    cfg = dict(GPT2, n_layer=6)
    spec = FitSpec("amp-bf16", "eager", True, "adamw-foreach", True)
    terms = fit_activation_terms(cfg, spec, (4, 512), timeout=600)
    assert terms.check[2] <= FIT_TOLERANCE and terms.covers(1, 448)
    _assert_close("gpt2-fit", terms, cfg, spec, 1, 448, tol=0.01)


def test_fit_agrees_with_the_simulator() -> None:
    """On an architecture with a hand-written simulator, the traced path gives the simulator's
    step memory (kernel workspaces the trace cannot see left out of both)."""
    spec = FitSpec("amp-bf16", "sdpa", True, "adamw-fused", True)
    b, s = 2, 1024
    terms = fit_activation_terms(QWEN2, spec, (b, s), timeout=600, at_anchor_only=True)
    fitted = terms.step_memory(b, s)
    sim = decoder_step_memory(QWEN2, micro_batch=b, seq_len=s, precision="amp-bf16", attn="sdpa", grad_ckpt=True,
                              workspaces=False)
    # The optimizer step's gradients are the ledger's model states on the traced path (the
    # simulator carries them in its optimizer phase): its temporaries are compared.
    pairs = {phase: (fitted.phase_bytes(phase), sim.phase_bytes(phase)) for phase in ("forward", "backward")}
    pairs["optimizer temporaries"] = (fitted.optimizer_temporaries, sim.optimizer_temporaries)
    pairs["held for backward"] = (fitted.held_for_backward, sim.held_for_backward)
    for what, (got, want) in pairs.items():
        assert abs(got - want) <= 0.01 * want + 64 * 512, f"{what}: traced path {got:,} vs simulator {want:,}"
