"""The judge: trace one real training step of a transformers model with fake tensors.

Our estimator predicts the memory of one training step by arithmetic. This module measures the
same step by running it: the real ``AutoModelForCausalLM`` class, the real forward (loss from
``labels`` exactly as HF Trainer computes it), ``loss.backward()``, HF Trainer's gradient
clipping and the real ``torch.optim`` optimizer step, all on ``FakeTensorMode`` tensors (shapes,
dtypes and devices, no data) under ``torch.distributed._tools.mem_tracker.MemTracker``, which
attributes every storage to parameters, buffers, gradients, activations, temporaries or
optimizer states and records the peak. A 7-8B model costs no memory and traces in a minute or
two on two CPU cores.

GPU fidelity (see docs/trace-notes.md for the measurements):

* Tensors live on a fake ``cuda`` device, so CUDA's autocast op lists apply and MemTracker
  rounds every storage to 512 bytes as the CUDA caching allocator does. A CPU-only torch build
  cannot run autograd on fake CUDA tensors by itself (no CUDA device guard, no accelerator); the
  worker then compiles a 30-line C++ shim once (cached) that registers a fake CUDA device guard
  and CUDA hooks, and loads it *before* importing torch. Without a C++ compiler the trace falls
  back to ``cpu`` and says so in ``TraceResult.notes``.
* ``scaled_dot_product_attention`` on a fake CUDA tensor is routed the way a GPU routes it
  (flash attention for fp16/bf16 without a mask, else memory-efficient attention, else math),
  calling the same aten kernels whose meta functions give the outputs a GPU allocates.
* Each trace runs in a fresh Python subprocess (the shim changes process-wide torch state, and a
  fresh process frees everything afterwards).

torch and transformers are imported inside functions only: importing this module is cheap.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PRECISIONS = ("fp32", "amp-bf16", "amp-fp16", "pure-bf16")
OPTIMIZERS = ("adamw-forloop", "adamw-foreach", "adamw-fused", "sgd", "adafactor", "none")
ATTENTIONS = ("eager", "sdpa")
DEVICES = ("cuda", "cpu")
PHASES = ("forward", "backward", "optimizer")
MODEL_KINDS = ("causal_lm", "siglip_vision", "whisper_encoder", "module")
"""What ``TraceRequest.model_kind`` can build: a ``*ForCausalLM`` (the default), transformers'
``SiglipVisionModel`` or ``WhisperEncoder`` (the vision and audio towers of multimodal models), or
any ``torch.nn.Module`` a factory function builds (``module_factory``)."""

# MemTracker's _MemRefType values -> our category names.
CATEGORY_NAMES = {
    "Parameter": "weights",
    "Buffer": "buffers",
    "Gradient": "gradients",
    "Activation": "activations",
    "Temp": "temporaries",
    "Optstate": "optimizer_states",
    "Other": "other",
}
CATEGORIES = tuple(CATEGORY_NAMES.values())

_PROGRESS = "memplan-trace-progress\t"
_RESULT = "memplan-trace-result\t"


class TraceError(RuntimeError):
    """The traced step failed (the worker's error and the tail of its stderr are in the message)."""


@dataclass(frozen=True)
class TraceRequest:
    """One training step to trace.

    Attributes:
        model_config: HF ``config.json`` fields, ``model_type`` included; the model is built with
            ``AutoModelForCausalLM.from_config``. ``use_cache`` is left to the config, as HF
            Trainer leaves it (without gradient checkpointing a ``DynamicCache`` is then filled
            during the training forward; put ``"use_cache": False`` in the config to avoid it).
        precision: ``fp32``; ``amp-bf16``/``amp-fp16`` (fp32 weights, ``torch.autocast`` over
            forward and loss, as HF Trainer); ``pure-bf16`` (``model.to(bfloat16)``, no autocast).
        optimizer: ``adamw-forloop`` | ``adamw-foreach`` | ``adamw-fused`` (torch AdamW),
            ``sgd`` (momentum 0.9), ``adafactor`` (transformers Adafactor as HF Trainer builds it:
            ``scale_parameter=False, relative_step=False``), ``none`` (no optimizer step).
        grad_ckpt: ``gradient_checkpointing_enable({"use_reentrant": False})`` as HF Trainer does.
        attn: ``eager`` | ``sdpa`` (``attn_implementation``).
        frozen_prefixes: parameter name prefixes set to ``requires_grad=False``.
        micro_batch, seq_len: shape of ``input_ids`` and ``labels``; no attention mask is passed
            (packed / unpadded batch), so sdpa runs causal without a mask.
        steps: training steps to run; >= 2 so optimizer states exist during the second step.
        device: ``cuda`` (fake CUDA tensors; GPU behaviour) or ``cpu`` (fake CPU tensors).
        max_grad_norm: HF Trainer's gradient clipping (default 1.0); None skips it.
        model_kind: what to build (``MODEL_KINDS``). For the encoders the step is the encoder's
            forward, a consumer loss ``output.mean()`` (one scalar; its backward hands the
            encoder a gradient of the output's shape and dtype, as a real downstream module
            does) and ``loss.backward()`` when anything requires grad (a frozen encoder whose
            input needs no grad has no backward). ``micro_batch`` is then the encoder batch:
            ``siglip_vision``: crops, ``pixel_values`` [micro_batch, channels, image_size,
            image_size] (so ``(image_size // patch_size)**2`` patches per crop; no mask);
            ``whisper_encoder``: 30-second pieces, ``input_features`` [micro_batch,
            num_mel_bins, 2 * max_source_positions]; ``module``: ``module_factory``'s module.
            ``seq_len`` is ignored for encoders. Inputs are fp32, bf16 under ``pure-bf16``.
        encoder_chunk: run the encoder on slices of this many batch entries and ``torch.cat``
            the outputs, as MiniCPM's ``get_vllm_embedding`` runs the vision tower in chunks of
            ``vision_batch_size`` (16); the chunk outputs stay referenced until the loss is
            computed. 0: the whole batch at once.
        module_factory: ``"package.module:function"`` for ``model_kind="module"``. The worker
            calls ``function(model_config)`` under ``torch.device("meta")``; it returns an
            ``nn.Module`` with a method ``memplan_inputs(batch, device, dtype)`` returning the
            keyword arguments of its forward. The forward returns a tensor (or an object with
            ``last_hidden_state``).
    """

    model_config: dict
    precision: str = "amp-bf16"
    optimizer: str = "adamw-fused"
    grad_ckpt: bool = False
    attn: str = "sdpa"
    frozen_prefixes: tuple[str, ...] = ()
    micro_batch: int = 1
    seq_len: int = 512
    steps: int = 2
    device: str = "cuda"
    max_grad_norm: float | None = 1.0
    model_kind: str = "causal_lm"
    encoder_chunk: int = 0
    module_factory: str = ""

    def __post_init__(self) -> None:
        if self.model_kind not in MODEL_KINDS:
            raise ValueError(f"model_kind must be one of {', '.join(MODEL_KINDS)}; got {self.model_kind!r}")
        if self.model_kind == "causal_lm" and "model_type" not in self.model_config:
            raise ValueError("model_config needs a 'model_type'")
        if self.model_kind == "module" and ":" not in self.module_factory:
            raise ValueError("model_kind 'module' needs module_factory='package.module:function'")
        if self.encoder_chunk < 0:
            raise ValueError("encoder_chunk must be >= 0")
        for name, value, allowed in (("precision", self.precision, PRECISIONS),
                                     ("optimizer", self.optimizer, OPTIMIZERS),
                                     ("attn", self.attn, ATTENTIONS), ("device", self.device, DEVICES)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
        if self.micro_batch < 1 or self.seq_len < 2 or self.steps < 1:
            raise ValueError("micro_batch >= 1, seq_len >= 2 and steps >= 1 are required")
        object.__setattr__(self, "frozen_prefixes", tuple(self.frozen_prefixes))

    def to_json(self) -> str:
        """The request as JSON (what the worker reads)."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> TraceRequest:
        """Inverse of ``to_json``."""
        d = json.loads(text)
        d["frozen_prefixes"] = tuple(d.get("frozen_prefixes", ()))
        return cls(**d)


@dataclass(frozen=True)
class TraceResult:
    """What the traced step used on the traced device (bytes; MemTracker's accounting).

    Attributes:
        peak_bytes: max over all steps of all tracked tensor bytes on the device.
        peak_phase: phase in which that peak happened: forward | backward | optimizer.
        at_peak: bytes by category at that peak (weights, buffers, gradients, activations,
            temporaries, optimizer_states, other).
        phase_peaks: peak total in each phase (max over steps).
        module_peaks: peak total while each top-level module was running, in the last step
            (forward and backward, recomputation included), e.g. ``model.embed_tokens``,
            ``model.layers.0``, ``model.norm``, ``lm_head``, ``loss`` (the loss function, which
            the tracer wraps in a module so it is tracked) and ``(root)``.
        seconds: wall time of model build + traced steps in the worker (no interpreter start).
        device: device actually traced (``cpu`` if a fake CUDA device was not possible).
        notes: how the trace deviated from the request or from a GPU, if at all.
        step_peaks: peak total of each step.
        phase_breakdown: bytes by category at each phase's peak.
        after_forward: bytes by category at the end of the last step's forward (loss computed,
            model outputs dropped, before backward): what the step holds for backward.
        after_backward: bytes by category right after the last step's ``loss.backward()``.
        after_step: bytes by category after the last step's ``zero_grad``.
    """

    peak_bytes: int
    peak_phase: str
    at_peak: dict[str, int]
    phase_peaks: dict[str, int]
    module_peaks: dict[str, int]
    seconds: float
    device: str = "cuda"
    notes: tuple[str, ...] = ()
    step_peaks: tuple[int, ...] = ()
    phase_breakdown: dict[str, dict[str, int]] = field(default_factory=dict)
    after_forward: dict[str, int] = field(default_factory=dict)
    after_backward: dict[str, int] = field(default_factory=dict)
    after_step: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> TraceResult:
        d = dict(d)
        d["notes"] = tuple(d.get("notes", ()))
        d["step_peaks"] = tuple(d.get("step_peaks", ()))
        return cls(**d)


def trace_step(req: TraceRequest, progress: Callable[[str], None] | None = None, *,
               timeout: float | None = None) -> TraceResult:
    """Trace ``req`` in a fresh Python subprocess and return what it measured.

    Args:
        req: the step to trace.
        progress: called with a short message per phase and per decoder layer.
        timeout: seconds before the worker is killed (None: no limit).

    Raises:
        TraceError: the worker failed or timed out.
    """
    return _run_worker(req.to_json(), 1, progress, timeout)[0]


def trace_steps(reqs: list[TraceRequest], progress: Callable[[str], None] | None = None, *,
                timeout: float | None = None) -> list[TraceResult]:
    """Trace several small steps one after the other in one fresh subprocess (one interpreter
    start and one torch / transformers import for all of them: about 3 s saved per request).
    Meant for tiny models; a large model leaves hundreds of MB of Python objects behind, so
    trace those with ``trace_step``. All requests must name the same device.

    Raises:
        TraceError: a trace failed, or the worker failed or timed out (``timeout`` is for all).
        ValueError: the requests name different devices.
    """
    if len({r.device for r in reqs}) > 1:
        raise ValueError("trace_steps needs requests for one device; split them")
    if not reqs:
        return []
    payload = json.dumps([json.loads(r.to_json()) for r in reqs])
    return _run_worker(payload, len(reqs), progress, timeout)


def _run_worker(payload: str, count: int, progress: Callable[[str], None] | None,
                timeout: float | None) -> list[TraceResult]:
    env = dict(os.environ)
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # The worker imports the same planner checkout as this process (and its tests package, for
    # module factories), whatever the working directory or the installed copy.
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", "planner.judge.trace"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=err, text=True, bufsize=1, env=env)
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(payload)
        proc.stdin.close()
        killed = threading.Event()

        def kill() -> None:
            killed.set()
            proc.kill()

        timer = threading.Timer(timeout, kill) if timeout is not None else None
        if timer is not None:
            timer.start()
        results: list[dict] = []
        try:
            for line in proc.stdout:
                if line.startswith(_PROGRESS):
                    if progress is not None:
                        progress(line[len(_PROGRESS):].rstrip("\n"))
                elif line.startswith(_RESULT):
                    results.append(json.loads(line[len(_RESULT):]))
            rc = proc.wait()
        finally:
            if timer is not None:
                timer.cancel()
        if rc != 0 or len(results) != count:
            err.seek(0)
            why = f"killed after {timeout} s" if killed.is_set() else f"exit status {rc}"
            raise TraceError(f"trace worker failed ({why}):\n{err.read()[-4000:]}")
    return [TraceResult.from_dict(r) for r in results]


# --------------------------------------------------------------------------------------------
# Fake CUDA on a CPU-only torch build
# --------------------------------------------------------------------------------------------

_SHIM_SOURCE = r"""
// Lets a CPU-only torch build run autograd on FakeTensorMode tensors whose device is "cuda".
// (1) a CUDA device guard: autograd records a stream per input (InputMetadata), and torch only
//     installs a fake guard itself when it was built with CUDA (c10::impl::ensureCUDADeviceGuardSet);
// (2) CUDA hooks that say "built", so at::accelerator::getAccelerator() answers CUDA and the
//     autograd engine can ask for the current stream of a CUDA gradient (InputBuffer::add).
// Nothing runs on a device: FakeGuardImpl only keeps a current device and stream id.
// (2) only works if this library is loaded before `import torch` creates the hooks.
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/core/impl/FakeGuardImpl.h>
#include <ATen/detail/CUDAHooksInterface.h>

namespace memplan_fake_cuda {
struct Hooks final : public at::CUDAHooksInterface {
  explicit Hooks(at::CUDAHooksArgs) {}
  bool isBuilt() const override { return true; }
  bool hasPrimaryContext(c10::DeviceIndex) const override { return true; }
};
}  // namespace memplan_fake_cuda

namespace at {
C10_REGISTER_TYPED_CLASS(CUDAHooksRegistry, "CUDAHooks", memplan_fake_cuda::Hooks)
}

extern "C" int memplan_register_fake_cuda_guard() {
  static c10::impl::FakeGuardImpl<c10::DeviceType::CUDA> impl;
  c10::impl::registerDeviceGuard(c10::DeviceType::CUDA, &impl);
  return 0;
}
"""


def _torch_root() -> Path:
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        raise TraceError("torch is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def _torch_version_info(root: Path) -> tuple[str, bool]:
    """(torch version, built with CUDA?) read from torch/version.py without importing torch."""
    text = (root / "version.py").read_text()
    ver = re.search(r"^__version__\s*(?::[^=]*)?=\s*['\"]([^'\"]+)['\"]", text, re.M)
    cuda = re.search(r"^cuda\s*(?::[^=]*)?=\s*(None|['\"][^'\"]*['\"])", text, re.M)
    return (ver.group(1) if ver else "unknown", bool(cuda) and cuda.group(1) != "None")


def _cache_dir() -> Path:
    base = os.environ.get("MEMPLAN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "memplan")
    path = Path(base)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _build_shim(root: Path, version: str) -> Path:
    """Compile the fake-CUDA shim for this torch (cached by torch version and source)."""
    key = hashlib.sha1((version + str(root) + _SHIM_SOURCE).encode()).hexdigest()[:12]
    out = _cache_dir() / f"fake_cuda_{key}.so"
    if out.exists():
        return out
    # The C++ ABI flag must match torch's; ask a separate interpreter (this one must not import torch).
    abi = subprocess.run([sys.executable, "-c", "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))"],
                         capture_output=True, text=True, timeout=300)
    flag = abi.stdout.strip() if abi.returncode == 0 and abi.stdout.strip() in ("0", "1") else "1"
    cxx = os.environ.get("CXX") or "g++"
    lib = root / "lib"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "fake_cuda.cpp"
        src.write_text(_SHIM_SOURCE)
        tmp_out = Path(tmp) / out.name
        cmd = [cxx, "-O1", "-std=c++17", "-shared", "-fPIC", f"-D_GLIBCXX_USE_CXX11_ABI={flag}",
               f"-I{root / 'include'}", str(src), f"-L{lib}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{lib}",
               "-o", str(tmp_out)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            raise OSError(f"compiling the fake-CUDA shim failed: {r.stderr[-2000:]}")
        os.replace(tmp_out, out)
    return out


def _enable_fake_cuda() -> str | None:
    """Make fake CUDA tensors usable in this process; must run before ``import torch``.

    Returns None when torch can do it itself (a CUDA build), else a note; raises OSError when
    it is impossible (no compiler, or torch already imported).
    """
    root = _torch_root()
    version, cuda_built = _torch_version_info(root)
    if cuda_built:
        return None  # FakeTensorMode installs a fake guard itself when no GPU is visible
    if "torch" in sys.modules:
        raise OSError("torch is already imported; the fake-CUDA shim must load before it")
    import ctypes

    shim = _build_shim(root, version)
    lib = root / "lib"
    ctypes.CDLL(str(lib / "libc10.so"), mode=ctypes.RTLD_GLOBAL)
    ctypes.CDLL(str(lib / "libtorch_cpu.so"), mode=ctypes.RTLD_GLOBAL)
    handle = ctypes.CDLL(str(shim), mode=ctypes.RTLD_GLOBAL)
    handle.memplan_register_fake_cuda_guard()
    return f"CPU-only torch {version}: fake CUDA device through the compiled shim {shim.name}"


# --------------------------------------------------------------------------------------------
# The traced step (runs in the worker, torch imported)
# --------------------------------------------------------------------------------------------

_PHASE = {"name": "setup"}


def _make_tracker_class():
    import torch
    from torch._guards import active_fake_mode
    from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker, _MemRefType, _ModState
    from torch.distributed.tensor import DTensor
    from torch.utils._pytree import tree_map_only

    class PhaseMemTracker(MemTracker):
        """MemTracker that also keeps a peak per phase and per step, and types tensors allocated
        in the optimizer phase (clipping, ``optimizer.step``) as temporaries; the step's
        post-hook then retypes the states that persist as ``Optstate`` (stock MemTracker types
        every allocation inside the step as ``Optstate`` and clipping's as ``Activation``)."""

        def __init__(self, device_type: str, on_layer: Callable[[str, int], None] | None = None) -> None:
            super().__init__()
            self.device_type = device_type
            self.on_layer = on_layer
            self.phase_peaks: dict[str, int] = {}
            self.phase_peak_snaps: dict[str, dict] = {}
            self.step_peak = 0
            self.peak_total = -1
            self.peak_snap: dict = {}
            self.peak_phase = "forward"

        def dev_snapshot(self) -> dict:
            for dev, snap in self._curr_mem_snap.items():
                if dev.type == self.device_type:
                    return snap
            return {}

        def _update_peak_stats(self, peak_state) -> None:  # noqa: ANN001
            super()._update_peak_stats(peak_state)
            snap = self.dev_snapshot()
            total = snap.get(_TOTAL_KEY, 0)
            phase = _PHASE["name"]
            # ">=": on a tie the later step wins, whose categories are settled (in the first
            # step the optimizer states are born inside optimizer.step, typed as temporaries).
            if total >= self.phase_peaks.get(phase, -1):
                self.phase_peaks[phase] = total
                self.phase_peak_snaps[phase] = dict(snap)
            if total >= self.peak_total:
                self.peak_total = total
                self.peak_snap = dict(snap)
                self.peak_phase = phase
            self.step_peak = max(self.step_peak, total)

        def _track_module_params_and_buffers(self, module, install_grad_hooks: bool = True):  # noqa: ANN001, ANN202
            # Stock MemTracker registers a grad hook on every parameter, which raises for a
            # frozen one ("cannot register a hook on a tensor that doesn't require gradient").
            def grad_hook(grad) -> None:  # noqa: ANN001
                self._update_and_maybe_create_winfos(grad, _MemRefType.GRAD)

            param_memory = 0
            for param in module.parameters():
                winfos = self._update_and_maybe_create_winfos(param, _MemRefType.PARAM)
                param_memory += sum(w.mem_consumed for w in winfos)
                if param.grad is not None:
                    self._update_and_maybe_create_winfos(param.grad, _MemRefType.GRAD)
                if install_grad_hooks and param.requires_grad and self._param_to_grad_hook_handles.get(param) is None:
                    self._param_to_grad_hook_handles[param] = (
                        param.register_hook(grad_hook),
                        param.register_post_accumulate_grad_hook(lambda p: grad_hook(p.grad)),
                    )
            buffer_memory = 0
            for buffer in module.buffers():
                winfos = self._update_and_maybe_create_winfos(buffer, _MemRefType.BUFFER)
                buffer_memory += sum(w.mem_consumed for w in winfos)
            return param_memory, buffer_memory

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            if any(t == DTensor for t in types):
                return NotImplemented
            res = func(*args, **(kwargs or {}))
            if active_fake_mode() is self._fake_mode_on_entry:
                if self._in_opt or _PHASE["name"] == "optimizer" or (self._mod_tracker.is_bw and not self._in_ac):
                    reftype = _MemRefType.TEMP
                else:
                    reftype = _MemRefType.ACT
                tree_map_only(torch.Tensor, lambda t: self._track(reftype, t), res)
                self._update_peak_stats(_ModState.PEAK_BW if self._mod_tracker.is_bw else _ModState.PEAK_FW)
            return res

        def _pre_fw_hook(self, module, inputs) -> None:  # noqa: ANN001
            super()._pre_fw_hook(module, inputs)
            if self.on_layer is not None and getattr(module, "_memplan_layer", None) is not None:
                self.on_layer("recompute" if self._mod_tracker.is_bw else "forward", module._memplan_layer)

        def _pre_bw_hook(self, module, args) -> None:  # noqa: ANN001
            super()._pre_bw_hook(module, args)
            if self.on_layer is not None and module is not None and getattr(module, "_memplan_layer", None) is not None:
                self.on_layer("backward", module._memplan_layer)

    return PhaseMemTracker


def _cuda_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,  # noqa: ANN001
               enable_gqa=False):
    """``scaled_dot_product_attention`` as a CUDA GPU (sm80+) dispatches it.

    CUDA autocast lists sdpa as lower precision: floating q/k/v (and a float mask) are cast to
    the autocast dtype. Backend priority as torch's default: flash (fp16/bf16, no mask, head
    dim <= 256; supports GQA), memory-efficient (no GQA; takes a mask), math (everything else).
    """
    import torch

    if torch.is_autocast_enabled("cuda"):
        dt = torch.get_autocast_dtype("cuda")

        def cast(t):  # noqa: ANN001, ANN202
            return t.to(dt) if t is not None and t.is_floating_point() and t.dtype != dt else t

        query, key, value = cast(query), cast(key), cast(value)
        if attn_mask is not None and attn_mask.is_floating_point():
            attn_mask = cast(attn_mask)
    hd = query.size(-1)
    gqa = query.size(-3) != key.size(-3)
    same_dims = key.size(-1) == hd and value.size(-1) == hd
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    if (query.dtype in (torch.float16, torch.bfloat16) and attn_mask is None and hd <= 256 and same_dims
            and query.dim() == 4 and (not gqa or enable_gqa)):
        return torch.ops.aten._scaled_dot_product_flash_attention(
            query, key, value, dropout_p, is_causal, False, scale=scale)[0]
    if not gqa and query.dim() == 4 and same_dims:
        bias = attn_mask
        if bias is not None:
            if bias.dtype == torch.bool:  # convert_boolean_attn_mask
                bias = torch.zeros(bias.shape, dtype=query.dtype, device=query.device).masked_fill_(
                    bias.logical_not(), float("-inf"))
            kv = bias.size(-1)
            if kv % 16:  # preprocess_mask: pad the last dim to a multiple of 16, then slice
                bias = torch.nn.functional.pad(bias, (0, 16 - kv % 16))[..., :kv]
            bias = bias.expand(query.size(0), query.size(1), query.size(2), key.size(2))
        return torch.ops.aten._scaled_dot_product_efficient_attention(
            query, key, value, bias, needs_grad, dropout_p, is_causal, scale=scale)[0]
    return torch.ops.aten._scaled_dot_product_attention_math(
        query, key, value, attn_mask, dropout_p, is_causal, None, scale=scale, enable_gqa=enable_gqa)[0]


@contextlib.contextmanager
def _gpu_sdpa():
    """Route ``torch.nn.functional.scaled_dot_product_attention`` on CUDA tensors through
    ``_cuda_sdpa``. A module attribute patch, because transformers looks the function up at call
    time and because a TorchFunctionMode is not active when non-reentrant checkpointing
    recomputes the forward during backward (measured: the recomputation then ran the native
    path and checkpoint failed with "a different number of tensors was saved")."""
    import torch

    original = torch.nn.functional.scaled_dot_product_attention

    def sdpa(query, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if isinstance(query, torch.Tensor) and query.device.type == "cuda":
            return _cuda_sdpa(query, *args, **kwargs)
        return original(query, *args, **kwargs)

    torch.nn.functional.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


def _patch_unpacked_positions() -> None:
    """Tell transformers' mask builder that the batch is not packed, as real data would.

    Without a cache and an attention mask, ``masking_utils.find_packed_sequence_indices`` reads
    ``position_ids`` to detect packed sequences; on fake tensors it cannot (``is_tracing`` is
    true for a FakeTensor), assumes packing and materialises a [b, 1, s, s] mask, which turns
    sdpa's flash path (``is_causal``) into a masked one with GQA expanded by ``repeat_kv``. Our
    ``position_ids`` are ``arange``, for which the real function returns None.
    """
    from transformers import masking_utils

    masking_utils.find_packed_sequence_indices = lambda position_ids: None


_SILU_LIBRARY: list[Any] = []  # keeps the registration alive for the worker's lifetime


def _patch_silu_backward() -> None:
    """On a CPU-only torch, ``aten::silu_backward`` has no CUDA kernel, so fake CUDA tensors take
    a decomposition that allocates about 5 x [N, intermediate] temporaries a GPU never allocates
    (found by the activation model's comparison, docs/activations.md). Dispatch it as a CUDA build
    does: one output the size of the gradient."""
    import torch

    if torch.version.cuda is not None or _SILU_LIBRARY:
        return
    lib = torch.library.Library("aten", "IMPL")
    lib.impl("silu_backward", lambda grad, x: torch.empty_like(grad), "CUDA")
    _SILU_LIBRARY.append(lib)


def _patch_cuda_autocast() -> None:
    """Let ``torch.autocast("cuda")`` turn on although no CUDA device exists (torch disables it
    with a warning otherwise; checkpoint's recomputation re-enters autocast that way)."""
    import torch
    import torch.cuda.amp.common as common

    common.amp_definitely_not_available = lambda: False
    torch.cuda.is_bf16_supported = lambda *a, **k: True


def fake_from_meta(model: Any, dev: str, precision: str) -> None:
    """Replace a meta model's parameters and buffers, in place, by fake tensors on ``dev``: one new
    tensor per distinct meta tensor (``module._apply`` would untie shared parameters). pure-bf16
    converts floating parameters and buffers as ``model.to(torch.bfloat16)`` does."""
    import torch

    dtype = torch.bfloat16 if precision == "pure-bf16" else None
    new: dict[int, Any] = {}
    keep = []  # the meta tensors stay alive until done, so ids are not reused
    for mod in model.modules():
        for store, is_param in ((mod._parameters, True), (mod._buffers, False)):
            for name, t in list(store.items()):
                if t is None:
                    continue
                if id(t) not in new:
                    keep.append(t)
                    fake = torch.empty_like(t, device=dev, dtype=dtype if t.is_floating_point() and dtype else t.dtype)
                    new[id(t)] = torch.nn.Parameter(fake, requires_grad=t.requires_grad) if is_param else fake
                store[name] = new[id(t)]


def _build_model(req: TraceRequest, dev: str):
    """The model with fake parameters on ``dev``; tied parameters stay tied."""
    import torch

    with torch.device("meta"):
        model = _meta_model(req)
    fake_from_meta(model, dev, req.precision)
    for name, p in model.named_parameters():
        if any(name.startswith(prefix) for prefix in req.frozen_prefixes):
            p.requires_grad_(False)
    if req.grad_ckpt and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def _meta_model(req: TraceRequest):
    """The fp32 model of ``req.model_kind`` on the current (meta) device."""
    import importlib

    import torch

    cfg = dict(req.model_config)
    for key in ("torch_dtype", "dtype", "architectures"):
        cfg.pop(key, None)
    if req.model_kind == "module":
        mod_name, fn_name = req.module_factory.split(":", 1)
        return getattr(importlib.import_module(mod_name), fn_name)(cfg)
    mtype = cfg.pop("model_type", None)
    if req.model_kind == "causal_lm":
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.for_model(mtype, **cfg)
        config._attn_implementation = req.attn
        return AutoModelForCausalLM.from_config(config, attn_implementation=req.attn, dtype=torch.float32)
    if req.model_kind == "siglip_vision":
        from transformers import SiglipVisionConfig, SiglipVisionModel

        # MiniCPM's navit SigLIP returns last_hidden_state without the pooling head.
        cfg.setdefault("vision_use_head", False)
        return SiglipVisionModel._from_config(SiglipVisionConfig(**cfg), attn_implementation=req.attn,
                                              dtype=torch.float32)
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    return WhisperEncoder._from_config(WhisperConfig(**cfg), attn_implementation=req.attn, dtype=torch.float32)


def _encoder_inputs(req: TraceRequest, model, dev: str) -> dict:  # noqa: ANN001
    """Keyword inputs of one encoder step: the whole batch (``micro_batch`` crops or pieces)."""
    import torch

    dtype = torch.bfloat16 if req.precision == "pure-bf16" else torch.float32
    n = req.micro_batch
    if req.model_kind == "module":
        return dict(model.memplan_inputs(n, dev, dtype))
    cfg = model.config
    if req.model_kind == "siglip_vision":
        side = cfg.image_size
        return {"pixel_values": torch.zeros((n, cfg.num_channels, side, side), dtype=dtype, device=dev)}
    frames = 2 * cfg.max_source_positions  # conv2 has stride 2; WhisperEncoder.forward checks the length
    return {"input_features": torch.zeros((n, cfg.num_mel_bins, frames), dtype=dtype, device=dev)}


def _encoder_step(req: TraceRequest, model):  # noqa: ANN001, ANN202
    """A root module around the encoder that runs it over the batch, in chunks of
    ``encoder_chunk`` whose outputs are concatenated as MiniCPM's ``get_vllm_embedding`` does,
    and computes the consumer loss ``output.mean()``. Its forward returns the loss and the
    references a real caller still holds at that point (chunk outputs, output). MemTracker
    allows a submodule, not the root, to run several times in one step."""
    import torch

    class EncoderStep(torch.nn.Module):
        def __init__(self, tower) -> None:  # noqa: ANN001
            super().__init__()
            self.tower = tower

        def forward(self, **inputs):  # noqa: ANN003, ANN202
            n = req.micro_batch
            chunk = req.encoder_chunk or n
            outs = []
            for start in range(0, n, chunk):
                part = {k: v[start:start + chunk] if isinstance(v, torch.Tensor) and v.dim() and v.size(0) == n
                        else v for k, v in inputs.items()}
                res = self.tower(**part)
                outs.append(res if isinstance(res, torch.Tensor) else res.last_hidden_state)
                del res
            out = torch.cat(outs) if len(outs) > 1 else outs[0]
            return out.mean(), (outs, out)

    return EncoderStep(model)


def _find_layers(model):  # noqa: ANN001, ANN202
    """The model's stack of transformer layers (for progress messages), or None."""
    for path in ("model.layers", "encoder.layers", "layers"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if obj is not None and hasattr(obj, "__len__"):
            return obj
    return None


def _wrap_loss(model) -> None:  # noqa: ANN001
    """Run the model's loss function inside a submodule ``loss`` so MemTracker tracks it."""
    import torch

    fn = model.loss_function

    class Loss(torch.nn.Module):
        def forward(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            return fn(*args, **kwargs)

    loss = Loss()
    model.add_module("loss", loss)

    def call_loss(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        return loss(*args, **kwargs)

    model.loss_function = call_loss  # a plain function: nn.Module.__setattr__ would not call the setter for a module


def _make_optimizer(req: TraceRequest, params):  # noqa: ANN001
    import torch

    if req.optimizer == "none" or not params:
        return None
    if req.optimizer.startswith("adamw"):
        kind = req.optimizer.split("-")[1]
        return torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0, foreach=kind == "foreach", fused=kind == "fused")
    if req.optimizer == "sgd":
        return torch.optim.SGD(params, lr=1e-5, momentum=0.9, foreach=False)
    from transformers.optimization import Adafactor

    return Adafactor(params, lr=1e-5, scale_parameter=False, relative_step=False, warmup_init=False)


def _named(snap: dict) -> dict[str, int]:
    out = {name: 0 for name in CATEGORIES}
    for key, value in snap.items():
        name = CATEGORY_NAMES.get(getattr(key, "value", key))
        if name is not None:
            out[name] += int(value)
    return out


def _module_peaks(mt, dev_type: str) -> dict[str, int]:  # noqa: ANN001
    from torch.distributed._tools.mem_tracker import _TOTAL_KEY, _ModState

    stats = list(mt.memory_tracking.values())
    roots = [s.mod_fqn for s in stats if "." not in s.mod_fqn]
    root = roots[0] if roots else ""
    out: dict[str, int] = {}
    for s in stats:
        name = s.mod_fqn[len(root) + 1:] if s.mod_fqn.startswith(root + ".") else "(root)"
        parts = name.split(".")
        if not (name == "(root)" or len(parts) <= 2 or (len(parts) == 3 and parts[2].isdigit())):
            continue
        peak = 0
        for state in (_ModState.PEAK_FW, _ModState.PEAK_BW):
            for snap in s.snapshots.get(state, []):
                for dev, dev_snap in snap.items():
                    if dev.type == dev_type:
                        peak = max(peak, dev_snap.get(_TOTAL_KEY, 0))
        out[name] = peak
    return out


def _run_trace(req: TraceRequest, dev: str, notes: list[str], say: Callable[[str], None]) -> TraceResult:
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import _TOTAL_KEY

    t0 = time.perf_counter()
    if dev == "cuda":
        _patch_cuda_autocast()
        _patch_silu_backward()
    _patch_unpacked_positions()
    amp_dtype = {"amp-bf16": torch.bfloat16, "amp-fp16": torch.float16}.get(req.precision)
    if req.precision == "amp-fp16":
        notes.append("amp-fp16: no GradScaler (its inf check needs real values); its memory is a few scalars")
    Tracker = _make_tracker_class()
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    layer_count = {"n": 0}

    def on_layer(kind: str, idx: int) -> None:
        say(f"step {_PHASE.get('step', 0) + 1}/{req.steps} {kind} layer {idx + 1}/{layer_count['n']}")

    step_peaks: list[int] = []
    after_forward: dict[str, int] = {}
    after_backward: dict[str, int] = {}
    after_step: dict[str, int] = {}
    with fake_mode:
        say("building model")
        model = _build_model(req, dev)
        causal = req.model_kind == "causal_lm"
        if causal:
            _wrap_loss(model)
        layers = _find_layers(model)
        if layers is not None:
            layer_count["n"] = len(layers)
            for i, layer in enumerate(layers):
                layer._memplan_layer = i
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = _make_optimizer(req, params)
        if causal:
            input_ids = torch.zeros((req.micro_batch, req.seq_len), dtype=torch.long, device=dev)
            labels = torch.zeros((req.micro_batch, req.seq_len), dtype=torch.long, device=dev)
            externals = [input_ids, labels]
        else:
            inputs = _encoder_inputs(req, model, dev)
            externals = [v for v in inputs.values() if isinstance(v, torch.Tensor)]
            model = _encoder_step(req, model)
        mt = Tracker(dev, on_layer)
        mt.track_external(model, *externals)
        sdpa_mode = _gpu_sdpa() if dev == "cuda" else contextlib.nullcontext()
        say(f"model built ({sum(p.numel() for p in model.parameters()) / 1e9:.3f} B parameters); tracing")
        with mt, sdpa_mode:
            for step in range(req.steps):
                _PHASE["step"] = step
                mt.reset_mod_stats()
                mt.step_peak = 0
                _PHASE["name"] = "forward"
                say(f"step {step + 1}/{req.steps} forward")
                autocast = (torch.autocast(dev, dtype=amp_dtype) if amp_dtype is not None
                            else contextlib.nullcontext())
                with autocast:
                    if causal:
                        outputs = model(input_ids=input_ids, labels=labels)
                    else:
                        loss, outputs = model(**inputs)
                if causal and amp_dtype is not None:
                    # accelerate (HF Trainer's mixed precision) wraps forward in convert_outputs_to_fp32
                    upcast = [v.float() for v in outputs.values()
                              if isinstance(v, torch.Tensor) and v.dtype in (torch.float16, torch.bfloat16)]
                    del upcast
                if causal:
                    loss = outputs.loss
                del outputs
                after_forward = _named(mt.dev_snapshot())
                _PHASE["name"] = "backward"
                if loss.requires_grad:
                    say(f"step {step + 1}/{req.steps} backward")
                    loss.backward()
                elif step == 0:
                    notes.append("nothing requires grad: no backward (frozen encoder, input without grad)")
                del loss
                after_backward = _named(mt.dev_snapshot())
                _PHASE["name"] = "optimizer"
                if req.max_grad_norm is not None and params:
                    torch.nn.utils.clip_grad_norm_(params, req.max_grad_norm)
                if optimizer is not None:
                    say(f"step {step + 1}/{req.steps} optimizer")
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                else:
                    model.zero_grad(set_to_none=True)
                after_step = _named(mt.dev_snapshot())
                step_peaks.append(mt.step_peak)
                _PHASE["name"] = "setup"
        module_peaks = _module_peaks(mt, dev)
        # MemTracker's own peak (get_tracker_snapshot("peak")) keeps the first of equal peaks;
        # ours keeps the last, with the same total.
        stock = sum(int(snap.get(_TOTAL_KEY, 0))
                    for d, snap in mt.get_tracker_snapshot("peak").items() if d.type == dev)
        if stock != mt.peak_total:
            raise TraceError(f"peak mismatch: MemTracker {stock}, phase tracker {mt.peak_total}")
    return TraceResult(
        peak_bytes=int(mt.peak_total),
        peak_phase=mt.peak_phase,
        at_peak=_named(mt.peak_snap),
        phase_peaks={ph: int(mt.phase_peaks.get(ph, 0)) for ph in PHASES},
        module_peaks=module_peaks,
        seconds=round(time.perf_counter() - t0, 3),
        device=dev,
        notes=tuple(notes),
        step_peaks=tuple(int(x) for x in step_peaks),
        phase_breakdown={ph: _named(mt.phase_peak_snaps.get(ph, {})) for ph in PHASES},
        after_forward=after_forward,
        after_backward=after_backward,
        after_step=after_step,
    )


def _worker() -> int:
    data = json.loads(sys.stdin.read())
    reqs = [TraceRequest.from_json(json.dumps(d)) for d in (data if isinstance(data, list) else [data])]
    req = reqs[0]

    def say(msg: str) -> None:
        sys.stdout.write(_PROGRESS + msg.replace("\n", " ") + "\n")
        sys.stdout.flush()

    notes: list[str] = []
    dev = req.device
    if dev == "cuda":
        say("preparing fake CUDA device")
        try:
            note = _enable_fake_cuda()
            if note:
                notes.append(note)
        except (OSError, subprocess.SubprocessError) as exc:
            dev = "cpu"
            notes.append(f"fake CUDA impossible ({exc}); traced on cpu: CPU autocast lists, CPU sdpa, "
                         "no 512-byte rounding")
    say("importing torch and transformers")
    import transformers  # noqa: F401  (import before the trace so it is not timed)

    for one in reqs:
        result = _run_trace(one, dev, list(notes), say)
        sys.stdout.write(_RESULT + json.dumps(asdict(result)) + "\n")
        sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: with fake CUDA the autograd engine's device threads sometimes
    # abort the process at exit (std::terminate, exit status 134) after the work is done.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(_worker())
