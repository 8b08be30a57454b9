"""The real `Device` of `planner.judge.calibrate`: CUDA through torch, this process's memory through
NVML (``nvidia-ml-py``), models from their configs through transformers, ZeRO-3 through DeepSpeed.

Judge stage. torch, pynvml, transformers and deepspeed are imported inside functions only. The
training step (`train_steps`) takes a device string, so its logic also runs on the CPU.
"""

from __future__ import annotations

import contextlib
import gc
import os
import socket
import statistics
import time
from typing import Any

from planner.judge.calibrate import DEEPSPEED_LR, DeviceInfo, StepFailed, StepSpec, deepspeed_config
from planner.workload.options import Precision

TIMED_STEPS = 3
"""Training steps per spec: the first warms up (optimizer states, autotuning), the rest are timed."""
MAX_GRAD_NORM = 1.0
"""HF Trainer's default ``max_grad_norm``: its clipping runs in every step."""
WORKSPACE_PROBE_SIDE = 4096
"""Side of the first matmul's operands: 32 MiB each in bf16, over the allocator's 10 MiB bound."""
MATMUL_SIDE = 8192
"""m = n = k of the throughput matmul: 2 x 8192^3 = 1.1 TFLOP, 128 MiB per bf16 operand."""
MATMUL_REPEATS = 20
LINK_BYTES = 256 * 2**20
"""Bytes per GPU in the all-reduce that measures the link."""


def cuda_problem() -> str | None:
    """Why calibration cannot run here (one line), or None. Needs torch (checked by the caller)."""
    import torch

    if not torch.cuda.is_available():
        build = f"a CPU-only build of torch {torch.__version__}" if torch.version.cuda is None else \
            f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA GPU"
        return f"memplan calibrate measures a real GPU, and there is none here: {build}"
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as exc:  # noqa: BLE001  ImportError or any NVMLError
        return f"memplan calibrate reads GPU memory through NVML, which is not usable here ({type(exc).__name__})"
    return None


