"""Model states: bytes of weights, gradients, master weights and optimizer states on one rank.

Pure arithmetic over the workload's parameter inventory. Every rule cites the code it mirrors
(DeepSpeed 0.19.8, torch 2.13, transformers 5.24); docs/model-states.md derives each formula and
docs/zero-internals.md records what a real DeepSpeed engine holds. Tests compare these figures
with a real engine on two CPU ranks (tests/estimate/test_zero_vs_deepspeed.py).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from planner.estimate.result import ALWAYS, ENGINE_ROW, FROM_BACKWARD, PADDING_ROW, STEP, Category, Item, Phase, Place
from planner.units import DType, ceil_div, round_up
from planner.workload.inventory import Param
from planner.workload.options import Engine, Offload, OptimizerImpl, Precision, TrainingOptions, ZeroStage

ADAM_STATES_PER_PARAM = 2  # exp_avg, exp_avg_sq
TORCH_STEP_BYTES = 4  # torch.optim.AdamW keeps state["step"] as a float32 0-d tensor per parameter
BNB_BLOCK_SIZE = 256  # bitsandbytes blockwise 8-bit state: one fp32 absmax per 256 elements
BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes Optimizer8bit(min_8bit_size=4096): smaller tensors keep fp32 states
ADAFACTOR_RMS_BYTES = 4  # transformers Adafactor: state["RMS"], a float32 0-d tensor per parameter
ZERO12_ALIGNMENT = 2  # stage_1_and_2.py: nccl_start_alignment_factor = 2 (4-byte alignment of 16-bit)
# DeepSpeed 0.19.8 zero/config.py defaults, elements.
DS_REDUCE_BUCKET_SIZE = 500_000_000
DS_PERSISTENCE_THRESHOLD = 100_000
DS_SUB_GROUP_SIZE = 1_000_000_000
DS_PREFETCH_BUCKET_SIZE = 50_000_000
DS_MAX_LIVE_PARAMETERS = 1_000_000_000
DS_MAX_REUSE_DISTANCE = 1_000_000_000


@dataclass(frozen=True)
class ZeroSettings:
    """DeepSpeed ``zero_optimization`` values that change memory.

    Attributes:
        reduce_bucket_size: elements per gradient bucket (HF "auto": hidden_size^2).
        param_persistence_threshold: ZeRO-3 keeps parameters of at most this many elements
            gathered on every GPU (HF "auto": 10 x hidden_size).
        overlap_comm: ZeRO-1/2 double-buffer their bucket (DeepSpeed's default: on for stage 3 only).
        contiguous_gradients: gradients are copied into the bucket buffer as produced.
        sub_group_size: ZeRO-3 steps its partitions in sub-groups of this many elements.
        prefetch_bucket_size: ZeRO-3 gathers this many elements ahead (HF "auto": 0.9 hidden^2).
        max_live_parameters: ZeRO-3's cap on gathered elements.
        max_reuse_distance: ZeRO-3 keeps a gathered parameter when its next use is nearer than
            this many elements (``stage3_max_reuse_distance``).
    """

    reduce_bucket_size: int = DS_REDUCE_BUCKET_SIZE
    param_persistence_threshold: int = DS_PERSISTENCE_THRESHOLD
    overlap_comm: bool = False
    contiguous_gradients: bool = True
    sub_group_size: int = DS_SUB_GROUP_SIZE
    prefetch_bucket_size: int = DS_PREFETCH_BUCKET_SIZE
    max_live_parameters: int = DS_MAX_LIVE_PARAMETERS
    max_reuse_distance: int = DS_MAX_REUSE_DISTANCE

    @classmethod
    def hf_auto(cls, hidden_size: int | None) -> ZeroSettings:
        """What HF Trainer writes for "auto" (transformers integrations/deepspeed.py L232-L242)."""
        if hidden_size is None:
            return cls()
        return cls(
            reduce_bucket_size=hidden_size * hidden_size,
            param_persistence_threshold=10 * hidden_size,
            prefetch_bucket_size=int(0.9 * hidden_size * hidden_size),
        )


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


# When each category is alive unless a rule says otherwise: weights from loading on; master and
# optimizer states from the engine's setup on (they exist before the first forward); gradients
# from backward to the end of the optimizer step (set to None / freed by step()).
_DEFAULT_PHASES = {
    Category.WEIGHTS: ALWAYS,
    Category.MASTER_WEIGHTS: STEP,
    Category.OPTIMIZER_STATES: STEP,
    Category.GRADIENTS: FROM_BACKWARD,
    Category.BUFFERS: STEP,
    Category.TEMPORARIES: frozenset({Phase.OPTIMIZER}),
}


def _items(
    category: Category, place: Place, per_group: dict[str, int], phases: frozenset[Phase] | None = None
) -> list[Item]:
    alive = phases if phases is not None else _DEFAULT_PHASES[category]
    return [Item(g, category, place, b, alive) for g, b in per_group.items() if b]


def model_state_items(
    params: Sequence[Param],
    options: TrainingOptions,
    world_size: int,
    zero: ZeroSettings | None = None,
    grad_accum: int = 1,
) -> list[Item]:
    """What the most loaded rank holds for weights, gradients, master weights and optimizer states.

    Args:
        params: the run's parameter inventory (``workload.trainable_inventory``).
        options: how the step runs.
        world_size: data-parallel ranks.
        zero: DeepSpeed settings that matter here (default: DeepSpeed's own defaults).
        grad_accum: micro-steps per optimizer step (ZeRO-2 keeps more gradient buffers when > 1).

    Returns:
        Items for one rank; host items are per rank (the caller multiplies by ranks per node).
    """
    zero = zero or ZeroSettings()
    if options.engine is Engine.TORCH:
        items = _torch_items(params, options)
    elif options.zero is ZeroStage.PARAMETERS:
        items = _zero3_items(params, options, world_size, zero)
    elif options.zero is ZeroStage.DISABLED:
        items = _deepspeed_stage0_items(params, options)
    else:
        items = _zero12_items(params, options, world_size, zero, grad_accum)
    if grad_accum > 1:
        # Accumulated gradients stay alive through the forward and backward of the next
        # micro-steps (autograd's .grad +=, ZeRO-1's full grads, ZeRO-2's all_grad_tensors).
        items = [Item(it.group, it.category, it.place, it.nbytes, STEP) if it.phases == FROM_BACKWARD
                 and it.category is Category.GRADIENTS else it for it in items]
    return items


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
        items += _items(
            Category.OPTIMIZER_STATES,
            Place.GPU,
            _by_group(trained, lambda p: optimizer_state_bytes(p.tensor.shape, impl, wd) - TORCH_STEP_BYTES),
        )
        items += _items(Category.OPTIMIZER_STATES, Place.HOST, _by_group(trained, lambda p: TORCH_STEP_BYTES))
    else:
        items += _items(
            Category.OPTIMIZER_STATES,
            Place.GPU,
            _by_group(trained, lambda p: optimizer_state_bytes(p.tensor.shape, impl, wd)),
        )
    return items


def _zero12_layout(trained: Sequence[Param], world_size: int) -> tuple[int, int, list[int], list[int]]:
    """The flat 16-bit buffer of one param group (stage_1_and_2.py L441-L446, L540-L551, L2579-L2611).

    Returns:
        (padded numel ``Flat``, partition numel ``P``, per-rank padding, per-rank ``G_r``: the full
        numels of the parameters that overlap rank r's partition, a straddling one on both ranks).
    """
    real = sum(p.numel for p in trained)
    flat = round_up(real, ZERO12_ALIGNMENT * world_size)
    part = flat // world_size
    pads = [min(part, max(0, (r + 1) * part - max(real, r * part))) for r in range(world_size)]
    overlap = [0] * world_size
    offset = 0
    for p in trained:
        if p.numel:
            first, last = offset // part, (offset + p.numel - 1) // part
            for r in range(first, last + 1):
                overlap[r] += p.numel
        offset += p.numel
    return flat, part, pads, overlap


def _place(offload: Offload) -> Place:
    return {Offload.NONE: Place.GPU, Offload.CPU: Place.HOST, Offload.NVME: Place.NVME}[offload]


def _zero12_items(
    params: Sequence[Param], options: TrainingOptions, world_size: int, zero: ZeroSettings, grad_accum: int
) -> list[Item]:
    """ZeRO-1/2 (stage_1_and_2.py; docs/zero-internals.md section 4), one param group as HF Trainer
    builds it when the DeepSpeed config has an optimizer section.

    Trainable 16-bit params are flattened into one buffer padded to a multiple of ``2 * world``
    elements; rank r owns ``P = Flat / world`` of it as a master partition with its optimizer
    states. Frozen params stay whole on every GPU. Every rank's partition is equal; gradients
    depend on which parameters overlap the partition, so each rank is computed and the most
    loaded one is reported.
    """
    wd, sd, impl = working_dtype(options), state_dtype(options), options.optimizer_impl
    trained = [p for p in params if p.trainable]
    frozen = [p for p in params if not p.trainable]
    flat, part, pads, overlap = _zero12_layout(trained, world_size)
    share = _by_group(trained, lambda p: p.numel)  # a group's share of each flat slice
    if flat > sum(share.values()):
        share[PADDING_ROW] = flat - sum(share.values())
    rank_share = _spread(part, share)  # elements per row in one rank's slice (spread by share)
    offload = options.offload_optimizer is not Offload.NONE
    opt_place = _place(options.offload_optimizer)

    weights = _by_group(frozen, lambda p: p.numel * wd.itemsize)
    for g, elems in share.items():  # bit16_groups_flat: the whole padded buffer on every GPU
        weights[g] = weights.get(g, 0) + elems * wd.itemsize
    items = _items(Category.WEIGHTS, Place.GPU, weights)
    items += _items(Category.MASTER_WEIGHTS, opt_place, {g: e * sd.itemsize for g, e in rank_share.items()})
    items += _items(Category.OPTIMIZER_STATES, opt_place, _spread(optimizer_state_bytes((part,), impl, sd), rank_share))

    largest = max((p.numel for p in trained), default=0)
    if offload:
        # single_partition_of_fp32_groups[g].grad, pinned, persistent (L934-L956); with gas > 1
        # stage 2 also keeps accumulated_grads_in_cpu: G_r model-dtype elements (L1809-L1857).
        r = max(range(world_size), key=lambda i: overlap[i])
        grads = {g: e * sd.itemsize for g, e in rank_share.items()}
        if options.zero is ZeroStage.GRADIENTS and grad_accum > 1:
            grads[ENGINE_ROW] = overlap[r] * wd.itemsize
        items += _items(Category.GRADIENTS, Place.HOST, grads, STEP)  # allocated at initialize(), kept
        # the 16-bit staging copy of the partition (L566-L576) and the temp grad buffers of the
        # largest parameter, one pinned on the host and one on the GPU (L653-L661)
        items += _items(Category.BUFFERS, Place.HOST, {ENGINE_ROW: (part + largest) * wd.itemsize})
        items += _items(Category.BUFFERS, Place.GPU, {ENGINE_ROW: largest * wd.itemsize})
        return items
    if options.zero is ZeroStage.GRADIENTS:
        # grads_in_partition (G_r, one buffer) + averaged_gradients' zero pad, alive from the end of
        # backward to step(); with gas > 1 the previous micro-steps' partition stays beside it.
        per_rank = [(overlap[r] * (2 if grad_accum > 1 else 1) + pads[r]) for r in range(world_size)]
    else:
        # ZeRO-1: every full 16-bit .grad lives until the boundary reduction (engine.py L3089-L3092).
        per_rank = [sum(p.numel for p in trained)] * world_size
    grad_elems = max(per_rank)
    items += _items(Category.GRADIENTS, Place.GPU, _spread(grad_elems * wd.itemsize, share))
    # step(): each group's flat partition gradient cast to the master dtype (L3117-L3126)
    items += _items(Category.TEMPORARIES, Place.GPU, {ENGINE_ROW: part * sd.itemsize})
    if options.zero is ZeroStage.GRADIENTS or options.zero is ZeroStage.OPTIMIZER_STATES:
        # IPG bucket(s), reduce_bucket_size elements each, while backward runs (x2 with overlap_comm)
        buckets = 2 if zero.overlap_comm else 1
        ipg = {ENGINE_ROW: buckets * zero.reduce_bucket_size * wd.itemsize}
        items += _items(Category.BUFFERS, Place.GPU, ipg, frozenset({Phase.BACKWARD}))  # freed in the epilogue
    return items


def _zero3_items(params: Sequence[Param], options: TrainingOptions, world_size: int, zero: ZeroSettings) -> list[Item]:
    """ZeRO-3 (partition_parameters.py, stage3.py; docs/zero-internals.md section 7). Every
    parameter, trained or frozen, is split into ``ceil(numel / world)``-element partitions
    (``_padding_size``); parameters of at most ``param_persistence_threshold`` elements also
    stay gathered on every GPU, in a buffer padded to a multiple of the world size."""
    wd, sd, impl = working_dtype(options), state_dtype(options), options.optimizer_impl
    trained = [p for p in params if p.trainable]
    frozen = [p for p in params if not p.trainable]

    def part(p: Param) -> int:
        return ceil_div(p.numel, world_size)

    def persistent(p: Param) -> bool:
        return p.numel <= zero.param_persistence_threshold

    param_place = _place(options.offload_param)
    opt_place = _place(options.offload_optimizer)
    offload_opt = options.offload_optimizer is not Offload.NONE
    # Trainable partitions: lp_param_buffer on the GPU, or one pinned host buffer with offload_param.
    items = _items(Category.WEIGHTS, param_place, _by_group(trained, lambda p: part(p) * wd.itemsize))
    # Frozen partitions: on the offload device unless persistent (those stay on the GPU).
    items += _items(
        Category.WEIGHTS,
        param_place,
        _by_group([p for p in frozen if not persistent(p)], lambda p: part(p) * wd.itemsize),
    )
    items += _items(
        Category.WEIGHTS, Place.GPU, _by_group([p for p in frozen if persistent(p)], lambda p: part(p) * wd.itemsize)
    )
    # Persistent parameters' gathered copies, ceil_to(n, world) elements each (L1376-L1402);
    # step() releases them first and gathers them again after (stage3.py L2878, L2839-L2841).
    items += _items(
        Category.WEIGHTS,
        Place.GPU,
        _by_group([p for p in params if persistent(p)], lambda p: round_up(p.numel, world_size) * wd.itemsize),
        frozenset({Phase.FORWARD, Phase.BACKWARD}),
    )
    share = _by_group(trained, part)
    total = sum(share.values())
    # fp32_partitioned_groups_flat: always a copy. stage3.py L1162-L1167 would share the 16-bit
    # partition when dtype and device match, but compares a torch.device with the device *name*
    # (self.device, a str, L333), which is never equal: measured for pure bf16 and fp32.
    items += _items(Category.MASTER_WEIGHTS, opt_place, {g: e * sd.itemsize for g, e in share.items()})
    items += _items(Category.OPTIMIZER_STATES, opt_place, _spread(optimizer_state_bytes((total,), impl, sd), share))
    # grad_partitions_flat_buffer in the gradient-accumulation dtype (= model dtype) on
    # self.device: the GPU, or the host for ANY optimizer offload, NVMe included (L333: "cpu"
    # whenever self.offload_optimizer, which L823-L826 set for device nvme too; L791-L795).
    grad_place = Place.HOST if offload_opt else Place.GPU
    items += _items(Category.GRADIENTS, grad_place, {g: e * wd.itemsize for g, e in share.items()}, STEP)
    if offload_opt:
        # The master partition's .grad (sd bytes): a pinned host buffer per sub-group (L1337-L1341);
        # with the optimizer on NVMe, swapped out to the drive with the optimizer states
        # (L1448-L1464) and dropped after each step (L2780-L2781).
        items += _items(Category.GRADIENTS, opt_place, {g: e * sd.itemsize for g, e in share.items()}, STEP)
    if zero.contiguous_gradients:  # the IPG buffer, persistent, on the GPU (L779-L784)
        items += _items(Category.BUFFERS, Place.GPU, {ENGINE_ROW: zero.reduce_bucket_size * wd.itemsize})
    if not offload_opt:
        # step(): each sub-group's gradient in the master dtype, one sub-group at a time (L2683-L2741)
        first = min(total, zero.sub_group_size)
        items += _items(Category.TEMPORARIES, Place.GPU, {ENGINE_ROW: first * sd.itemsize})
    return items


def _deepspeed_stage0_items(params: Sequence[Param], options: TrainingOptions) -> list[Item]:
    """DeepSpeed without ZeRO (docs/zero-internals.md section 6): 16-bit runs wrap the optimizer
    in FP16_Optimizer (bf16 too), which keeps an unpadded flat 16-bit copy, a full fp32 master
    and full optimizer states on every rank; fp32 runs the bare optimizer on the module."""
    wd, impl = working_dtype(options), options.optimizer_impl
    trained = [p for p in params if p.trainable]
    items = _items(Category.WEIGHTS, Place.GPU, _by_group(params, lambda p: p.numel * wd.itemsize))
    items += _items(Category.GRADIENTS, Place.GPU, _by_group(trained, lambda p: p.numel * wd.itemsize))
    if wd is not DType.FP32:
        items += _items(Category.MASTER_WEIGHTS, Place.GPU, _by_group(trained, lambda p: p.numel * DType.FP32.itemsize))
        total = sum(p.numel for p in trained)
        states = _spread(optimizer_state_bytes((total,), impl, DType.FP32), _by_group(trained, lambda p: p.numel))
    else:
        states = _by_group(trained, lambda p: optimizer_state_bytes((p.numel,), impl, DType.FP32))
    items += _items(Category.OPTIMIZER_STATES, Place.GPU, states)
    if wd is not DType.FP32:  # FP16_Optimizer.step(): an fp32 flat gradient per group (L282-L314)
        total = sum(p.numel for p in trained)
        items += _items(Category.TEMPORARIES, Place.GPU, {ENGINE_ROW: total * DType.FP32.itemsize})
    return items
