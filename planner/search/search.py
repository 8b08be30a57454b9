"""Search: enumerate training setups, prune them with the estimate, rank what fits by speed.

Fourth stage of the flow (profile -> workload -> estimate -> **search** -> plan -> writers).
The space is declarative (`SearchSpace`); what the user asked for is a `Request`, what must hold
is a set of `Constraints`. Every candidate says what it gives up against the request, every
rejected one which budget it broke and by how much. docs/tune.md explains the ranking.

How the search stays fast (the whole default space for MiniCPM-o on 2x3090 in well under two
seconds): relaxations of the request are tried in the order they rank, and the next one only
while fewer than ``top`` candidates fit; each setup is first estimated without the step's
activations (a lower bound of the GPU peak and the exact host figure), and micro-batches are
tried upwards only until one does not fit (memory grows with the micro-batch).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from planner.estimate import Estimate, estimate
from planner.estimate.states import ZeroSettings
from planner.profile.architectures import ProfileError
from planner.profile.catalog import ModelSpec
from planner.profile.hardware import Cluster
from planner.speed.step_time import StepTime, step_time
from planner.units import GIB, MAX_SIZE_BYTES
from planner.workload.inventory import (
    MAX_CROPS_PER_MICRO_STEP,
    MAX_SAMPLES,
    Workload,
    check_media,
    parse_selection,
    trainable_inventory,
    untrained,
)
from planner.workload.options import (
    Attention,
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

DEFAULT_GLOBAL_BATCH = 16
"""Samples per optimizer step when the user names none: a common supervised fine-tuning batch
(LLaMA-Factory's SFT examples: 1 per device x 8 accumulation x 2 GPUs; MiniCPM-o's script: 1 x 1 x
8 GPUs = 8). Rounded up to a multiple of the GPU count."""

DEFAULT_MARGIN = 0.05
"""Fraction of each budget (GPU memory, host RAM) kept free. The estimate already counts the
allocator's usual reserve (docs/runtime.md); this is room for what it cannot see (a longer sample,
a fragmentation spike)."""

SEQ_LEN_STEP = 64
"""Shortened contexts are multiples of 64 tokens (tensor-core friendly, and a round number)."""

MINICPM_GROUPS = frozenset({"llm", "vpm", "resampler"})
"""The groups MiniCPM-o's finetune.py builds (init_audio=False, init_tts=False)."""

HOST_RAM_SIZES_GIB = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)
"""Host RAM sizes a fix suggests: what workstation and server boards are sold with."""


class GiveUp(BaseModel):
    """One thing a candidate gives up against the request.

    ``severity`` orders them (docs/tune.md): 1 changes the numerics but trains the same weights on
    the same data (pure bf16, 8-bit optimizer states); 2 trains on less of each sample (shorter
    context, fewer image slices); 3 trains fewer weights (LoRA instead of full, a frozen group).
    """

    model_config = ConfigDict(frozen=True)

    kind: str
    text: str
    severity: int = Field(ge=1, le=3)


