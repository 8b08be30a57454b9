"""Model states: bytes of weights, gradients, master weights and optimizer states on one rank.

Pure arithmetic over the workload's parameter inventory. Every rule cites the code it mirrors
(DeepSpeed 0.19.8, torch 2.13, transformers 5.24); docs/model-states.md derives each formula and
docs/zero-internals.md records what a real DeepSpeed engine holds. Tests compare these figures
with a real engine on two CPU ranks (tests/test_zero_vs_deepspeed.py).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from planner.estimate.result import PADDING_ROW, Category, Item, Place
from planner.options import Engine, Offload, OptimizerImpl, Precision, TrainingOptions, ZeroStage
from planner.units import DType, ceil_div, round_up
from planner.workload import Param

ADAM_STATES_PER_PARAM = 2  # exp_avg, exp_avg_sq
TORCH_STEP_BYTES = 4  # torch.optim.AdamW keeps state["step"] as a float32 0-d tensor per parameter
BNB_BLOCK_SIZE = 256  # bitsandbytes blockwise 8-bit state: one fp32 absmax per 256 elements
BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes Optimizer8bit(min_8bit_size=4096): smaller tensors keep fp32 states
ADAFACTOR_RMS_BYTES = 4  # transformers Adafactor: state["RMS"], a float32 0-d tensor per parameter
ZERO12_ALIGNMENT = 2  # stage_1_and_2.py: nccl_start_alignment_factor = 2 (4-byte alignment of 16-bit)
DEFAULT_PERSISTENCE_THRESHOLD = 100_000  # stage3.py: param_persistence_threshold default (elements)


@dataclass(frozen=True)
class ZeroSettings:
    """DeepSpeed ``zero_optimization`` values that change model-state bytes.

    Attributes:
        param_persistence_threshold: ZeRO-3 keeps parameters with fewer elements than this
            gathered on every GPU (HF Trainer's "auto" is 10 x hidden_size).
    """

    param_persistence_threshold: int = DEFAULT_PERSISTENCE_THRESHOLD

    @classmethod
    def hf_auto(cls, hidden_size: int | None) -> ZeroSettings:
        """The values HF Trainer writes for "auto" (transformers integrations/deepspeed.py)."""
        if hidden_size is None:
            return cls()
        return cls(param_persistence_threshold=10 * hidden_size)


def working_dtype(options: TrainingOptions) -> DType:
    """The dtype the module's parameters are stored in during the step.

    Plain PyTorch AMP keeps fp32 weights and casts under autocast; DeepSpeed casts the module to
    16 bit (engine.py ``_configure_distributed_model``: ``self.module.bfloat16()`` / ``.half()``).
    """
    if options.precision is Precision.FP32:
        return DType.FP32
    if options.precision is Precision.PURE_BF16:
        return DType.BF16
    return options.precision.half_dtype if options.engine is Engine.DEEPSPEED else DType.FP32


def state_dtype(options: TrainingOptions) -> DType:
    """The dtype of master weights and optimizer states (bf16 only for pure bf16)."""
    return DType.BF16 if options.precision is Precision.PURE_BF16 else DType.FP32


def optimizer_state_bytes(shape: Sequence[int], impl: OptimizerImpl, dtype: DType) -> int:
    """Bytes of optimizer state one tensor of ``shape`` gets, its states stored in ``dtype``.

    Under ZeRO the optimizer sees flat 1-D partitions, so pass ``(numel,)`` there: Adafactor then
    cannot factor and keeps a full second moment.
    """
    n = 1
    for d in shape:
        n *= d
    if impl in (OptimizerImpl.TORCH_ADAMW_FORLOOP, OptimizerImpl.TORCH_ADAMW_FOREACH, OptimizerImpl.TORCH_ADAMW_FUSED):
        return ADAM_STATES_PER_PARAM * n * dtype.itemsize + TORCH_STEP_BYTES
    if impl in (OptimizerImpl.DS_FUSED_ADAM, OptimizerImpl.DS_CPU_ADAM):
        return ADAM_STATES_PER_PARAM * n * dtype.itemsize  # step is a Python int
    if impl is OptimizerImpl.BNB_ADAMW_8BIT:
        if n < BNB_MIN_8BIT_SIZE:
            return ADAM_STATES_PER_PARAM * n * DType.FP32.itemsize
        return ADAM_STATES_PER_PARAM * (n * DType.INT8.itemsize + ceil_div(n, BNB_BLOCK_SIZE) * DType.FP32.itemsize)
    if impl is OptimizerImpl.HF_ADAFACTOR:
        # transformers Adafactor(beta1=None): factored second moment for >= 2-D tensors:
        # exp_avg_sq_row = shape[:-1], exp_avg_sq_col = shape[:-2] + shape[-1:]. Always fp32: it
        # upcasts 16-bit grads first and builds the states .to(grad) (optimization.py, step()).
        f32 = DType.FP32.itemsize
        if len(shape) >= 2:
            rows = n // shape[-1]
            cols = (n // (shape[-1] * shape[-2])) * shape[-1]
            return (rows + cols) * f32 + ADAFACTOR_RMS_BYTES
        return n * f32 + ADAFACTOR_RMS_BYTES
    if impl is OptimizerImpl.TORCH_SGD:
        return n * dtype.itemsize  # momentum_buffer
    raise ValueError(f"no state rule for {impl}")


def _spread(total: int, weights: dict[str, int]) -> dict[str, int]:
    """Split ``total`` bytes over rows in proportion to ``weights`` (largest remainder, exact sum)."""
    wsum = sum(weights.values())
    if wsum == 0 or total == 0:
        return {k: 0 for k in weights}
    shares = {k: total * w // wsum for k, w in weights.items()}
    rest = total - sum(shares.values())
    by_remainder = sorted(weights, key=lambda k: (-(total * weights[k] % wsum), k))
    for k in by_remainder[:rest]:
        shares[k] += 1
    return shares


def _by_group(params: Iterable[Param], size) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for p in params:
        out[p.group] += size(p)
    return dict(out)


def _items(category: Category, place: Place, per_group: dict[str, int]) -> list[Item]:
    return [Item(g, category, place, b) for g, b in per_group.items() if b]


def model_state_items(params: Sequence[Param], options: TrainingOptions, world_size: int,
                      zero: ZeroSettings | None = None) -> list[Item]:
    """What the most loaded rank holds for weights, gradients, master weights and optimizer states.

    Args:
        params: the run's parameter inventory (``workload.trainable_inventory``).
        options: how the step runs.
        world_size: data-parallel ranks.
        zero: DeepSpeed settings that matter here (default: DeepSpeed's own defaults).

    Returns:
        Items for one rank; host items are per rank (the caller multiplies by ranks per node).
    """
    zero = zero or ZeroSettings()
    if options.engine is Engine.TORCH:
        return _torch_items(params, options)
    if options.zero is ZeroStage.PARAMETERS:
        return _zero3_items(params, options, world_size, zero)
    if options.zero is ZeroStage.DISABLED:
        return _deepspeed_stage0_items(params, options, world_size)
    return _zero12_items(params, options, world_size)


def _torch_items(params: Sequence[Param], options: TrainingOptions) -> list[Item]:
    """Plain PyTorch / DDP: every rank holds everything (DDP replicates; its gradient buckets are
    runtime buffers, not model states)."""
    wd = working_dtype(options)
    impl = options.optimizer_impl
    trained = [p for p in params if p.trainable]
    items = _items(Category.WEIGHTS, Place.GPU, _by_group(params, lambda p: p.numel * wd.itemsize))
    items += _items(Category.GRADIENTS, Place.GPU, _by_group(trained, lambda p: p.numel * wd.itemsize))
    # torch optimizers keep states in the parameter's dtype (torch.zeros_like(p)).
    if impl in (OptimizerImpl.TORCH_ADAMW_FORLOOP, OptimizerImpl.TORCH_ADAMW_FOREACH):
        # Non-fused, non-capturable AdamW puts state["step"] on the CPU (torch/optim/adam.py _init_group).
        items += _items(Category.OPTIMIZER_STATES, Place.GPU,
                        _by_group(trained, lambda p: optimizer_state_bytes(p.tensor.shape, impl, wd) - TORCH_STEP_BYTES))
        items += _items(Category.OPTIMIZER_STATES, Place.HOST, _by_group(trained, lambda p: TORCH_STEP_BYTES))
    else:
        items += _items(Category.OPTIMIZER_STATES, Place.GPU,
                        _by_group(trained, lambda p: optimizer_state_bytes(p.tensor.shape, impl, wd)))
    return items


def _flat_partition_items(params: Sequence[Param], padded: int, world_size: int) -> dict[str, int]:
    """Per-group elements of one rank's slice of a flat, padded buffer (spread by share)."""
    weights = _by_group(params, lambda p: p.numel)
    pad = padded - sum(weights.values())
    if pad:
        weights[PADDING_ROW] = pad
    return _spread(padded // world_size, weights)


def _zero12_items(params: Sequence[Param], options: TrainingOptions, world_size: int) -> list[Item]:
    """ZeRO-1/2 (stage_1_and_2.py). Trainable 16-bit params are flattened into one buffer per
    param group, padded to a multiple of ``2 * world_size`` elements; each rank owns 1/world_size
    of it as an fp32 master partition with its optimizer states. Frozen params stay as they are.
    """
    wd = working_dtype(options)
    sd = state_dtype(options)
    impl = options.optimizer_impl
    trained = [p for p in params if p.trainable]
    frozen = [p for p in params if not p.trainable]
    real = sum(p.numel for p in trained)
    padded = round_up(real, ZERO12_ALIGNMENT * world_size)
    partition = padded // world_size
    share = _flat_partition_items(trained, padded, world_size)  # elements per group on this rank
    offload = options.offload_optimizer is not Offload.NONE
    opt_place = Place.HOST if offload else Place.GPU

    # weights: the flat 16-bit buffer (bit16_groups_flat, padding included) + frozen params.
    weights = _by_group(frozen, lambda p: p.numel * wd.itemsize)
    for g, elems in _by_group(trained, lambda p: p.numel).items():
        weights[g] = weights.get(g, 0) + elems * wd.itemsize
    if padded > real:
        weights[PADDING_ROW] = (padded - real) * wd.itemsize
    items = _items(Category.WEIGHTS, Place.GPU, weights)
    # master: single_partition_of_fp32_groups, a clone of this rank's slice (always a copy here).
    items += _items(Category.MASTER_WEIGHTS, opt_place, {g: e * sd.itemsize for g, e in share.items()})
    # optimizer states on the flat fp32 partition.
    total_state = optimizer_state_bytes((partition,), impl, sd)
    items += _items(Category.OPTIMIZER_STATES, opt_place, _spread(total_state, share))
    # gradients
    items += _zero12_gradient_items(trained, share, partition, options, wd, sd)
    return items


def _zero12_gradient_items(trained, share, partition, options, wd, sd) -> list[Item]:
    if options.offload_optimizer is not Offload.NONE:
        # The fp32 partition's .grad on the host (single_partition_of_fp32_groups[i].grad).
        return _items(Category.GRADIENTS, Place.HOST, {g: e * sd.itemsize for g, e in share.items()})
    if options.zero is ZeroStage.GRADIENTS:
        # averaged_gradients: this rank's partition of the reduced gradients.
        return _items(Category.GRADIENTS, Place.GPU, {g: e * wd.itemsize for g, e in share.items()})
    # ZeRO-1: every parameter's full .grad lives until the boundary reduce-scatter.
    return _items(Category.GRADIENTS, Place.GPU, _by_group(trained, lambda p: p.numel * wd.itemsize))


def _zero3_items(params: Sequence[Param], options: TrainingOptions, world_size: int, zero: ZeroSettings) -> list[Item]:
    """ZeRO-3 (partition_parameters.py, stage3.py). Every parameter, trained or frozen, is split
    into ``ceil(numel / world_size)``-element partitions (``_padding_size``); small parameters
    below the persistence threshold also stay whole on every GPU."""
    wd = working_dtype(options)
    sd = state_dtype(options)
    impl = options.optimizer_impl
    trained = [p for p in params if p.trainable]

    def part(p: Param) -> int:
        return ceil_div(p.numel, world_size)

    param_place = {Offload.NONE: Place.GPU, Offload.CPU: Place.HOST, Offload.NVME: Place.NVME}[options.offload_param]
    opt_place = {Offload.NONE: Place.GPU, Offload.CPU: Place.HOST, Offload.NVME: Place.NVME}[options.offload_optimizer]
    items = _items(Category.WEIGHTS, param_place, _by_group(params, lambda p: part(p) * wd.itemsize))
    persistent = [p for p in params if p.numel < zero.param_persistence_threshold]
    items += _items(Category.WEIGHTS, Place.GPU, _by_group(persistent, lambda p: p.numel * wd.itemsize))
    share = _by_group(trained, part)
    # fp32_partitioned_groups_flat: shared with the 16-bit partition when dtypes and device match.
    master_is_copy = sd != wd or options.offload_optimizer is not Offload.NONE
    if master_is_copy:
        items += _items(Category.MASTER_WEIGHTS, opt_place, {g: e * sd.itemsize for g, e in share.items()})
    total_state = optimizer_state_bytes((sum(share.values()),), impl, sd)
    items += _items(Category.OPTIMIZER_STATES, opt_place, _spread(total_state, share))
    # grad_partitions_flat_buffer: gradient_accumulation_dtype (= model dtype unless set), on the
    # optimizer's device (pinned host memory when offloaded).
    grad_dtype = sd if options.offload_optimizer is not Offload.NONE else wd
    grad_place = Place.HOST if options.offload_optimizer is not Offload.NONE else Place.GPU
    items += _items(Category.GRADIENTS, grad_place, {g: e * grad_dtype.itemsize for g, e in share.items()})
    return items


def _deepspeed_stage0_items(params: Sequence[Param], options: TrainingOptions, world_size: int) -> list[Item]:
    """DeepSpeed without ZeRO: a 16-bit wrapper (FP16_Optimizer / bf16) keeps a full fp32 master
    and full optimizer states on every rank; fp32 runs the bare optimizer on the module."""
    wd = working_dtype(options)
    impl = options.optimizer_impl
    trained = [p for p in params if p.trainable]
    items = _items(Category.WEIGHTS, Place.GPU, _by_group(params, lambda p: p.numel * wd.itemsize))
    items += _items(Category.GRADIENTS, Place.GPU, _by_group(trained, lambda p: p.numel * wd.itemsize))
    if wd is not DType.FP32:
        items += _items(Category.MASTER_WEIGHTS, Place.GPU, _by_group(trained, lambda p: p.numel * DType.FP32.itemsize))
    items += _items(Category.OPTIMIZER_STATES, Place.GPU,
                    _by_group(trained, lambda p: optimizer_state_bytes((p.numel,), impl, DType.FP32)))
    return items
