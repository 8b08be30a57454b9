"""Calibration: a short matrix of real training steps on this machine's GPU, each beside memplan's
estimate of the same step, and the fit of this machine's constants into a calibration profile.

Judge stage: it checks the estimator against a real component (the GPU itself). Everything that
touches the GPU goes through one seam, the `Device` protocol: `planner.judge.cuda_device` is the
real one (torch, NVML, transformers, DeepSpeed); the tests drive the same run with a fake one.
Nothing here imports torch.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date
from functools import cache
from typing import Any, Protocol

from planner.errors import ProfileError
from planner.estimate import estimate
from planner.estimate.states import ZeroSettings
from planner.profile.architectures import build_tensors
from planner.profile.calibration import (
    MAX_CONTEXT_BYTES,
    MAX_FRAGMENTATION,
    MAX_LINK_GBYTES_PER_S,
    MAX_TEXT,
    MAX_TFLOPS,
    MAX_WORKSPACE_BYTES,
    CalibrationProfile,
)
from planner.profile.catalog import GpuSpec, Group, ModelSpec
from planner.profile.hardware import Cluster
from planner.speed.step_time import step_time
from planner.workload.inventory import Workload, trainable_inventory
from planner.workload.options import Attention, Engine, Optimizer, Precision, TrainingOptions, ZeroStage

MODELS: dict[str, dict[str, Any]] = {
    "qwen2-100m": {
        "model_type": "qwen2", "vocab_size": 32768, "hidden_size": 768, "intermediate_size": 2048,
        "num_hidden_layers": 12, "num_attention_heads": 12, "num_key_value_heads": 4,
        "tie_word_embeddings": True, "max_position_embeddings": 4096, "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
    },
    "llama-220m": {
        "model_type": "llama", "vocab_size": 32000, "hidden_size": 1024, "intermediate_size": 2816,
        "num_hidden_layers": 12, "num_attention_heads": 16, "num_key_value_heads": 16,
        "tie_word_embeddings": False, "max_position_embeddings": 4096, "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
    },
    "qwen2.5-0.5b": {  # Qwen/Qwen2.5-0.5B-Instruct's config.json (profiles/models/qwen2.5.toml)
        "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
        "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
        "tie_word_embeddings": True, "max_position_embeddings": 32768, "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
    },
}
"""The decoders the matrix builds from their config alone (random weights, nothing downloaded):
Qwen2-style with tied embeddings and q/k/v biases (100.7 M parameters), Llama-style untied without
biases (221 M), and Qwen2.5-0.5B's real shape (494 M, a 151,936-token vocabulary)."""

_SHORT = {"qwen2-100m": "q100m", "llama-220m": "l220m", "qwen2.5-0.5b": "q0.5b"}
_PRECISION_SHORT = {Precision.FP32: "fp32", Precision.AMP_BF16: "amp", Precision.AMP_FP16: "amp16",
                    Precision.PURE_BF16: "bf16"}

MEMORY_HEADROOM = 0.8
"""A step runs only when its estimate is within this share of the GPU's free memory: a small GPU
skips the large steps instead of running out of memory."""

FRACTION_DIGITS = 4
"""Decimals kept of a fragmentation fraction (0.01 % of the tensor peak)."""
RATE_DIGITS = 2
"""Decimals kept of a TFLOP/s or GB/s figure."""

DEEPSPEED_LR = 1e-5
"""Learning rate of every step (random weights: only memory and time matter)."""


