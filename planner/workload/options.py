"""Training options: the enums and one frozen point of the search space.

Options say *how* a step is run (precision, engine, ZeRO stage, offload, optimizer); the
workload says *what* it processes. Enum order means something: ``ZeroStage.GRADIENTS >=
ZeroStage.OPTIMIZER_STATES`` reads like the ZeRO paper (Rajbhandari et al., 2020).
"""

from __future__ import annotations

from enum import IntEnum, StrEnum

from pydantic import BaseModel, ConfigDict, Field, model_validator

from planner.errors import ProfileError
from planner.profile.catalog import GpuSpec
from planner.units import DType


class Precision(StrEnum):
    """What dtypes the step computes and stores in.

    ``amp-*``: mixed precision. Under plain PyTorch the weights stay fp32 and autocast casts on
    the fly; under DeepSpeed the module is cast to 16 bit and the optimizer keeps an fp32 master
    copy. ``pure-bf16``: everything bf16, no master copy, bf16 optimizer states (LLaMA-Factory's
    ``pure_bf16``; DeepSpeed's ``bf16_master_weights_and_grads`` + ``bf16_optimizer_states``).
    """

    FP32 = "fp32"
    AMP_BF16 = "amp-bf16"
    AMP_FP16 = "amp-fp16"
    PURE_BF16 = "pure-bf16"

    @property
    def half_dtype(self) -> DType:
        """The 16-bit dtype, or fp32 for fp32."""
        return {Precision.FP32: DType.FP32, Precision.AMP_FP16: DType.FP16}.get(self, DType.BF16)


BF16_PRECISIONS = frozenset({Precision.AMP_BF16, Precision.PURE_BF16})
"""The precisions that compute in bf16: they need a GPU with hardware bf16 (`GpuSpec.bf16`)."""


class Engine(StrEnum):
    """Who runs the step: plain PyTorch (HF Trainer without DeepSpeed; DDP on several GPUs) or
    DeepSpeed."""

    TORCH = "torch"
    DEEPSPEED = "deepspeed"


class ZeroStage(IntEnum):
    """What ZeRO partitions across data-parallel ranks; each stage includes the ones before."""

    DISABLED = 0
    OPTIMIZER_STATES = 1
    GRADIENTS = 2
    PARAMETERS = 3


class Offload(StrEnum):
    """Where DeepSpeed offloads a state to."""

    NONE = "none"
    CPU = "cpu"
    NVME = "nvme"


class Optimizer(StrEnum):
    """Optimizer as the user names it; ``ADAMW`` means the engine's default AdamW."""

    ADAMW = "adamw"
    ADAMW_FORLOOP = "adamw-forloop"
    ADAMW_FOREACH = "adamw-foreach"
    ADAMW_FUSED = "adamw-fused"
    ADAMW_8BIT = "adamw-8bit"
    ADAFACTOR = "adafactor"
    SGD = "sgd"


class OptimizerImpl(StrEnum):
    """The implementation that actually runs, after the engine's defaults are applied."""

    TORCH_ADAMW_FORLOOP = "torch.optim.AdamW(foreach=False)"
    TORCH_ADAMW_FOREACH = "torch.optim.AdamW(foreach=True)"
    TORCH_ADAMW_FUSED = "torch.optim.AdamW(fused=True)"
    DS_FUSED_ADAM = "deepspeed.ops.adam.FusedAdam"
    DS_CPU_ADAM = "deepspeed.ops.adam.DeepSpeedCPUAdam"
    BNB_ADAMW_8BIT = "bitsandbytes.optim.AdamW8bit"
    HF_ADAFACTOR = "transformers.optimization.Adafactor"
    TORCH_SGD = "torch.optim.SGD(momentum>0)"


class Attention(StrEnum):
    """The LLM's attention implementation (``attn_implementation``)."""

    EAGER = "eager"  # keeps the [b, heads, s, s] scores and probabilities for backward
    SDPA = "sdpa"  # torch SDPA: flash / memory-efficient kernels on a GPU for 16-bit inputs
    FLASH_ATTENTION_2 = "flash_attention_2"


FLASH_ATTENTION_2_MIN_COMPUTE_CAPABILITY = (8, 0)
"""flash-attn 2 runs on Ampere, Ada and Hopper GPUs only (flash-attention README, "FlashAttention-2
currently supports: Ampere, Ada, or Hopper GPUs"; Turing needs FlashAttention 1.x)."""