class Request(BaseModel):
    """What the user asked for: each sample's content and what trains, as `memplan estimate`
    takes it. The search honours it first and relaxes it only when that does not fit. Its
    sample is bounded as `Workload` is (`search` checks it first)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    seq_len: int = Field(default=1024, ge=2)
    images: int = Field(default=0, ge=0)
    image_size: tuple[int, int] | None = None
    max_slice_nums: int = Field(default=9, gt=0)
    audio_seconds: float = Field(default=0.0, ge=0)
    train: tuple[str, ...] | None = None
    freeze: tuple[str, ...] = ()
    without: tuple[str, ...] = ()
    lora: LoraOptions | None = None
    precision: Precision | None = None
    """A precision the user insists on; None lets the search choose."""
    global_batch: int | None = Field(default=None, gt=0, le=MAX_SAMPLES)
    """Samples per optimizer step, all GPUs together; None: DEFAULT_GLOBAL_BATCH."""

    def workload(self, seq_len: int | None = None, max_slice_nums: int | None = None, micro_batch: int = 1,
                 grad_accum: int = 1) -> Workload:
        """The workload of one candidate."""
        return Workload(
            micro_batch=micro_batch,
            grad_accum=grad_accum,
            seq_len=seq_len or self.seq_len,
            images=self.images,
            max_slice_nums=max_slice_nums or self.max_slice_nums,
            audio_seconds=self.audio_seconds,
            **({"image_size": self.image_size} if self.image_size else {}),
        )


class Constraints(BaseModel):
    """What every candidate must keep."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    must_train: tuple[str, ...] = ()
    """Groups or parts trained fully in every candidate (no LoRA, no freezing)."""
    min_seq_len: int | None = Field(default=None, ge=2)
    """Shortest context allowed; None: half the requested one."""
    min_slice_nums: int | None = Field(default=None, gt=0)
    """Fewest image slices allowed; None: 1."""
    margin: float = Field(default=DEFAULT_MARGIN, ge=0, lt=1)
    nvme_bytes: int = Field(default=0, ge=0, le=MAX_SIZE_BYTES)
    """NVMe space per node for ZeRO-Infinity offload; 0: no NVMe offload."""
    target: Literal["builtin", "minicpm", "llamafactory"] = "builtin"
    """The trainer that will run the plan: only setups it can express are candidates.
    ``minicpm``: MiniCPM-o's finetune.py (DeepSpeed only; builds llm, vpm, resampler; its LoRA
    also trains a copy of llm.embed_tokens). ``llamafactory``: no pure bf16 with ZeRO-3."""
    max_gpu_bytes: int | None = Field(default=None, gt=0, le=MAX_SIZE_BYTES)
    """A cap below the margin's, per GPU: set after a run died of GPU out-of-memory (launch.py)."""
    max_host_bytes: int | None = Field(default=None, gt=0, le=MAX_SIZE_BYTES)
    """A cap below the margin's, per node's host RAM: set after a host out-of-memory kill."""