@dataclass(frozen=True)
class StepSpec:
    """One training step of the matrix, as memplan's options name it.

    Attributes:
        model: a key of `MODELS`.
        precision: fp32, amp-bf16 (fp32 weights under autocast) or pure-bf16.
        attn: the attention kernel (``eager`` keeps the scores; ``sdpa``).
        grad_ckpt: non-reentrant checkpointing of every layer, as HF Trainer sets it up.
        seq_len: tokens per sample.
        micro_batch: samples per step.
        zero3: a DeepSpeed ZeRO-3 engine (one process, world size 1) instead of plain PyTorch.
    """

    model: str
    precision: Precision
    attn: Attention = Attention.SDPA
    grad_ckpt: bool = False
    seq_len: int = 512
    micro_batch: int = 1
    zero3: bool = False

    @property
    def label(self) -> str:
        """A short name for tables: ``q100m amp sdpa 2k ck``."""
        seq = f"{self.seq_len // 1024}k" if self.seq_len % 1024 == 0 else str(self.seq_len)
        parts = [_SHORT.get(self.model, self.model), _PRECISION_SHORT[self.precision], self.attn.value, seq]
        parts += ["ck"] * self.grad_ckpt + [f"x{self.micro_batch}"] * (self.micro_batch > 1) + ["z3"] * self.zero3
        return " ".join(parts)

    @property
    def config(self) -> dict[str, Any]:
        """The model's Hugging Face config fields."""
        return dict(MODELS[self.model])

    def options(self) -> TrainingOptions:
        """memplan's options for this step: torch's fused AdamW (HF Trainer's default), also as
        the client optimizer of the ZeRO-3 engine; the model built whole, then partitioned."""
        engine = Engine.DEEPSPEED if self.zero3 else Engine.TORCH
        zero = ZeroStage.PARAMETERS if self.zero3 else ZeroStage.DISABLED
        return TrainingOptions(engine=engine, zero=zero, precision=self.precision, optimizer=Optimizer.ADAMW_FUSED,
                               grad_ckpt=self.grad_ckpt, attn=self.attn, zero_init=False)

    def workload(self) -> Workload:
        """Tokens of the step."""
        return Workload(micro_batch=self.micro_batch, seq_len=self.seq_len)

    def as_json(self) -> dict[str, Any]:
        return {"label": self.label, "model": self.model, "precision": self.precision.value,
                "attn": self.attn.value, "grad_ckpt": self.grad_ckpt, "seq_len": self.seq_len,
                "micro_batch": self.micro_batch, "engine": "deepspeed-zero3" if self.zero3 else "torch"}


_P, _A, _F = Precision, Attention, Precision.FP32
MATRIX: tuple[StepSpec, ...] = (
    StepSpec("qwen2-100m", _F, _A.EAGER, seq_len=512),
    StepSpec("qwen2-100m", _F, _A.SDPA, seq_len=512),
    StepSpec("qwen2-100m", _F, _A.SDPA, grad_ckpt=True, seq_len=1024),
    StepSpec("qwen2-100m", _P.AMP_BF16, _A.EAGER, seq_len=512),
    StepSpec("qwen2-100m", _P.AMP_BF16, _A.SDPA, seq_len=512),
    StepSpec("qwen2-100m", _P.AMP_BF16, _A.SDPA, seq_len=2048),
    StepSpec("qwen2-100m", _P.AMP_BF16, _A.SDPA, grad_ckpt=True, seq_len=2048),
    StepSpec("qwen2-100m", _P.PURE_BF16, _A.EAGER, grad_ckpt=True, seq_len=1024),
    StepSpec("qwen2-100m", _P.PURE_BF16, _A.SDPA, seq_len=1024, micro_batch=2),
    StepSpec("llama-220m", _F, _A.SDPA, seq_len=512),
    StepSpec("llama-220m", _P.AMP_BF16, _A.SDPA, seq_len=1024),
    StepSpec("llama-220m", _P.PURE_BF16, _A.SDPA, grad_ckpt=True, seq_len=2048),
    StepSpec("qwen2.5-0.5b", _P.AMP_BF16, _A.SDPA, grad_ckpt=True, seq_len=1024),
    StepSpec("qwen2.5-0.5b", _P.PURE_BF16, _A.SDPA, seq_len=2048),
    StepSpec("qwen2.5-0.5b", _P.PURE_BF16, _A.EAGER, seq_len=512),
    StepSpec("qwen2-100m", _P.AMP_BF16, _A.SDPA, seq_len=1024, zero3=True),
)
"""The matrix: three decoders, fp32 / amp-bf16 / pure-bf16, eager and sdpa, 512-2048 tokens,
checkpointing on and off, and one DeepSpeed ZeRO-3 step. About a minute on one recent GPU."""