def precision_problem(precision: Precision, gpu: GpuSpec) -> str | None:
    """Why ``gpu`` cannot run ``precision`` (one line, for a user), or None when it can.

    bf16 needs hardware bf16 (Ampere, compute capability 8.0, and newer): HF Trainer refuses
    ``--bf16`` without it (``is_torch_bf16_gpu_available``), DeepSpeed's bf16 kernels need it.
    """
    if precision in BF16_PRECISIONS and not gpu.bf16:
        return (f"--precision {precision.value}: {gpu.full_name} has no bf16 ({gpu.architecture}, compute "
                f"capability {gpu.compute_capability}; bf16 needs 8.0 or newer): use amp-fp16 or fp32")
    return None


def attention_problem(attn: Attention, precision: Precision, gpu: GpuSpec) -> str | None:
    """Why ``attn`` cannot run under ``precision`` on ``gpu`` (one line), or None when it can.

    flash-attn 2 takes fp16 and bf16 inputs only (its README: "Datatype fp16 and bf16"): under
    fp32 nothing casts them (under amp-* autocast does, and DeepSpeed's module is 16-bit).
    """
    if attn is not Attention.FLASH_ATTENTION_2:
        return None
    if precision is Precision.FP32:
        return ("--attn flash_attention_2 computes in fp16 or bf16 only, and --precision fp32 keeps the "
                "attention inputs in fp32: use --attn sdpa, or a 16-bit precision")
    if gpu.compute_capability_tuple < FLASH_ATTENTION_2_MIN_COMPUTE_CAPABILITY:
        return (f"--attn flash_attention_2 needs an Ampere or newer GPU (compute capability 8.0+); "
                f"{gpu.full_name} is {gpu.compute_capability}: use --attn sdpa")
    return None


MAX_LORA_RANK = 65_536
"""Four times the full rank of the widest released layer (Llama 3.1 405B's hidden 16,384): an
adapter of higher rank holds more than the layer itself. Common ranks are 8 to 256."""


LORA_DROPOUT = 0.05
"""memplan's LoRA dropout when none is stated: what the plans of ``memplan tune`` write (MiniCPM-o's
``finetune.py`` default, LitGPT's ``finetune/lora.py``, torchtune's 2024 Llama LoRA builders). Any
p > 0 costs the same memory (each adapter keeps a dropped copy of its input and a bool mask,
docs/activations.md) and p = 0 (peft's own default) costs less, so assuming it on never
under-estimates a run whose dropout the user did not state; ``--lora-dropout 0`` says otherwise."""