class CudaDevice:
    """GPU 0 as torch numbers it (``CUDA_VISIBLE_DEVICES`` respected), with its NVML handle."""

    def __init__(self) -> None:
        self._handle: Any = None
        self._baseline = 0
        self.nvml_method = "process"

    def init(self) -> DeviceInfo:
        import pynvml
        import torch

        pynvml.nvmlInit()
        before = _all_used(pynvml)
        torch.cuda.init()
        torch.cuda.set_device(0)
        torch.zeros(1, device="cuda")
        torch.cuda.synchronize()
        self._handle = _handle_of(pynvml, torch.cuda.get_device_properties(0))
        index = pynvml.nvmlDeviceGetIndex(self._handle)
        self._baseline = before.get(index, 0)
        if self._process_used() is None:
            self.nvml_method = "device - baseline"
        used = self.nvml_used()
        free, total = torch.cuda.mem_get_info(0)
        context = None if used is None else max(0, used - torch.cuda.memory_reserved(0))
        return DeviceInfo(name=torch.cuda.get_device_name(0), count=torch.cuda.device_count(), memory_bytes=total,
                          free_bytes=free, torch_version=torch.__version__, cuda_version=torch.version.cuda,
                          context_init_bytes=context, nvml_method=self.nvml_method)

    def first_matmul(self) -> tuple[int, int]:
        import torch

        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        # Operands over 10 MiB get segments of their own size (the caching allocator rounds only
        # smaller requests up to a shared 20 MiB segment), so the workspace cannot hide in their slack.
        a = torch.ones((WORKSPACE_PROBE_SIDE, WORKSPACE_PROBE_SIDE), device="cuda", dtype=dtype)
        out = torch.empty_like(a)
        torch.cuda.synchronize()
        allocated, reserved = torch.cuda.memory_allocated(0), torch.cuda.memory_reserved(0)
        torch.matmul(a, a, out=out)
        torch.cuda.synchronize()
        jumps = (torch.cuda.memory_allocated(0) - allocated, torch.cuda.memory_reserved(0) - reserved)
        del a, out
        return max(0, jumps[0]), max(0, jumps[1])

    def release(self) -> None:
        import torch

        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()

    def reset_peaks(self) -> None:
        import torch

        torch.cuda.reset_peak_memory_stats(0)

    def allocated_now(self) -> int:
        import torch

        return torch.cuda.memory_allocated(0)

    def allocated_peak(self) -> int:
        import torch

        return torch.cuda.max_memory_allocated(0)

    def reserved_now(self) -> int:
        import torch

        return torch.cuda.memory_reserved(0)

    def reserved_peak(self) -> int:
        import torch

        return torch.cuda.max_memory_reserved(0)

    def nvml_used(self) -> int | None:
        if self._handle is None:
            return None
        own = self._process_used()
        if own is not None:
            return own
        import pynvml

        return max(0, int(pynvml.nvmlDeviceGetMemoryInfo(self._handle).used) - self._baseline)

    def _process_used(self) -> int | None:
        """This process's memory on the GPU as NVML lists it (None where the driver does not
        say, e.g. in a container whose process ids NVML does not see)."""
        import pynvml

        try:
            procs = pynvml.nvmlDeviceGetComputeRunningProcesses(self._handle)
        except pynvml.NVMLError:
            return None
        for proc in procs:
            if proc.pid == os.getpid() and isinstance(proc.usedGpuMemory, int):
                return int(proc.usedGpuMemory)
        return None

    def run_step(self, spec: StepSpec) -> float:
        import torch

        try:
            times = deepspeed_steps(spec, "cuda") if spec.zero3 else train_steps(spec, "cuda")
        except torch.cuda.OutOfMemoryError:
            raise StepFailed("out of memory") from None
        except StepFailed:
            raise
        except Exception as exc:  # noqa: BLE001  a step no one ran on this GPU yet: named, the matrix goes on
            raise StepFailed(f"failed: {type(exc).__name__}: {_first_line(exc)}") from None
        return statistics.median(times[1:]) if len(times) > 1 else times[0]

    def matmul_tflops(self) -> float | None:
        import torch

        if not torch.cuda.is_bf16_supported():
            return None
        a = torch.randn((MATMUL_SIDE, MATMUL_SIDE), device="cuda", dtype=torch.bfloat16)
        b = torch.randn_like(a)
        out = torch.empty_like(a)
        for _ in range(3):
            torch.matmul(a, b, out=out)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(MATMUL_REPEATS):
            torch.matmul(a, b, out=out)
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1e3
        del a, b, out
        return 2 * MATMUL_SIDE**3 * MATMUL_REPEATS / seconds / 1e12

    def link_gbytes_per_s(self) -> float | None:
        """NCCL all-reduce among every visible GPU from this one process (``torch.cuda.nccl``);
        bus bandwidth = 2 (n - 1) / n x bytes / seconds, the ring's per-link rate."""
        import torch
        import torch.cuda.nccl as nccl

        n = torch.cuda.device_count()
        if n < 2:
            return None
        bufs = [torch.ones(LINK_BYTES // 4, device=f"cuda:{i}") for i in range(n)]
        if not nccl.is_available(bufs):
            return None
        nccl.all_reduce(bufs)
        _sync_all(n)
        t0 = time.perf_counter()
        repeats = 5
        for _ in range(repeats):
            nccl.all_reduce(bufs)
        _sync_all(n)
        seconds = (time.perf_counter() - t0) / repeats
        del bufs
        return 2 * (n - 1) / n * LINK_BYTES / seconds / 1e9


def _sync_all(n: int) -> None:
    import torch

    for i in range(n):
        torch.cuda.synchronize(i)


def _all_used(pynvml: Any) -> dict[int, int]:
    """NVML's used bytes of every GPU, by NVML index."""
    return {i: int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i)).used)
            for i in range(pynvml.nvmlDeviceGetCount())}


def _handle_of(pynvml: Any, props: Any) -> Any:
    """The NVML handle of the GPU torch calls ``props`` (matched by PCI bus id: CUDA's and
    NVML's numbering differ under ``CUDA_VISIBLE_DEVICES``), else NVML's GPU 0."""
    bus = getattr(props, "pci_bus_id", None)
    if bus is not None:
        with contextlib.suppress(pynvml.NVMLError):
            domain, device = getattr(props, "pci_domain_id", 0), getattr(props, "pci_device_id", 0)
            return pynvml.nvmlDeviceGetHandleByPciBusId(f"{domain:08x}:{bus:02x}:{device:02x}.0")
    return pynvml.nvmlDeviceGetHandleByIndex(0)