WARMUP = StepSpec("qwen2-100m", Precision.AMP_BF16, Attention.SDPA, seq_len=128)
"""Run once before the matrix and not measured: it loads the kernels and allocates the library
workspaces (cuBLASLt's among them) that would otherwise land in the first measured step."""


def deepspeed_config(spec: StepSpec) -> dict[str, Any]:
    """The DeepSpeed config of a ZeRO-3 step, with the values HF Trainer resolves "auto" to
    (`ZeroSettings.hf_auto`), so the engine runs what the estimate assumes."""
    zero = ZeroSettings.hf_auto(spec.config["hidden_size"])
    return {
        "train_micro_batch_size_per_gpu": spec.micro_batch, "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0, "bf16": {"enabled": spec.precision is not Precision.FP32},
        "zero_optimization": {"stage": 3, "reduce_bucket_size": zero.reduce_bucket_size,
                              "stage3_prefetch_bucket_size": zero.prefetch_bucket_size,
                              "stage3_param_persistence_threshold": zero.param_persistence_threshold},
        "zero_allow_untested_optimizer": True, "steps_per_print": 10**9, "wall_clock_breakdown": False,
    }


class StepFailed(RuntimeError):
    """A step that could not run (out of memory, DeepSpeed missing); the message says why in one line."""


@dataclass(frozen=True)
class DeviceInfo:
    """The GPU as the device found it.

    Attributes:
        name: the driver's device name (``NVIDIA GeForce RTX 3090``).
        count: GPUs visible to torch.
        memory_bytes: total memory of the GPU the steps run on, bytes.
        free_bytes: free memory on it before the matrix, bytes.
        torch_version, cuda_version: ``torch.__version__``, ``torch.version.cuda``.
        context_init_bytes: NVML's used memory right after CUDA's initialization minus before and
            minus what PyTorch reserved, bytes (None without NVML).
        nvml_method: how this process's NVML figure is read (``process`` or ``device - baseline``).
    """

    name: str
    count: int
    memory_bytes: int
    free_bytes: int
    torch_version: str
    cuda_version: str | None
    context_init_bytes: int | None
    nvml_method: str = "process"


class Device(Protocol):
    """The seam: every call that touches a GPU. Sizes in bytes, times in seconds."""

    def init(self) -> DeviceInfo:
        """Initialize CUDA (and NVML); measure the context."""

    def first_matmul(self) -> tuple[int, int]:
        """Run the process's first cuBLAS matmul into a preallocated output; return the jumps of
        allocated and of reserved memory it caused (the workspace), bytes."""

    def release(self) -> None:
        """Free what the last step left cached (``torch.cuda.empty_cache``)."""

    def reset_peaks(self) -> None:
        """Start the peak counters afresh (``torch.cuda.reset_peak_memory_stats``)."""

    def allocated_now(self) -> int: ...

    def allocated_peak(self) -> int: ...

    def reserved_now(self) -> int: ...

    def reserved_peak(self) -> int: ...

    def nvml_used(self) -> int | None:
        """Memory the driver accounts to this process now, or None without NVML."""

    def run_step(self, spec: StepSpec) -> float:
        """Build the model and run a few training steps; seconds of one warm step.

        Raises:
            StepFailed: the step could not run (out of memory, DeepSpeed unusable).
        """

    def matmul_tflops(self) -> float | None:
        """Dense bf16 matmul throughput, TFLOP/s, or None without bf16."""

    def link_gbytes_per_s(self) -> float | None:
        """All-reduce bus bandwidth between the GPUs, GB/s, or None with one GPU."""


Progress = Callable[[int, int, str], None]
"""(done, total, what runs now)."""


