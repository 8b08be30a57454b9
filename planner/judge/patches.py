"""Making a CPU-only torch trace like a GPU (for planner.judge.trace): the fake-CUDA C++ shim, loaded
before torch, and the patches to torch and transformers applied in the worker once torch is imported."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from planner.judge.protocol import TraceError

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
# Torch and transformers patches (run in the worker, torch imported)
# --------------------------------------------------------------------------------------------

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
    # Kernel choices that ask for the GPU's generation (transformers' grouped_mm experts need
    # SM80+) see an Ampere-or-later GPU, where memplan's plans for these models run.
    torch.cuda.get_device_capability = lambda *a, **k: FAKE_CUDA_CAPABILITY


FAKE_CUDA_CAPABILITY = (9, 0)
"""Compute capability the fake CUDA device reports (Hopper): every kernel path memplan traces
(flash and memory-efficient SDPA, transformers' grouped_mm mixture-of-experts) is open to it."""


class UnreachedBranches:
    """Frees a branch of the graph that backward never reaches when a real step would.

    MemTracker's module tracker (``torch.distributed._tools.mod_tracker``) hooks each module's
    input tensors with ``register_multi_grad_hook`` (mode "all"), whose closure holds those
    tensors' autograd nodes: a cycle through C++ that the garbage collector cannot see. A branch
    the loss does not depend on (LLaVA's last tower layer under ``vision_feature_layer`` -2, whose
    output only the model's ``image_outputs`` hold) then never dies, and its saved tensors count in
    every later phase and step; a real step frees them when the model's outputs are dropped.
    Inside this context those hooks are recorded (by the ids of their nodes, which the hooks'
    closures keep alive); ``prune`` removes the ones on nodes the loss does not reach (they can
    never fire), ``release`` the rest once backward is done.
    """

    def __init__(self) -> None:
        self.records: list[tuple[tuple[int, ...], Any]] = []
        self._original: Any = None

    def __enter__(self) -> UnreachedBranches:
        import torch.distributed._tools.mod_tracker as mod_tracker
        from torch.autograd.graph import _get_grad_fn_or_grad_acc

        self._original = original = mod_tracker.register_multi_grad_hook

        def recording(tensors, fn, *, mode="all"):  # noqa: ANN001, ANN202
            handle = original(tensors, fn, mode=mode)
            if mode == "all":
                self.records.append((tuple(id(_get_grad_fn_or_grad_acc(t)) for t in tensors), handle))
            return handle

        mod_tracker.register_multi_grad_hook = recording
        return self

    def __exit__(self, *exc: object) -> None:
        import torch.distributed._tools.mod_tracker as mod_tracker

        mod_tracker.register_multi_grad_hook = self._original
        self.release()

    def prune(self, loss: Any) -> None:  # noqa: ANN401
        """Remove the hooks on nodes that backward from ``loss`` will not run."""
        seen: dict[int, Any] = {}  # id -> node: the wrappers stay alive, so their ids stay theirs
        todo = [loss.grad_fn]
        while todo:
            node = todo.pop()
            if node is None or id(node) in seen:
                continue
            seen[id(node)] = node
            todo.extend(fn for fn, _ in node.next_functions)
        keep = []
        for ids, handle in self.records:
            if any(i in seen for i in ids):
                keep.append((ids, handle))
            else:
                handle.remove()
        self.records = keep

    def release(self) -> None:
        """Remove every recorded hook (after backward: none is left to fire)."""
        for _, handle in self.records:
            handle.remove()
        self.records = []
