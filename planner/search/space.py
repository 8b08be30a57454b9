"""The search's declarative types: what the user asked for (`Request`), what must hold
(`Constraints`), the levers and their values (`SearchSpace`), and what comes back (`Candidate`,
`Rejection`, `SearchResult`), with the defaults they fall back to.

Search stage (profile -> workload -> estimate -> **search** -> plan): `search.search` walks this
space, `fixes` looks outside it; the plan and explain read these types back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from planner.estimate import Estimate
from planner.estimate.result import Band
from planner.speed.step_time import StepTime
from planner.units import MAX_SIZE_BYTES
from planner.workload.inventory import MAX_SAMPLES, Workload
from planner.workload.options import (
    LORA_DROPOUT,
    Attention,
    Engine,
    LoraOptions,
    Offload,
    Optimizer,
    Precision,
    TrainingOptions,
    ZeroStage,
)
from planner.workload.vision import VisionRule

DEFAULT_GLOBAL_BATCH = 16
"""Samples per optimizer step when the user names none: a common supervised fine-tuning batch
(LLaMA-Factory's SFT examples: 1 per device x 8 accumulation x 2 GPUs; MiniCPM-o's script: 1 x 1 x
8 GPUs = 8). Rounded up to a multiple of the GPU count."""

DEFAULT_MARGIN = 0.05
"""Fraction of each budget (GPU memory, host RAM) kept free at the HIGH end of its band. The band
already spans the allocator's fragmentation and the workspaces (docs/runtime.md); this is room for
what it cannot see (a longer sample than planned, another process on the GPU)."""

SEQ_LEN_STEP = 64
"""Shortened contexts are multiples of 64 tokens (tensor-core friendly, and a round number)."""


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
    vision: VisionRule | None = None
    """A vision-language model's image rule (`planner.workload.vision`); None: MiniCPM's slicing."""
    train: tuple[str, ...] | None = None
    freeze: tuple[str, ...] = ()
    without: tuple[str, ...] = ()
    lora: LoraOptions | None = None
    lora_dropout: float = Field(default=LORA_DROPOUT, ge=0, lt=1)
    """The dropout of the LoRA the search may fall back to (``--lora-dropout``; ``lora`` carries its
    own): the plan writes it and the candidate is estimated with it."""
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
            vision=self.vision,
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


@dataclass(frozen=True)
class Tight:
    """A setup whose expected figures fit the usable memory (capacity less the margin) but whose
    band's high end does not: TIGHT, listed so the user sees it, never chosen.

    Attributes:
        name: the setup's canonical name (`Candidate.name`).
        gpu: per GPU, low / expected / high bytes.
        host: per node's host RAM, low / expected / high bytes.
        gpu_usable_bytes: the GPU's capacity less the margin (and any cap), bytes.
        host_usable_bytes: the same for host RAM.
    """

    name: str
    gpu: Band
    host: Band
    gpu_usable_bytes: int
    host_usable_bytes: int


@dataclass(frozen=True)
class Unknown:
    """A setup whose modelled part fits but whose estimate leaves something out (UNKNOWN): never
    ranked as fitting, listed so the user sees why."""

    name: str
    unmodeled: tuple[str, ...]
    gpu_bytes: int
    """Per GPU, the modelled part (a lower bound where the GPU side is not all modelled)."""
    host_bytes: int
    """Per node's host RAM, the modelled part."""


@dataclass
class SearchResult:
    """Ranked candidates, the rejections, the setups left UNKNOWN and what was tried."""

    candidates: list[Candidate]
    rejections: list[Rejection]
    evaluated: int
    global_batch: int
    margin: float
    notes: list[str] = field(default_factory=list)
    unknown: list[Unknown] = field(default_factory=list)
    """Setups whose modelled part fits and that are not all modelled, smallest micro-batch each."""
    tight: list[Tight] = field(default_factory=list)
    """Setups that fit at the expected figure but not at the band's high end, smallest micro-batch
    each: never candidates."""

    @property
    def chosen(self) -> Candidate | None:
        """The first-ranked candidate, or None when nothing fits."""
        return self.candidates[0] if self.candidates else None

