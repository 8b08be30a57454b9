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

The parts: planner.judge.protocol (request, result, the worker's JSON lines), planner.judge.worker
(the subprocess, ``python -m planner.judge.worker``), planner.judge.patches (fake CUDA shim, torch
patches), planner.judge.models (what the step runs), planner.judge.tracker (MemTracker's accounting);
this module holds the public API and the measured step.

torch and transformers are imported inside functions only: importing this module is cheap.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from planner.judge.models import (
    _build_model,
    _encoder_inputs,
    _encoder_step,
    _find_layers,
    _make_optimizer,
    _wrap_loss,
    decoder_stack,
    fake_from_meta,
)
from planner.judge.patches import (
    UnreachedBranches,
    _enable_fake_cuda,  # noqa: F401  (tests/estimate/test_activations_vs_trace.py's judge calls it from here)
    _gpu_sdpa,
    _patch_cuda_autocast,
    _patch_silu_backward,
    _patch_unpacked_positions,
)
from planner.judge.protocol import (
    _PROGRESS,
    _RESULT,
    CATEGORIES,
    LM_KINDS,
    PHASES,
    TraceError,
    TraceRequest,
    TraceResult,
)
from planner.judge.tracker import _PHASE, _make_tracker_class, _module_peaks, _named
from planner.judge.vlm import marked_layers, vlm_fake_mode, vlm_inputs

__all__ = ["CATEGORIES", "PHASES", "TraceError", "TraceRequest", "TraceResult", "fake_from_meta", "trace_step",
           "trace_steps"]


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
    return [TraceResult.from_dict(r) for r in _run_module(payload, count, progress, timeout, "planner.judge.worker")]


def _run_module(payload: str, count: int, progress: Callable[[str], None] | None, timeout: float | None,
                module: str) -> list[dict]:
    """Run ``python -m module`` with ``payload`` on stdin; its progress lines go to ``progress``;
    its ``count`` result lines come back as dicts.

    Raises:
        TraceError: the worker failed, timed out or returned too few results.
    """
    env = dict(os.environ)
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # The worker imports the same planner checkout as this process (and its tests package, for
    # module factories), whatever the working directory or the installed copy.
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", module], stdin=subprocess.PIPE,
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
    return results


# --------------------------------------------------------------------------------------------
# The traced step (runs in the worker, torch imported)
# --------------------------------------------------------------------------------------------


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
    vlm = req.model_kind == "image_text_to_text"
    if vlm:
        # The families' placeholder checks (image tokens == image features) read tensor values,
        # which fake tensors have none of; transformers' production switch turns them off.
        os.environ["TRANSFORMERS_DISABLE_TORCH_CHECK"] = "1"
    fake_mode = vlm_fake_mode() if vlm else FakeTensorMode(allow_non_fake_inputs=True)
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
        causal = req.model_kind in LM_KINDS
        if causal:
            _wrap_loss(model)
        layers = marked_layers(model, req.images) if vlm else _find_layers(model)
        if layers is None and causal and getattr(getattr(model, "config", None), "num_hidden_layers", None):
            _, layers = decoder_stack(model, int(model.config.num_hidden_layers))  # transformer.h, peft...
        if layers is not None:
            layer_count["n"] = len(layers)
            for i, layer in enumerate(layers):
                layer._memplan_layer = i
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = _make_optimizer(req, params)
        if causal:
            input_ids = torch.zeros((req.micro_batch, req.seq_len), dtype=torch.long, device=dev)
            labels = torch.zeros((req.micro_batch, req.seq_len), dtype=torch.long, device=dev)
            extra = vlm_inputs(req, model, dev, fake_mode) if vlm else {}
            externals = [input_ids, labels, *(v for v in extra.values() if isinstance(v, torch.Tensor))]
        else:
            inputs = _encoder_inputs(req, model, dev)
            externals = [v for v in inputs.values() if isinstance(v, torch.Tensor)]
            model = _encoder_step(req, model)
        mt = Tracker(dev, on_layer)
        mt.track_external(model, *externals)
        sdpa_mode = _gpu_sdpa() if dev == "cuda" else contextlib.nullcontext()
        say(f"model built ({sum(p.numel() for p in model.parameters()) / 1e9:.3f} B parameters); tracing")
        branches = UnreachedBranches() if vlm else None
        with mt, sdpa_mode, branches or contextlib.nullcontext():
            for step in range(req.steps):
                _PHASE["step"] = step
                mt.reset_mod_stats()
                mt.step_peak = 0
                _PHASE["name"] = "forward"
                mt.start_phase()
                say(f"step {step + 1}/{req.steps} forward")
                autocast = (torch.autocast(dev, dtype=amp_dtype) if amp_dtype is not None
                            else contextlib.nullcontext())
                with autocast:
                    if causal:
                        outputs = model(input_ids=input_ids, labels=labels, **extra)
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
                if branches is not None:
                    # A branch the loss does not reach (LLaVA's last tower layer) dies here in a
                    # real step, when the model's outputs are dropped.
                    branches.prune(loss)
                    gc.collect()
                after_forward = _named(mt.dev_snapshot())
                _PHASE["name"] = "backward"
                mt.start_phase()
                if loss.requires_grad:
                    say(f"step {step + 1}/{req.steps} backward")
                    loss.backward()
                elif step == 0:
                    notes.append("nothing requires grad: no backward (frozen encoder, input without grad)")
                del loss
                if branches is not None:
                    branches.release()
                after_backward = _named(mt.dev_snapshot())
                _PHASE["name"] = "optimizer"
                mt.start_phase()
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
        moment_peaks={ph: {m: _named(snap) for m, snap in moments.items()} for ph, moments in mt.moment_peaks.items()
                      if ph in PHASES},
    )
