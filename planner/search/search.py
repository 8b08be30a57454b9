"""Search: enumerate training setups, prune them with the estimate, rank what fits by speed.

Fourth stage of the flow (profile -> workload -> estimate -> **search** -> plan -> writers).
The space is declarative (`space.SearchSpace`); what the user asked for is a `Request`, what must
hold is a set of `Constraints` (both in `space`). Every candidate says what it gives up against the
request, every rejected one which budget it broke and by how much. docs/tune.md explains the
ranking; `fixes` looks outside the space when nothing (or nothing as asked) fits.

A candidate fits at the HIGH end of every band (`Estimate.per_gpu.band`), with the margin taken
off the capacity; a setup that fits only at the expected figure is TIGHT, listed in
``SearchResult.tight`` and never chosen. A setup whose estimate leaves something out
(`Estimate.unmodeled`) is never a candidate: when its modelled part fits it is listed in
``SearchResult.unknown``; when that part alone is over (at the expected figure) it is rejected
like any other. Contexts longer than the model's learned
absolute positions are not tried, and a note says so.

How the search stays fast (the whole default space for MiniCPM-o on 2x3090 in well under two
seconds): relaxations of the request are tried in the order they rank, and the next one only
while fewer than ``top`` candidates fit; each setup is first estimated without the step's
activations (a lower bound of the GPU peak and the exact host figure), and micro-batches are
tried upwards only until one does not fit (memory grows with the micro-batch).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from pydantic import ValidationError

from planner.errors import ProfileError
from planner.estimate import Estimate, RuntimeModel, estimate
from planner.estimate.states import ZeroSettings
from planner.profile.catalog import ModelSpec
from planner.profile.hardware import Cluster
from planner.search.space import (
    DEFAULT_GLOBAL_BATCH,
    SEQ_LEN_STEP,
    Candidate,
    Constraints,
    GiveUp,
    Rejection,
    Request,
    SearchResult,
    SearchSpace,
    Tight,
    Unknown,
)
from planner.speed.step_time import StepTime, step_time
from planner.workload.inventory import (
    MAX_CROPS_PER_MICRO_STEP,
    Workload,
    check_media,
    parse_selection,
    trainable_inventory,
    untrained,
)
from planner.workload.options import (
    Engine,
    LoraOptions,
    Offload,
    Optimizer,
    Precision,
    TrainingOptions,
    ZeroStage,
    attention_problem,
    precision_problem,
)
from planner.workload.positions import learned_positions
from planner.workload.reference import MINICPM_BUILDS


@dataclass(frozen=True)
class _Relaxation:
    seq_len: int
    max_slice_nums: int
    train: tuple[str, ...] | None
    freeze: tuple[str, ...]
    lora: LoraOptions | None
    gives_up: tuple[GiveUp, ...]

    @property
    def key(self) -> tuple[int, int]:
        return (max((g.severity for g in self.gives_up), default=0), sum(g.severity for g in self.gives_up))


def resolve_global_batch(request: Request, cluster: Cluster) -> int:
    """The global batch: the request's, or the default rounded up to a multiple of the GPU count.

    Raises:
        ProfileError: the request's global batch is not a multiple of the GPU count.
    """
    world = cluster.world_size
    if request.global_batch is None:
        return -(-DEFAULT_GLOBAL_BATCH // world) * world
    if request.global_batch % world:
        raise ProfileError(
            f"--global-batch {request.global_batch} is not a multiple of the {world} GPUs of {cluster.label}"
        )
    return request.global_batch


def search(
    model: ModelSpec,
    cluster: Cluster,
    request: Request,
    constraints: Constraints | None = None,
    space: SearchSpace | None = None,
    top: int = 5,
    runtime: RuntimeModel | None = None,
) -> SearchResult:
    """Every setup in ``space`` that fits ``cluster``, ranked; the rejected ones with why.

    Args:
        model: the model.
        cluster: GPUs, nodes and host RAM per node.
        request: what the user asked for.
        constraints: what every candidate keeps (default: nothing but the default margin).
        space: the levers and their values (default: `SearchSpace()`).
        top: keep relaxing the request until at least this many candidates fit (or nothing is
            left to relax).
        runtime: the runtime constants every estimate uses (`estimate.estimate`).

    Raises:
        ProfileError: the request names groups the model lacks, or cannot be honoured at all
            (`check_request`).
    """
    constraints = constraints or Constraints()
    space = space or SearchSpace()
    check_request(model, cluster, request)
    global_batch = resolve_global_batch(request, cluster)
    per_gpu = global_batch // cluster.world_size
    zero = ZeroSettings.hf_auto(model.hidden_size)
    gpu_cap = int(cluster.gpu_memory_bytes * (1 - constraints.margin))
    host_cap = int(cluster.host_ram_bytes * (1 - constraints.margin))
    gpu_cap = min(gpu_cap, constraints.max_gpu_bytes or gpu_cap)
    host_cap = min(host_cap, constraints.max_host_bytes or host_cap)
    result = SearchResult([], [], 0, global_batch, constraints.margin)
    hows = list(_hows(space, cluster, request, constraints, result.notes))
    no_kernel: set[str] = set()
    relaxations = _within_positions(model, _relaxations(model, request, constraints, space), result.notes)
    relaxations.sort(key=lambda r: r.key)
    first_fit = None
    bounds: dict[TrainingOptions, bool] = {}
    for relax in relaxations:
        if first_fit is not None and relax.key > first_fit and len(result.candidates) >= top:
            break
        found = False
        for how, ckpt, attn in itertools.product(hows, space.grad_ckpt, space.attn):
            if attention_problem(attn, how["precision"], cluster.gpu):
                no_kernel.add(f"{attn.value} under {how['precision'].value}")
                continue
            try:
                options = TrainingOptions(
                    **how, grad_ckpt=ckpt, attn=attn, train=relax.train, freeze=relax.freeze,
                    without=request.without, lora=relax.lora,
                )
            except ValidationError:
                continue  # an impossible combination (e.g. 8-bit Adam offloaded)
            if bounds.get(options) is False:
                continue  # its model states alone did not fit under another relaxation of the data
            best = _largest_micro_batch(model, cluster, options, request, relax, per_gpu, space, zero,
                                        gpu_cap, host_cap, constraints.nvme_bytes, result, bounds, runtime)
            if best is None:
                continue
            workload, est = best
            params = trainable_inventory(model, options)
            speed = step_time(model, params, cluster, options, workload, zero)
            gives = relax.gives_up + _precision_give_ups(options, request)
            result.candidates.append(Candidate(options, workload, est, speed, gives))
            found = True
        if found and first_fit is None:
            first_fit = relax.key
    if no_kernel:
        result.notes.append(f"not tried on {cluster.gpu.full_name}: {', '.join(sorted(no_kernel))} "
                            "(flash-attn 2 needs compute capability 8.0+ and 16-bit inputs)")
    result.candidates.sort(key=lambda c: c.rank_key)
    return result


def _within_positions(model: ModelSpec, relaxations: list[_Relaxation], notes: list[str]) -> list[_Relaxation]:
    """The relaxations whose context the model's learned absolute positions take; a note names
    the contexts left out (`workload.positions`)."""
    learned = learned_positions(model)
    if learned is None:
        return relaxations
    kept = [r for r in relaxations if r.seq_len <= learned.positions]
    skipped = sorted({r.seq_len for r in relaxations} - {r.seq_len for r in kept})
    if skipped:
        notes.append(f"contexts {', '.join(map(str, skipped))} not tried: {learned.why()}")
    return kept


def check_request(model: ModelSpec, cluster: Cluster, request: Request) -> None:
    """Refuse a request that no setup can honour.

    Raises:
        ProfileError: its sample is out of bounds, or its images and audio take more tokens than
            its context (`Workload`'s checks); the model has no encoder for its media; the GPU
            cannot run the precision it insists on.
    """
    try:
        workload = request.workload()
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        raise ProfileError(f"{loc}: {msg}" if loc else msg) from None
    check_media(model, TrainingOptions(without=request.without), workload)
    if request.precision is not None:
        problem = precision_problem(request.precision, cluster.gpu)
        if problem:
            raise ProfileError(f"{problem} (without --precision the search chooses one the GPU runs)")


def _hows(space: SearchSpace, cluster: Cluster, request: Request, constraints: Constraints,
          notes: list[str]) -> Iterator[dict]:
    """Engine, ZeRO stage, offloads, precision and optimizer combinations worth estimating.

    A precision the user insists on is the only one (`check_request` refused it if the GPU
    cannot run it); of the space's own, the GPU's substitutes are tried and ``notes`` says so."""
    precisions = [request.precision] if request.precision else list(space.precisions)
    if not request.precision and any(precision_problem(p, cluster.gpu) for p in precisions):
        runnable = [Precision.AMP_FP16 if p is Precision.AMP_BF16 else p for p in precisions
                    if p is not Precision.PURE_BF16]
        dropped = [p.value for p in precisions if p not in runnable]
        notes.append(f"{cluster.gpu.full_name} has no bf16: the search tries "
                     f"{', '.join(dict.fromkeys(p.value for p in runnable)) or 'nothing'} instead of "
                     f"{', '.join(dropped)}")
        precisions = list(dict.fromkeys(runnable))
    offloads = [o for o in space.offloads if o is not Offload.NVME or constraints.nvme_bytes]
    seen = set()
    for (engine, stage), precision, optimizer in itertools.product(space.engines, precisions, space.optimizers):
        opt_offloads = [Offload.NONE] if stage is ZeroStage.DISABLED else offloads
        param_offloads = offloads if stage is ZeroStage.PARAMETERS else [Offload.NONE]
        for off_opt, off_param in itertools.product(opt_offloads, param_offloads):
            if off_param is not Offload.NONE and off_opt is Offload.NONE:
                continue  # parameters offloaded but optimizer states on the GPU: never the better trade
            if optimizer is Optimizer.ADAMW_8BIT and stage is ZeroStage.PARAMETERS:
                continue  # bitsandbytes states on ZeRO-3's flat partitions: not a combination we can vouch for
            if constraints.target == "minicpm" and engine is Engine.TORCH:
                continue  # MiniCPM's script is always launched with a DeepSpeed config
            if (constraints.target == "llamafactory" and precision is Precision.PURE_BF16
                    and stage is ZeroStage.PARAMETERS and engine is Engine.DEEPSPEED):
                continue  # LLaMA-Factory refuses pure_bf16 with ZeRO-3
            how = dict(engine=engine, zero=stage, offload_optimizer=off_opt, offload_param=off_param,
                       precision=precision, optimizer=optimizer)
            key = tuple(sorted((k, str(v)) for k, v in how.items()))
            if key not in seen:
                seen.add(key)
                yield how


def _relaxations(model: ModelSpec, request: Request, constraints: Constraints,
                 space: SearchSpace) -> list[_Relaxation]:
    """The request, and every way to give part of it up that the constraints allow."""
    base = TrainingOptions(train=request.train, freeze=request.freeze, without=request.without, lora=request.lora)
    params = trainable_inventory(model, base)  # raises on unknown group names
    if constraints.target == "minicpm":
        built = {p.group for p in params}
        if built != MINICPM_BUILDS:
            extra = ", ".join(sorted(built - MINICPM_BUILDS)) or "-"
            raise ProfileError(f"--target minicpm: MiniCPM's finetune.py builds only llm, vpm and resampler; "
                               f"this model and request build {', '.join(sorted(built))} (--without {extra})")
    must = constraints.must_train
    must_sel = parse_selection(must, model, "--must-train") if must else set()
    missing = untrained(params, must_sel)  # must-train names must exist, and be trained fully in the request
    decoders = {g.name for g in model.groups if g.kind == "decoder"}
    if missing:
        what = missing[0]
        group = what.partition(".")[0]
        if request.lora is not None and group in (set(request.lora.groups) or decoders):
            raise ProfileError(f"--must-train {what} and --lora-rank {request.lora.rank}: LoRA freezes {group}'s "
                               f"weights (it trains adapters beside them), --must-train asks for {what} trained "
                               "fully: drop one of the two")
        raise ProfileError(f"--must-train {what}: the request does not train it fully (see --train/--freeze)")
    trained_groups = [g.name for g in model.groups if any(p.trainable and p.group == g.name for p in params)]
    must_groups = {m.partition(".")[0] for m in must if "." not in m}

    trainables: list[tuple[tuple[str, ...] | None, tuple[str, ...], LoraOptions | None, tuple[GiveUp, ...]]] = [
        (request.train, request.freeze, request.lora, ())
    ]
    lora_decoders = [g for g in trained_groups if g in decoders and g not in must_groups]
    if request.lora is None and lora_decoders:
        keep = tuple(g for g in trained_groups if g not in decoders) + tuple(
            m for m in must if "." in m and m.partition(".")[0] in decoders)
        if constraints.target == "minicpm" and "llm" in lora_decoders and "llm.embed_tokens" not in keep:
            keep += ("llm.embed_tokens",)  # finetune.py: modules_to_save = embed_tokens, resampler
        for rank in space.lora_ranks:
            lora = LoraOptions(rank=rank, groups=tuple(lora_decoders), dropout=request.lora_dropout)
            text = f"LoRA r{rank} on {', '.join(lora_decoders)}"
            trainables.append((keep, (), lora, (GiveUp(kind="lora", text=text, severity=3),)))
    if space.freeze_encoders:
        total = sum(p.numel for p in params)
        for g in trained_groups:
            share = sum(p.numel for p in params if p.group == g and p.trainable) / max(total, 1)
            if g in decoders or g in must_groups or share < 0.02:
                continue
            text = f"{g} frozen"
            trainables.append((request.train, (*request.freeze, g), request.lora,
                               (GiveUp(kind="frozen", text=text, severity=3),)))

    min_seq = constraints.min_seq_len or max(2, request.seq_len // 2)
    if min_seq > request.seq_len:
        raise ProfileError(f"--min-seq-len {min_seq} is longer than --seq-len {request.seq_len}")
    seqs = [request.seq_len]
    for f in space.seq_len_fractions:
        s = int(request.seq_len * f) // SEQ_LEN_STEP * SEQ_LEN_STEP
        if min_seq <= s < request.seq_len and s not in seqs:
            seqs.append(s)
    slices = [request.max_slice_nums]
    if request.images:
        floor = constraints.min_slice_nums or 1
        seen_crops = {_crops(request, request.max_slice_nums)}
        for n in range(request.max_slice_nums - 1, floor - 1, -1):
            crops = _crops(request, n)
            if crops not in seen_crops:  # a slice cap that cuts this image the same way is no change
                seen_crops.add(crops)
                slices.append(n)

    trainables = [t for i, t in enumerate(trainables) if i == 0 or _trains(model, request, t[:3], must_sel)]
    out = []
    for (train, freeze, lora, tgive), seq, n in itertools.product(trainables, seqs, slices):
        try:
            request.workload(seq, n)
        except ValidationError:
            continue  # a context too short for the sample's images and audio
        gives = list(tgive)
        if seq < request.seq_len:
            gives.append(GiveUp(kind="context", text=f"context {request.seq_len}->{seq}", severity=2))
        if n < request.max_slice_nums:
            gives.append(GiveUp(kind="slices", text=f"slices {request.max_slice_nums}->{n}", severity=2))
        out.append(_Relaxation(seq, n, train, freeze, lora, tuple(gives)))
    return out


def _trains(model: ModelSpec, request: Request, selection: tuple, must_sel: set) -> bool:
    """Whether a relaxation's (train, freeze, lora) trains something and every must-train part fully."""
    train, freeze, lora = selection
    try:
        params = trainable_inventory(model, TrainingOptions(train=train, freeze=freeze, without=request.without,
                                                            lora=lora))
    except ProfileError:  # e.g. freezing the only trained group: nothing left to train
        return False
    return not untrained(params, must_sel)


def _crops(request: Request, max_slice_nums: int) -> int:
    layout = request.workload(max_slice_nums=max_slice_nums).image_layout()
    return len(layout.crops) if layout else 0


def _precision_give_ups(options: TrainingOptions, request: Request) -> tuple[GiveUp, ...]:
    out = []
    if options.precision is Precision.PURE_BF16 and request.precision is not Precision.PURE_BF16:
        out.append(GiveUp(kind="precision", text="pure bf16 (no fp32 master)", severity=1))
    if options.optimizer is Optimizer.ADAMW_8BIT:
        out.append(GiveUp(kind="optimizer", text="8-bit AdamW states", severity=1))
    return tuple(out)


def _largest_micro_batch(model, cluster, options, request, relax, per_gpu, space, zero, gpu_cap, host_cap,
                         nvme_cap, result, bounds, runtime) -> tuple[Workload, Estimate] | None:
    """The largest micro-batch that fits at the high end of its bands, with its estimate; None
    (and a rejection, a TIGHT entry when it fits only at the expected figure, or an UNKNOWN entry
    when its estimate leaves something out) when none does.

    The estimate without activations depends on the options and the accumulation only, not on the
    context or the slices: ``bounds`` remembers it per options, so a setup whose model states do
    not fit is estimated once, not once per relaxation of the data. It is a lower bound: over a
    cap, the setup is out; within, it says nothing more."""
    crops = request.images * _crops(request, relax.max_slice_nums)  # per sample
    sizes = [mb for mb in sorted(space.micro_batches)
             if per_gpu % mb == 0 and mb * crops <= MAX_CROPS_PER_MICRO_STEP] or [1]
    best = None
    for i, mb in enumerate(sizes):
        workload = request.workload(relax.seq_len, relax.max_slice_nums, mb, per_gpu // mb)
        if i == 0 and options not in bounds:
            bound = estimate(model, cluster, options, workload, zero, activations=False, runtime=runtime)
            result.evaluated += 1
            bounds[options] = not _over(bound, gpu_cap, host_cap, nvme_cap)
            if not bounds[options]:
                result.rejections.append(_rejection(options, workload, bound, gpu_cap, host_cap, True))
                return None
        est = estimate(model, cluster, options, workload, zero, runtime=runtime)
        result.evaluated += 1
        if _over(est, gpu_cap, host_cap, nvme_cap):
            if best is None:
                result.rejections.append(_rejection(options, workload, est, gpu_cap, host_cap, False))
            break
        if est.unmodeled:
            if best is None:
                name = Candidate(options, workload, est, _NO_SPEED, ()).name
                result.unknown.append(Unknown(name, est.unmodeled, est.per_gpu.total_bytes, est.host.total_bytes))
            break
        if est.per_gpu.band.high > gpu_cap or est.host.band.high > host_cap:
            if best is None:
                name = Candidate(options, workload, est, _NO_SPEED, ()).name
                result.tight.append(Tight(name, est.per_gpu.band, est.host.band, gpu_cap, host_cap))
            break
        best = (workload, est)
    return best


def _over(est: Estimate, gpu_cap: int, host_cap: int, nvme_cap: int) -> bool:
    """Whether a budget is over its cap at the expected figure (DOES NOT FIT): certain for the
    high end too, and for the full estimate when this one is a lower bound."""
    return est.per_gpu.total_bytes > gpu_cap or est.host.total_bytes > host_cap or est.nvme_bytes > nvme_cap


def _rejection(options, workload, est: Estimate, gpu_cap: int, host_cap: int, lower: bool) -> Rejection:
    over = {"gpu": est.per_gpu.total_bytes - gpu_cap, "host": est.host.total_bytes - host_cap}
    budget = max(over, key=lambda k: over[k] / (gpu_cap if k == "gpu" else host_cap))
    name = Candidate(options, workload, est, _NO_SPEED, ()).name
    return Rejection(name, budget, over[budget], est.per_gpu.total_bytes, est.host.total_bytes, lower)


_NO_SPEED = StepTime(terms={}, flops_per_step=0.0, tokens_per_step=0)


def summarize_rejections(rejections: Sequence[Rejection]) -> dict[str, int]:
    """How many setups each budget rejected."""
    out: dict[str, int] = {}
    for r in rejections:
        out[r.budget] = out.get(r.budget, 0) + 1
    return out