def build_model(spec: StepSpec, device: str) -> Any:
    """The step's model with random weights on ``device``: fp32 (bf16 under pure-bf16), the
    attention kernel chosen, checkpointing on as HF Trainer enables it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = spec.config
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    dtype = torch.bfloat16 if spec.precision is Precision.PURE_BF16 else torch.float32
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation=spec.attn.value, dtype=dtype)
    if spec.grad_ckpt:  # as HF Trainer calls it (transformers 5.25 renamed gradient_checkpointing_enable)
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False
    model.train()
    return model


def train_steps(spec: StepSpec, device: str, steps: int = TIMED_STEPS) -> list[float]:
    """``steps`` plain-PyTorch training steps as HF Trainer runs them (loss from ``labels``, amp
    outputs upcast, gradient clipping, fused AdamW, gradients set to None); seconds of each."""
    import torch

    model = build_model(spec, device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=DEEPSPEED_LR, weight_decay=0.0, fused=True)
    ids = torch.randint(0, spec.config["vocab_size"], (spec.micro_batch, spec.seq_len), device=device)
    amp = spec.precision is Precision.AMP_BF16
    times = []
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16) if amp else contextlib.nullcontext():
            outputs = model(input_ids=ids, labels=ids)
        if amp:  # accelerate's convert_outputs_to_fp32, as HF Trainer's mixed precision runs it
            upcast = outputs.logits.float()
            del upcast
        loss = outputs.loss
        del outputs
        loss.backward()
        del loss
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        times.append(time.perf_counter() - t0)
    del model, optimizer, params, ids
    return times


def deepspeed_steps(spec: StepSpec, device: str = "cuda", steps: int = TIMED_STEPS) -> list[float]:
    """``steps`` steps of a DeepSpeed ZeRO-3 engine in this one process (world size 1; NCCL on a
    GPU, gloo on the CPU, where DeepSpeed's CPU accelerator must be the one it picked): the
    model built on the CPU and partitioned by ``deepspeed.initialize``, torch's fused AdamW as the
    client optimizer. Seconds of each.

    Raises:
        StepFailed: DeepSpeed does not import or cannot start here.
    """
    import torch

    try:
        import deepspeed
    except Exception as exc:  # noqa: BLE001  ImportError, or a broken install failing at import
        raise StepFailed(f"DeepSpeed is not usable here ({type(exc).__name__})") from None
    try:
        created = _single_process_group(deepspeed, "nccl" if device.startswith("cuda") else "gloo")
    except Exception as exc:  # noqa: BLE001  no NCCL, a port refused: the matrix goes on without it
        raise StepFailed(f"no process group for DeepSpeed: {type(exc).__name__}: {_first_line(exc)}") from None
    # ZeRO-3 replaces torch.nn.functional.linear with its own autograd function for the life of
    # the process ("This will persist unless manually reset", partition_parameters.py
    # _enable_mem_efficient_linear): every later step of the matrix, and any FLOP count, would
    # run DeepSpeed's linear. Put torch's back.
    linear = torch.nn.functional.linear
    try:
        return _zero3_steps(deepspeed, spec, device, steps)
    finally:
        torch.nn.functional.linear = linear
        if created:
            torch.distributed.destroy_process_group()


def _zero3_steps(deepspeed: Any, spec: StepSpec, device: str, steps: int) -> list[float]:
    """The engine built and stepped (`deepspeed_steps`, in its process group); seconds of each step."""
    import torch

    model = build_model(spec, "cpu")
    optimizer = torch.optim.AdamW(model.parameters(), lr=DEEPSPEED_LR, weight_decay=0.0, fused=True)
    try:
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(spec))
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as exc:  # noqa: BLE001  DeepSpeed's own failures: one line, the matrix goes on
        raise StepFailed(f"deepspeed.initialize failed: {type(exc).__name__}: {_first_line(exc)}") from None
    ids = torch.randint(0, spec.config["vocab_size"], (spec.micro_batch, spec.seq_len), device=engine.device)
    times = []
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        del loss
        _sync(device)
        times.append(time.perf_counter() - t0)
    with contextlib.suppress(AttributeError):
        engine.destroy()
    del engine, model, optimizer, ids
    return times


def _single_process_group(deepspeed: Any, backend: str) -> bool:
    """A process group of one rank unless one exists (then False); the rendezvous on a free local port."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return False
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(sock.getsockname()[1])
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    return True


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else ""
