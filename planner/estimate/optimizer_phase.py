"""The optimizer phase's temporaries: ``clip_grad_norm_`` and one optimizer step, by implementation.

Estimate stage; pure arithmetic (no torch, no I/O). ``planner.estimate.decoder`` adds them to the
gradients alive in the optimizer phase. Docs: docs/activations.md ("Optimizer phase").
"""

from __future__ import annotations

from collections.abc import Sequence

from planner.estimate.ledger import FP32, block_bytes
from planner.workload.options import OptimizerImpl

# --------------------------------------------------------------------------------------------
# Optimizer-phase temporaries
# --------------------------------------------------------------------------------------------


def clip_grad_norm_temporaries_bytes(n_grads: int) -> int:
    """``torch.nn.utils.clip_grad_norm_`` (HF Trainer, max_grad_norm=1.0): one 0-dim norm per
    gradient (``_foreach_norm``), their ``stack`` and the total norm alive together; the clip
    coefficient then multiplies in place."""
    if n_grads == 0:
        return 0
    return n_grads * block_bytes(FP32) + block_bytes(n_grads * FP32) + block_bytes(FP32)


def optimizer_step_temporaries_bytes(
    impl: OptimizerImpl | str, trainable_numels: Sequence[int], param_item: int
) -> int:
    """Temporaries of one optimizer step at its peak (torch 2.13 torch/optim/adamw.py; transformers
    5.24 optimization.py ``Adafactor.step``).

    Args:
        impl: the optimizer implementation.
        trainable_numels: element counts of the trainable tensors, in ``model.parameters()`` order
            (the order the optimizer walks them).
        param_item: bytes per element of the parameters (and of torch optimizers' states).
    """
    impl = OptimizerImpl(impl)
    if not trainable_numels:
        return 0
    if impl is OptimizerImpl.TORCH_ADAMW_FOREACH:
        # _multi_tensor_adamw: exp_avg_sq_sqrt = torch._foreach_sqrt(exp_avg_sqs), a full copy of
        # the second moments, alive until _foreach_addcdiv_ has used it.
        return sum(block_bytes(n * param_item) for n in trainable_numels)
    if impl is OptimizerImpl.TORCH_ADAMW_FORLOOP:
        # _single_tensor_adamw: denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps): the
        # sqrt and the quotient of tensor i, while ``denom`` still holds tensor i-1's (measured).
        return _consecutive_peak([block_bytes(n * param_item) for n in trainable_numels], 2)
    if impl is OptimizerImpl.HF_ADAFACTOR:
        # update = grad**2 + eps (pow and sum alive together) while ``update`` still holds the
        # previous tensor's; a 16-bit parameter adds its fp32 grad and fp32 data copies.
        per = 2 if param_item == FP32 else 4
        return _consecutive_peak([block_bytes(n * FP32) for n in trainable_numels], per)
    # fused AdamW (torch._fused_adamw_), DeepSpeed FusedAdam / CPU Adam, bitsandbytes 8-bit and
    # SGD with momentum update in place.
    return 0


def _consecutive_peak(sizes: Sequence[int], per_current: int) -> int:
    """``max_i(sizes[i-1] + per_current * sizes[i])``: a per-tensor loop whose result variable
    keeps the previous tensor's temporary until it is rebound."""
    best, prev = 0, 0
    for b in sizes:
        best = max(best, prev + per_current * b)
        prev = b
    return best
