"""`memplan estimate` on architectures without a hand-written simulator, through the command line:
the step traced on reduced copies of the real model, the figure against a full-depth trace of the
same step, the user's cache (a second estimate traces nothing; a corrupt entry is traced again),
and a setup transformers refuses named as the reason for UNKNOWN."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from planner.cli import main
from planner.estimate import generic
from planner.judge.protocol import TraceRequest
from planner.judge.trace import trace_step
from tests.tiny_configs import write_config

pytestmark = pytest.mark.judge

GPT2 = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": 1000, "n_positions": 1024,
        "n_embd": 128, "n_layer": 6, "n_head": 4}
"""GPT-2 (no simulator here): learned positions, dropout 0.1 everywhere, conv1d projections."""

ARGS = ("--gpus", "1x3090", "--host-ram", "64GiB", "--engine", "torch", "--precision", "amp-bf16",
        "--optimizer", "adamw-fused", "--no-grad-ckpt", "--attn", "sdpa", "--micro-batch", "4", "--seq-len", "512",
        "--json")


def _estimate(folder: Path, *extra: str) -> dict:
    result = CliRunner().invoke(main, ["estimate", "--model", str(folder), *ARGS, *extra], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_traced_estimate_matches_the_full_trace_and_is_cached(tmp_path: Path) -> None:
    folder = write_config(tmp_path / "gpt2", GPT2)
    doc = _estimate(folder)
    assert doc["verdict"] == "FITS" and doc["fits"] is True and not doc["unmodeled"]
    assert any("from traces of reduced copies at 4 x 512 tokens" in n and "(from the cache)" not in n
               for n in doc["notes"])
    # The judge: a full-depth trace of the same step (plain PyTorch, HF AMP, fused AdamW, sdpa).
    res = trace_step(TraceRequest(model_config=GPT2, precision="amp-bf16", optimizer="adamw-fused", attn="sdpa",
                                  micro_batch=4, seq_len=512), timeout=600)
    got = doc["per_gpu"]["tensor_bytes"]
    assert abs(got - res.peak_bytes) <= 0.01 * res.peak_bytes, (got, res.peak_bytes)
    assert doc["per_gpu"]["peak_phase"] == res.peak_phase
    # Again, as a new process would: the terms come from the cache, the figure is the same.
    generic.forget_all()
    again = _estimate(folder)
    assert again["per_gpu"] == doc["per_gpu"]
    assert any("(from the cache)" in n for n in again["notes"])
    # A corrupt entry is never trusted: traced again, same figure.
    entries = list((Path(os.environ["MEMPLAN_CACHE_DIR"]) / "activations").glob("*.json"))
    assert len(entries) == 1
    entries[0].write_text(entries[0].read_text().replace('"forward"', '"forwarp"'))
    generic.forget_all()
    third = _estimate(folder)
    assert third["per_gpu"] == doc["per_gpu"]
    assert not any("(from the cache)" in n for n in third["notes"])


def test_a_setup_transformers_refuses_is_unknown_with_its_reason(tmp_path: Path) -> None:
    """Gemma 2's soft-capped attention has no sdpa path in transformers: the trace fails, the
    verdict is UNKNOWN and says why, and the modelled part stands as a lower bound."""
    gemma2 = {"model_type": "gemma2", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}
    doc = _estimate(write_config(tmp_path / "gemma2", gemma2))
    assert doc["fits"] is None and doc["verdict"] == "UNKNOWN"
    (gap,) = [u for u in doc["unmodeled"] if "activations of llm" in u]
    assert "traced step failed" in gap and "scaled_dot_product_attention" in gap
    assert doc["per_gpu"]["lower_bound"] is True
