"""What one decoder step holds beyond the model states: the public result (``StepMemory``, by phase)
and the closed forms of its largest forward transients (the logits and the loss, autocast's weight cache).

Estimate stage; pure arithmetic (no torch, no I/O). ``planner.estimate.decoder`` replays the step
and returns a ``StepMemory``; the closed forms serve callers that need one figure without a
replay (``planner.explain.traps``). Docs: docs/activations.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from planner.estimate.ledger import FP32, HALF, block_bytes

PHASES = ("forward", "backward", "optimizer")

# --------------------------------------------------------------------------------------------
# Public result
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepMemory:
    """Bytes one GPU holds beyond the model states during one training step, by phase.

    Each phase's figures are what is alive at that phase's own peak (the moment when
    activations + temporaries + gradients is largest within the phase). Weights, optimizer states
    and master weights are constant during a step and are *not* included; add them
    (``planner.estimate.states``) to get the phase totals. Gradients are included where the
    engine holds them as ``.grad`` (plain PyTorch): they build up during backward and are all
    alive in the optimizer step.

    Attributes:
        forward_activations: tensors born in forward and alive at the forward peak (what is saved
            for backward, the autocast weight copies, and the transient at the peak: usually the
            logits and the loss's fp32 copies).
        forward_temporaries: always 0 today (the forward allocates only activations); kept so
            the three phases read alike.
        held_for_backward: activations alive once forward and loss are done and the outputs are
            dropped (``TraceResult.after_forward``): what backward starts from.
        backward_activations: forward-born (and recomputed) tensors alive at the backward peak.
        backward_temporaries: gradients of activations and kernel outputs alive at the backward
            peak.
        backward_gradients: parameter gradients alive at the backward peak.
        optimizer_gradients: parameter gradients during the optimizer step (all of them).
        optimizer_temporaries: gradient clipping and optimizer-step temporaries at their peak.
        inputs: token ids and labels (int64), alive the whole step.
        peak_phase: the phase whose total (these figures + the constant model states) is largest.
    """

    forward_activations: int
    forward_temporaries: int
    held_for_backward: int
    backward_activations: int
    backward_temporaries: int
    backward_gradients: int
    optimizer_gradients: int
    optimizer_temporaries: int
    inputs: int
    peak_phase: str

    def phase_bytes(self, phase: str) -> int:
        """Bytes beyond the model states at ``phase``'s peak (inputs included)."""
        if phase == "forward":
            return self.forward_activations + self.forward_temporaries + self.inputs
        if phase == "backward":
            return self.backward_activations + self.backward_temporaries + self.backward_gradients + self.inputs
        if phase == "optimizer":
            return self.optimizer_gradients + self.optimizer_temporaries + self.inputs
        raise ValueError(f"phase must be one of {PHASES}; got {phase!r}")

    @property
    def peak_bytes(self) -> int:
        """Bytes beyond the model states at the step's peak."""
        return self.phase_bytes(self.peak_phase)


# --------------------------------------------------------------------------------------------
# Closed forms
# --------------------------------------------------------------------------------------------


def logits_loss_bytes(vocab: int, tokens: int, precision: str) -> tuple[int, int]:
    """(forward, backward) bytes of the logits and the loss at their peaks.

    Forward, at the loss (``ForCausalLMLoss``): the lm_head output in the compute dtype, its
    ``.float()`` copy and the fp32 ``log_softmax`` output (saved): 2 + 4 + 4 = 10 B per token x
    vocab entry under amp or pure bf16; in fp32 ``.float()`` is the logits themselves: 8 B.
    Backward, in the loss: the saved ``log_softmax``, ``nll_loss_backward``'s gradient and
    ``_log_softmax_backward_data``'s: 12 B (trace-notes, measured)."""
    c = FP32 if precision == "fp32" else HALF
    n = tokens * vocab
    fwd = block_bytes(n * c) + (block_bytes(n * FP32) if c != FP32 else 0) + block_bytes(n * FP32)
    return fwd, 3 * block_bytes(n * FP32)


def autocast_weight_cache_bytes(params: Sequence[Any]) -> int:
    """The 16-bit copies autocast keeps of trainable fp32 linear weights and biases until the
    forward ends (``cached_cast``: leaf tensors that require grad): 2 B per parameter of every
    trainable ``nn.Linear`` (embeddings and norms are not autocast ops). Frozen weights are cast at
    each use instead, and kept only where a matmul saves them."""
    from planner.profile.architectures import TensorKind

    total = 0
    for p in params:
        if p.trainable and p.tensor.kind in (TensorKind.LINEAR, TensorKind.BIAS):
            total += block_bytes(p.tensor.numel * HALF)
    return total