class LoraOptions(BaseModel):
    """LoRA adapters (peft): rank, targets, dropout and the groups they go into."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rank: int = Field(gt=0)
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    """Leaf module names of the linears to adapt, or ``("all-linear",)`` (peft's rule: every
    linear except the output layer)."""
    groups: tuple[str, ...] = ()
    """Groups that get adapters; empty means every decoder (LLM) group."""
    dropout: float = LORA_DROPOUT
    """peft's ``lora_dropout``, a probability in [0, 1): 0 is an ``nn.Identity``, anything above an
    ``nn.Dropout`` whose copy and mask each adapter keeps for backward (only p > 0 matters)."""

    @model_validator(mode="after")
    def _bounded(self) -> LoraOptions:
        if not 0 <= self.dropout < 1:  # also NaN
            raise ValueError(f"--lora-dropout {self.dropout}: a dropout probability is at least 0 and below 1")
        if self.rank > MAX_LORA_RANK:
            raise ValueError(f"--lora-rank {self.rank}: memplan plans for ranks up to {MAX_LORA_RANK:,} "
                             "(common ranks are 8 to 256)")
        return self


class TrainingOptions(BaseModel):
    """One point of the search space: how the step runs and what is trained.

    Group selections name groups (``vpm``) or parts of a decoder group (``llm.embed_tokens``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    engine: Engine = Engine.DEEPSPEED
    zero: ZeroStage = ZeroStage.DISABLED
    offload_optimizer: Offload = Offload.NONE
    offload_param: Offload = Offload.NONE
    precision: Precision = Precision.AMP_BF16
    optimizer: Optimizer = Optimizer.ADAMW
    train: tuple[str, ...] | None = None
    """Only these are trained (the rest frozen); None means everything not frozen."""
    freeze: tuple[str, ...] = ()
    without: tuple[str, ...] = ()
    """Groups the training script never builds (MiniCPM-o's script leaves out apm and tts)."""
    lora: LoraOptions | None = None
    grad_ckpt: bool = False
    """Non-reentrant activation checkpointing of every decoder (and vision) layer, as HF Trainer's
    ``gradient_checkpointing`` sets it up."""
    attn: Attention = Attention.SDPA
    pin_memory: bool = True
    """DeepSpeed's offload ``pin_memory``: offloaded states live in page-locked host memory."""
    zero_init: bool = True
    """ZeRO-3 builds the model under ``deepspeed.zero.Init`` (HF ``from_pretrained`` does), so no
    rank ever holds the whole model; off, every rank loads all of it into host RAM first."""

    @model_validator(mode="after")
    def _consistent(self) -> TrainingOptions:
        if self.engine is Engine.TORCH:
            if self.zero is not ZeroStage.DISABLED:
                raise ValueError("ZeRO needs --engine deepspeed")
            if self.offload_optimizer is not Offload.NONE or self.offload_param is not Offload.NONE:
                raise ValueError("offload needs --engine deepspeed")
        if self.offload_param is not Offload.NONE and self.zero is not ZeroStage.PARAMETERS:
            raise ValueError("--offload-param needs --zero 3 (only ZeRO-3 partitions parameters)")
        if self.offload_optimizer is not Offload.NONE and self.zero is ZeroStage.DISABLED:
            raise ValueError("--offload-optimizer needs --zero 1, 2 or 3")
        if self.offload_optimizer is Offload.NVME and self.zero is not ZeroStage.PARAMETERS:
            raise ValueError("--offload-optimizer nvme needs --zero 3 (ZeRO-Infinity)")
        if (
            self.engine is Engine.DEEPSPEED
            and self.precision is Precision.PURE_BF16
            and self.zero is ZeroStage.DISABLED
        ):
            raise ValueError("pure-bf16 under DeepSpeed needs ZeRO 1, 2 or 3 (bf16_master_weights_and_grads)")
        if self.offload_optimizer is not Offload.NONE and self.optimizer not in (Optimizer.ADAMW,):
            raise ValueError(
                f"an offloaded optimizer runs DeepSpeedCPUAdam; --optimizer {self.optimizer.value} cannot be offloaded"
            )
        return self

    def check_runs_on(self, gpu: GpuSpec) -> None:
        """Refuse options that ``gpu`` cannot run (a precision, an attention kernel).

        Raises:
            ProfileError: with what the GPU lacks and what to use instead.
        """
        problem = precision_problem(self.precision, gpu) or attention_problem(self.attn, self.precision, gpu)
        if problem:
            raise ProfileError(problem)

    @property
    def optimizer_impl(self) -> OptimizerImpl:
        """The optimizer implementation the engine ends up running.

        HF Trainer's default optim is ``adamw_torch_fused`` with torch >= 2.8 (transformers
        ``TrainingArguments.optim``); DeepSpeed's ``"AdamW"`` config block builds FusedAdam, or
        DeepSpeedCPUAdam when the optimizer is offloaded (``engine._configure_basic_optimizer``).
        """
        opt = self.optimizer
        if opt is Optimizer.ADAMW:
            if self.engine is Engine.TORCH:
                return OptimizerImpl.TORCH_ADAMW_FUSED
            if self.offload_optimizer is not Offload.NONE:
                return OptimizerImpl.DS_CPU_ADAM
            return OptimizerImpl.DS_FUSED_ADAM
        return {
            Optimizer.ADAMW_FORLOOP: OptimizerImpl.TORCH_ADAMW_FORLOOP,
            Optimizer.ADAMW_FOREACH: OptimizerImpl.TORCH_ADAMW_FOREACH,
            Optimizer.ADAMW_FUSED: OptimizerImpl.TORCH_ADAMW_FUSED,
            Optimizer.ADAMW_8BIT: OptimizerImpl.BNB_ADAMW_8BIT,
            Optimizer.ADAFACTOR: OptimizerImpl.HF_ADAFACTOR,
            Optimizer.SGD: OptimizerImpl.TORCH_SGD,
        }[opt]