class SearchSpace(BaseModel):
    """The values each lever may take. The defaults are the space `memplan tune` searches."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    precisions: tuple[Precision, ...] = (Precision.AMP_BF16, Precision.PURE_BF16)
    """On GPUs without bf16, amp-bf16 becomes amp-fp16 and pure-bf16 is dropped."""
    optimizers: tuple[Optimizer, ...] = (Optimizer.ADAMW, Optimizer.ADAMW_8BIT)
    engines: tuple[tuple[Engine, ZeroStage], ...] = (
        (Engine.TORCH, ZeroStage.DISABLED),
        (Engine.DEEPSPEED, ZeroStage.OPTIMIZER_STATES),
        (Engine.DEEPSPEED, ZeroStage.GRADIENTS),
        (Engine.DEEPSPEED, ZeroStage.PARAMETERS),
    )
    offloads: tuple[Offload, ...] = (Offload.NONE, Offload.CPU, Offload.NVME)
    """NVMe only where Constraints.nvme_bytes says there is some."""
    grad_ckpt: tuple[bool, ...] = (True, False)
    attn: tuple[Attention, ...] = (Attention.SDPA,)
    micro_batches: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    """Tried upwards; each must divide the per-GPU share of the global batch."""
    seq_len_fractions: tuple[float, ...] = (1.0, 0.75, 0.5)
    lora_ranks: tuple[int, ...] = (64,)
    """MiniCPM-o's finetune_lora.sh and LLaMA-Factory's examples use 64 and 8; below 64 the adapters'
    memory is already small beside the frozen base, so lower ranks rarely decide a fit."""
    freeze_encoders: bool = True
    """Offer freezing each trained encoder (vision tower, audio encoder) that is not must-train."""


@dataclass(frozen=True)
class Candidate:
    """One setup that fits, with its estimate, its speed and what it gives up."""

    options: TrainingOptions
    workload: Workload
    estimate: Estimate
    speed: StepTime
    gives_up: tuple[GiveUp, ...]

    @property
    def name(self) -> str:
        """A canonical, readable name; ties in the ranking break on it."""
        o, w = self.options, self.workload
        if o.engine is Engine.TORCH:
            how = "torch"
        else:
            how = f"zero{int(o.zero)}"
            off = [f"{k}={v.value}" for k, v in (("opt", o.offload_optimizer), ("param", o.offload_param))
                   if v is not Offload.NONE]
            how += f"[{','.join(off)}]" if off else ""
        train = f"lora{o.lora.rank}" if o.lora else "full"
        if o.freeze and o.lora is None:
            train += "-frz:" + "+".join(o.freeze)
        parts = [how, o.precision.value, o.optimizer.value, "ckpt" if o.grad_ckpt else "nockpt",
                 f"mb{w.micro_batch}x{w.grad_accum}", f"seq{w.seq_len}"]
        if w.images:
            parts.append(f"slices{w.max_slice_nums}")
        return " ".join([*parts, train])

    @property
    def worst(self) -> int:
        """The most severe give-up (0: the request as asked)."""
        return max((g.severity for g in self.gives_up), default=0)

    @property
    def rank_key(self) -> tuple:
        """Ranking: least severe give-up first, then fewer give-ups, then faster, then the name."""
        return (self.worst, sum(g.severity for g in self.gives_up), -self.speed.tokens_per_s, self.name)


@dataclass(frozen=True)
class Rejection:
    """A setup that did not fit: which budget broke and by how much (bytes over the usable part)."""

    name: str
    budget: str
    over_bytes: int
    gpu_bytes: int
    host_bytes: int
    lower_bound: bool
    """True when only the estimate without activations was needed to reject it."""


@dataclass
class SearchResult:
    """Ranked candidates, the rejections and what was tried."""

    candidates: list[Candidate]
    rejections: list[Rejection]
    evaluated: int
    global_batch: int
    margin: float
    notes: list[str] = field(default_factory=list)

    @property
    def chosen(self) -> Candidate | None:
        """The first-ranked candidate, or None when nothing fits."""
        return self.candidates[0] if self.candidates else None


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
    relaxations = sorted(_relaxations(model, request, constraints, space), key=lambda r: r.key)
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
                                        gpu_cap, host_cap, constraints.nvme_bytes, result, bounds)
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
        if built != MINICPM_GROUPS:
            extra = ", ".join(sorted(built - MINICPM_GROUPS)) or "-"
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
            lora = LoraOptions(rank=rank, groups=tuple(lora_decoders))
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
                         nvme_cap, result, bounds) -> tuple[Workload, Estimate] | None:
    """The largest micro-batch that fits, with its estimate; None (and a rejection) when none does.

    The estimate without activations depends on the options and the accumulation only, not on the
    context or the slices: ``bounds`` remembers it per options, so a setup whose model states do
    not fit is estimated once, not once per relaxation of the data."""
    crops = request.images * _crops(request, relax.max_slice_nums)  # per sample
    sizes = [mb for mb in sorted(space.micro_batches)
             if per_gpu % mb == 0 and mb * crops <= MAX_CROPS_PER_MICRO_STEP] or [1]
    best = None
    for i, mb in enumerate(sizes):
        workload = request.workload(relax.seq_len, relax.max_slice_nums, mb, per_gpu // mb)
        if i == 0 and options not in bounds:
            bound = estimate(model, cluster, options, workload, zero, activations=False)
            result.evaluated += 1
            bounds[options] = _fits(bound, gpu_cap, host_cap, nvme_cap)
            if not bounds[options]:
                result.rejections.append(_rejection(options, workload, bound, gpu_cap, host_cap, True))
                return None
        est = estimate(model, cluster, options, workload, zero)
        result.evaluated += 1
        if not _fits(est, gpu_cap, host_cap, nvme_cap):
            if best is None:
                result.rejections.append(_rejection(options, workload, est, gpu_cap, host_cap, False))
            break
        best = (workload, est)
    return best


def _fits(est: Estimate, gpu_cap: int, host_cap: int, nvme_cap: int) -> bool:
    return est.per_gpu.total_bytes <= gpu_cap and est.host.total_bytes <= host_cap and est.nvme_bytes <= nvme_cap


def _rejection(options, workload, est: Estimate, gpu_cap: int, host_cap: int, lower: bool) -> Rejection:
    over = {"gpu": est.per_gpu.total_bytes - gpu_cap, "host": est.host.total_bytes - host_cap}
    budget = max(over, key=lambda k: over[k] / (gpu_cap if k == "gpu" else host_cap))
    name = Candidate(options, workload, est, _NO_SPEED, ()).name
    return Rejection(name, budget, over[budget], est.per_gpu.total_bytes, est.host.total_bytes, lower)


_NO_SPEED = StepTime(terms={}, flops_per_step=0.0, tokens_per_step=0)


# --- What would make the request fit ----------------------------------------------------------


@dataclass(frozen=True)
class Fix:
    """A change outside the search space (or a relaxed constraint) and the best setup it allows."""

    change: str
    candidate: Candidate


def host_ram_fix(model: ModelSpec, cluster: Cluster, request: Request, constraints: Constraints,
                 space: SearchSpace, max_severity: int) -> Fix | None:
    """The smallest common host RAM size with which a setup giving up at most ``max_severity``
    fits, and that setup.

    Host RAM only caps what fits (no estimate depends on it): when the next size up does not do,
    the largest is tried before the ones between, and when that does not do either none will."""
    sizes = [size for size in HOST_RAM_SIZES_GIB if size * GIB > cluster.host_ram_bytes]
    for i, size in enumerate(sizes):
        bigger = replace(cluster, host_ram_bytes=size * GIB)
        found = _best_within(model, bigger, request, constraints, space, max_severity)
        if found:
            return Fix(f"host RAM {cluster.host_ram_bytes / GIB:.0f} -> {size} GiB per node", found)
        if i == 0 and len(sizes) > 2:
            largest = replace(cluster, host_ram_bytes=sizes[-1] * GIB)
            if _best_within(model, largest, request, constraints, space, max_severity) is None:
                return None
    return None


def _best_within(model: ModelSpec, cluster: Cluster, request: Request, constraints: Constraints,
                 space: SearchSpace, max_severity: int) -> Candidate | None:
    """The best candidate on ``cluster`` that gives up at most ``max_severity``."""
    found = search(model, cluster, request, constraints, space, top=1).candidates
    return next((c for c in found if c.worst <= max_severity), None)


def more_gpus_fix(model: ModelSpec, cluster: Cluster, request: Request, constraints: Constraints,
                  space: SearchSpace, max_severity: int) -> Fix | None:
    """The fewest extra GPUs of the same kind (up to 8 per node, then more nodes, up to 64 in all)
    with which a setup giving up at most ``max_severity`` fits. The global batch is kept when it
    divides; else it grows to the next multiple."""
    nodes, per_node = cluster.nodes, cluster.gpus_per_node
    while nodes * per_node < 64:
        if per_node < 8:
            per_node *= 2
        else:
            nodes *= 2
        bigger = replace(cluster, nodes=nodes, gpus_per_node=per_node, note=None)
        req = request
        if request.global_batch is not None and request.global_batch % bigger.world_size:
            req = request.model_copy(update={"global_batch": -(-request.global_batch // bigger.world_size)
                                             * bigger.world_size})
        found = _best_within(model, bigger, req, constraints, space, max_severity)
        if found:
            return Fix(f"GPUs {cluster.label} -> {bigger.label}", found)
    return None


def fixes(model: ModelSpec, cluster: Cluster, request: Request, constraints: Constraints,
          space: SearchSpace, result: SearchResult) -> list[Fix]:
    """The smallest changes that make the request fit as asked (when the chosen plan gives
    something up), or make anything fit (when nothing does): more host RAM, more GPUs, and the
    constraints relaxed one at a time. Cheapest first: a constraint before hardware, RAM before
    GPUs."""
    chosen = result.chosen
    target = 0 if chosen is not None else 3
    if chosen is not None and not chosen.gives_up:
        return []
    out: list[Fix] = []
    if chosen is None:
        relaxed: list[tuple[str, Constraints]] = []
        if constraints.must_train:
            relaxed.append((f"drop --must-train {','.join(constraints.must_train)}",
                            constraints.model_copy(update={"must_train": ()})))
        if constraints.min_seq_len and constraints.min_seq_len > 256:
            relaxed.append((f"--min-seq-len {constraints.min_seq_len} -> 256",
                            constraints.model_copy(update={"min_seq_len": min(256, request.seq_len)})))
        if constraints.min_slice_nums and constraints.min_slice_nums > 1:
            relaxed.append((f"--min-slices {constraints.min_slice_nums} -> 1",
                            constraints.model_copy(update={"min_slice_nums": 1})))
        for text, c in relaxed:
            found = search(model, cluster, request, c, space, top=1).candidates
            if found:
                out.append(Fix(text, found[0]))
    for finder in (host_ram_fix, more_gpus_fix):
        fix = finder(model, cluster, request, constraints, space, target)
        if fix is not None:
            out.append(fix)
    return out


def summarize_rejections(rejections: Sequence[Rejection]) -> dict[str, int]:
    """How many setups each budget rejected."""
    out: dict[str, int] = {}
    for r in rejections:
        out[r.budget] = out.get(r.budget, 0) + 1
    return out