@dataclass(frozen=True)
class Measured:
    """What one step measured, bytes and seconds."""

    allocated_base_bytes: int
    allocated_peak_bytes: int
    reserved_peak_bytes: int
    reserved_bytes: int
    nvml_used_bytes: int | None
    step_s: float

    @property
    def step_tensor_bytes(self) -> int:
        """Tensors the step itself allocated at its peak (the peak minus what was allocated before
        it: library workspaces), bytes."""
        return self.allocated_peak_bytes - self.allocated_base_bytes

    @property
    def fragmentation(self) -> float | None:
        """``max_memory_reserved / max_memory_allocated - 1``, or None when nothing was allocated."""
        return self.reserved_peak_bytes / self.allocated_peak_bytes - 1 if self.allocated_peak_bytes else None

    @property
    def beyond_reserved_bytes(self) -> int | None:
        """What the driver holds for the process beyond PyTorch's reserved memory, bytes."""
        return None if self.nvml_used_bytes is None else self.nvml_used_bytes - self.reserved_bytes


@dataclass(frozen=True)
class StepResult:
    """One step: memplan's prediction and what was measured (or why it was not run)."""

    spec: StepSpec
    predicted_tensor_bytes: int | None
    predicted_total_bytes: int | None
    predicted_s: float | None
    measured: Measured | None = None
    skipped: str | None = None

    @property
    def error(self) -> float | None:
        """(predicted - measured) / measured step tensors, or None."""
        if self.measured is None or self.predicted_tensor_bytes is None or self.measured.step_tensor_bytes <= 0:
            return None
        return (self.predicted_tensor_bytes - self.measured.step_tensor_bytes) / self.measured.step_tensor_bytes

    def as_json(self) -> dict[str, Any]:
        m = self.measured
        return {
            "step": self.spec.as_json(), "skipped": self.skipped,
            "predicted": {"tensor_bytes": self.predicted_tensor_bytes, "total_bytes": self.predicted_total_bytes,
                          "step_s": self.predicted_s},
            "measured": None if m is None else {
                "allocated_base_bytes": m.allocated_base_bytes, "allocated_peak_bytes": m.allocated_peak_bytes,
                "step_tensor_bytes": m.step_tensor_bytes, "reserved_peak_bytes": m.reserved_peak_bytes,
                "reserved_bytes": m.reserved_bytes, "nvml_used_bytes": m.nvml_used_bytes, "step_s": m.step_s,
                "fragmentation": m.fragmentation},
            "error": self.error,
        }


@dataclass(frozen=True)
class CalibrationRun:
    """The whole run: the device, every step, the probes and the profile fitted from them."""

    info: DeviceInfo
    gpu: GpuSpec
    steps: tuple[StepResult, ...]
    workspace_jumps: tuple[int, int]
    """(allocated, reserved) jump of the first matmul, bytes."""
    tflops: float | None
    link_gbytes_per_s: float | None
    profile: CalibrationProfile
    notes: tuple[str, ...] = field(default=())

    def as_json(self) -> dict[str, Any]:
        info = self.info
        return {
            "gpu": self.gpu.name, "device": {
                "name": info.name, "count": info.count, "memory_bytes": info.memory_bytes,
                "free_bytes": info.free_bytes, "torch": info.torch_version, "cuda": info.cuda_version,
                "context_init_bytes": info.context_init_bytes, "nvml_method": info.nvml_method},
            "steps": [s.as_json() for s in self.steps], "first_matmul": {
                "allocated_jump_bytes": self.workspace_jumps[0], "reserved_jump_bytes": self.workspace_jumps[1]},
            "matmul_bf16_tflops": self.tflops, "link_gbytes_per_s": self.link_gbytes_per_s,
            "profile": self.profile.model_dump(), "notes": list(self.notes),
        }


@cache
def model_spec(name: str) -> ModelSpec:
    """The ModelSpec of one of `MODELS` (one decoder group, ``llm``)."""
    cfg = MODELS[name]
    return ModelSpec(name, "memplan calibrate", (Group("llm", "decoder", tuple(build_tensors("decoder", cfg)), cfg),))


def predict(spec: StepSpec, gpu: GpuSpec, memory_bytes: int) -> tuple[int, int, float]:
    """memplan's figures for the step on one GPU: (tensor bytes at the peak, total bytes with the
    overhead, seconds per step).

    Raises:
        ProfileError: the GPU cannot run the step's options (bf16 on a GPU without it).
    """
    model, options, workload = model_spec(spec.model), spec.options(), spec.workload()
    cluster = Cluster(gpu, 1, 1, memory_bytes, 2**40)
    per_gpu = estimate(model, cluster, options, workload).per_gpu
    zero = ZeroSettings.hf_auto(model.hidden_size)
    seconds = step_time(model, trainable_inventory(model, options), cluster, options, workload, zero).total_s
    return per_gpu.tensor_bytes, per_gpu.total_bytes, seconds


def measure_step(device: Device, spec: StepSpec) -> Measured:
    """Run one step between fresh peak counters and read what it held.

    Raises:
        StepFailed: from the device.
    """
    device.release()
    device.reset_peaks()
    base = device.allocated_now()
    try:
        seconds = device.run_step(spec)
        # Sampled before release(): the step's segments are still cached, as in a training loop.
        return Measured(base, device.allocated_peak(), device.reserved_peak(), device.reserved_now(),
                        device.nvml_used(), seconds)
    finally:
        device.release()


def run_calibration(device: Device, info: DeviceInfo, gpu: GpuSpec, steps: Sequence[StepSpec] = MATRIX,
                    progress: Progress | None = None, today: date | None = None) -> CalibrationRun:
    """Run the matrix on ``device`` (a ``gpu``), each step beside its estimate, and fit the profile.

    Args:
        device: the GPU seam (`planner.judge.cuda_device.CudaDevice`, or a fake in tests), its
            ``init()`` already called (that measured the context before anything else ran).
        info: what ``init()`` returned.
        gpu: the memplan GPU profile of the device.
        steps: the steps to run (default `MATRIX`).
        progress: called before each part with (done, total, what).
        today: the date written into the profile (default: today).

    Returns:
        Every step's prediction and measurement, the probes, and the fitted profile.
    """
    say = progress or (lambda done, total, what: None)
    total = len(steps) + 3
    say(0, total, "first matmul (cuBLAS workspace)")
    jumps = device.first_matmul()
    say(1, total, "warm-up step")
    notes = []
    warm = WARMUP if gpu.bf16 else StepSpec(WARMUP.model, Precision.FP32, WARMUP.attn, seq_len=WARMUP.seq_len)
    try:
        measure_step(device, warm)
    except StepFailed as exc:
        notes.append(f"warm-up step failed ({exc}); the first step may carry library workspaces")
    results = []
    for i, spec in enumerate(steps):
        say(2 + i, total, spec.label)
        results.append(_one_step(device, spec, gpu, info))
    say(2 + len(steps), total, "bf16 matmul throughput" + (", link between GPUs" if info.count > 1 else ""))
    tflops = device.matmul_tflops() if gpu.bf16 else None
    link = device.link_gbytes_per_s() if info.count > 1 else None
    say(total, total, "done")
    profile, fit_notes = fit_profile(gpu.name, info, results, jumps, tflops, link, today or date.today())
    return CalibrationRun(info, gpu, tuple(results), jumps, tflops, link, profile, tuple(notes + fit_notes))


def _one_step(device: Device, spec: StepSpec, gpu: GpuSpec, info: DeviceInfo) -> StepResult:
    """Predict the step, and run it when the GPU can and it fits with room to spare."""
    try:
        tensors, total, seconds = predict(spec, gpu, info.memory_bytes)
    except ProfileError as exc:
        return StepResult(spec, None, None, None, skipped=str(exc))
    if total > MEMORY_HEADROOM * info.free_bytes:
        return StepResult(spec, tensors, total, seconds,
                          skipped=f"estimated {total / 2**30:.2f} GiB, over {MEMORY_HEADROOM:.0%} of the free memory")
    try:
        return StepResult(spec, tensors, total, seconds, measured=measure_step(device, spec))
    except StepFailed as exc:
        return StepResult(spec, tensors, total, seconds, skipped=str(exc))


def fit_profile(gpu: str, info: DeviceInfo, steps: Sequence[StepResult], workspace: tuple[int, int] | None,
                tflops: float | None, link: float | None, today: date) -> tuple[CalibrationProfile, list[str]]:
    """The machine's constants from the measurements:

    * ``cuda_context_bytes``: the most the driver held beyond PyTorch's reserved memory over the
      plain-PyTorch steps (context, kernels loaded lazily, library handles; the ZeRO-3 step is
      left out: its NCCL buffers are not context);
    * ``cublas_workspace_bytes``: the first matmul's jump of allocated memory (the workspace's
      exact size, held through the caching allocator), or of reserved memory where nothing was
      counted as allocated; the reserved jump alone misleads both ways: a workspace of 1-10 MiB
      gets a 20 MiB segment, and a small one can land in a segment already reserved;
    * ``fragmentation_expected`` / ``_high``: the median / largest reserved / allocated - 1 at the
      steps' peaks;
    * ``achieved_bf16_tflops``, ``link_gbytes_per_s``: as measured.

    A value outside the profile's bounds is left out (None) and said in the notes.

    Returns:
        The profile and the notes.
    """
    measured = [s.measured for s in steps if s.measured is not None]
    plain = [s.measured for s in steps if s.measured is not None and not s.spec.zero3]
    beyond = [m.beyond_reserved_bytes for m in plain if m.beyond_reserved_bytes is not None]
    frags = [f for m in measured if (f := m.fragmentation) is not None]
    notes: list[str] = []
    values = {
        "cuda_context_bytes": max(beyond) if beyond else None,
        "cublas_workspace_bytes": None if workspace is None else (workspace[0] if workspace[0] > 0 else workspace[1]),
        "fragmentation_expected": _round(statistics.median(frags) if frags else None, FRACTION_DIGITS),
        "fragmentation_high": _round(max(frags) if frags else None, FRACTION_DIGITS),
        "achieved_bf16_tflops": _round(tflops, RATE_DIGITS),
        "link_gbytes_per_s": _round(link, RATE_DIGITS),
    }
    bounds = {"cuda_context_bytes": MAX_CONTEXT_BYTES, "cublas_workspace_bytes": MAX_WORKSPACE_BYTES,
              "fragmentation_expected": MAX_FRAGMENTATION, "fragmentation_high": MAX_FRAGMENTATION,
              "achieved_bf16_tflops": MAX_TFLOPS, "link_gbytes_per_s": MAX_LINK_GBYTES_PER_S}
    positive = {"achieved_bf16_tflops", "link_gbytes_per_s"}
    values = {k: _within(v, bounds[k], notes, k, k in positive) for k, v in values.items()}
    if not measured:
        notes.append("no step ran: fragmentation and context are not measured")
    name = "".join(ch if ch.isprintable() else "?" for ch in info.name)[:100]
    source = (f"memplan calibrate: {len(measured)} of {len(steps)} steps on {info.count}x {name}, "
              f"torch {info.torch_version}, CUDA {info.cuda_version or '-'}")
    profile = CalibrationProfile(gpu=gpu, measured=today.isoformat(), torch_version=_text(info.torch_version),
                                 cuda_version=_text(info.cuda_version) if info.cuda_version else None,
                                 source=_text(source), **values)
    return profile, notes


def _round(value: float | None, digits: int) -> float | None:
    """``value`` rounded for the profile file (a measurement has no more digits than that)."""
    return None if value is None or value != value else round(value, digits)


def _within(value: float | None, high: float, notes: list[str], what: str, positive: bool = False) -> Any:
    """``value`` when it is a number in [0, high] ((0, high] with ``positive``), else None with a note."""
    if value is None:
        return None
    low_ok = value > 0 if positive else value >= 0
    if not (low_ok and value <= high):  # NaN fails both
        notes.append(f"{what}: the measured {value!r} is outside its bounds (0 to {high:g}) and is left out")
        return None
    return value


def _text(value: str) -> str:
    """A version or source string as one printable line within the profile's limit."""
    return "".join(ch if ch.isprintable() else "?" for ch in value)[:MAX_TEXT] or "-"
