"""Fit the step memory of any decoder transformers can build: trace reduced copies of the real
model (one layer of each distinct kind, then one more of each) at five workloads and a check
point, and fit the terms ``planner.estimate.fitted`` extrapolates to the full depth and any
workload.

Judge stage: it runs the real model class (``planner.judge.trace``, fake tensors, MemTracker) in
worker processes. ``python -m planner.judge.fit`` is the planning worker: it builds the full
model on the meta device, groups its layers by kind and names the reduced copies to trace.

torch and transformers are imported inside the worker only.
"""

from __future__ import annotations

import json
import re
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata

from planner.estimate.fitted import (
    ActivationTerms,
    FitSpec,
    Sample,
    check_point,
    fit_points,
    fit_terms,
    point_terms,
)
from planner.judge.protocol import _PROGRESS, _RESULT, TraceError, TraceRequest, TraceResult
from planner.judge.trace import _run_module, trace_steps

_LAYER_NAME = re.compile(r"^(?P<stack>.*?\.(?:layers|h|blocks|layer))\.(?P<idx>\d+)\.(?P<rel>.+)$")

WORKERS = 2
"""Trace workers run side by side (each a process; the machines memplan targets have >= 2 cores)."""


@dataclass(frozen=True)
class FitPlan:
    """What the planning worker found: the layer kinds and the reduced copies to trace."""

    kinds: tuple[str, ...]
    kind_counts: tuple[int, ...]
    copies: dict[str, list[int]] = field(default_factory=dict)
    """counts key ("1,2") -> layer indices of the full model to keep."""
    frozen: dict[str, list[str]] = field(default_factory=dict)
    """counts key -> parameter names of that copy to freeze."""


def versions() -> str:
    """The library versions whose code the traces run (part of every cache key)."""
    out = []
    for dist in ("torch", "transformers", "peft"):
        try:
            out.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            out.append(f"{dist} -")
    return ", ".join(out)


def fit_activation_terms(model_config: Mapping, spec: FitSpec, anchor: tuple[int, int],
                         progress: Callable[[str], None] | None = None,
                         timeout: float | None = 900, at_anchor_only: bool = False) -> ActivationTerms:
    """Trace the reduced copies of the model ``model_config`` describes around the workload
    ``anchor`` = (micro-batch, sequence) and fit its terms; with ``at_anchor_only``, trace the
    copies at the anchor alone (one trace per copy) for terms exact there and nowhere else.

    Raises:
        TraceError: transformers cannot build or run the model this way (the message says why).
    """
    say = progress or (lambda msg: None)
    say("finding the layer kinds")
    plan = _plan(model_config, spec, timeout)
    points = [anchor] if at_anchor_only else fit_points(*anchor)
    base = ",".join("1" for _ in plan.kinds)
    jobs: list[tuple[str, int, int]] = [(ck, b, s) for ck in plan.copies for b, s in points]
    if not at_anchor_only:
        jobs.append((base, *check_point(*anchor)))
    reqs = [_request(model_config, spec, plan, ck, b, s) for ck, b, s in jobs]
    done = {"n": 0}
    lock = threading.Lock()

    def tick(msg: str) -> None:
        if msg.startswith("model built"):
            with lock:
                done["n"] += 1
                say(f"tracing reduced copies: {done['n']}/{len(reqs)}")

    results = _trace_all(reqs, tick, timeout)
    samples = [Sample(tuple(int(x) for x in ck.split(",")), b, s, _quantities(r))
               for (ck, b, s), r in zip(jobs, results, strict=True)]
    notes = tuple(dict.fromkeys(n for r in results for n in r.notes if not n.startswith("CPU-only torch")))
    source = f"fitted to {len(results)} traced steps of reduced copies ({versions()})"
    if at_anchor_only:
        terms = point_terms(samples, plan.kinds, plan.kind_counts, anchor, source=source)
    else:
        check = samples.pop()
        terms = fit_terms(samples, plan.kinds, plan.kind_counts, points, check, source=source)
    return replace(terms, notes=notes)


def _quantities(r: TraceResult) -> dict[str, int]:
    """The fitted quantities of one traced step (``planner.estimate.fitted.QUANTITIES``)."""

    def act(d: Mapping[str, int]) -> int:
        return int(d.get("activations", 0)) + int(d.get("temporaries", 0))

    pb = r.phase_breakdown
    return {
        "forward": act(pb.get("forward", {})),
        "held": act(r.after_forward),
        "backward": act(pb.get("backward", {})),
        "backward_gradients": int(pb.get("backward", {}).get("gradients", 0)),
        "optimizer": act(pb.get("optimizer", {})),
        "buffers": int(r.at_peak.get("buffers", 0)),
    }


def _request(cfg: Mapping, spec: FitSpec, plan: FitPlan, ck: str, b: int, s: int) -> TraceRequest:
    return TraceRequest(
        model_config=dict(cfg),
        precision=spec.precision,
        optimizer=spec.optimizer,
        grad_ckpt=spec.grad_ckpt,
        attn=spec.attn,
        frozen_prefixes=tuple(plan.frozen.get(ck, ())),
        micro_batch=b,
        seq_len=s,
        steps=1 if spec.optimizer == "none" else 2,
        max_grad_norm=1.0 if spec.clip else None,
        keep_layers=tuple(plan.copies[ck]),
        lora=spec.lora,
    )


def _trace_all(reqs: list[TraceRequest], tick: Callable[[str], None], timeout: float | None) -> list[TraceResult]:
    """The traces, split over ``WORKERS`` processes side by side, in request order."""
    shares = [reqs[i::WORKERS] for i in range(WORKERS)]
    out: list[list[TraceResult] | BaseException] = [[] for _ in shares]

    def run(i: int) -> None:
        try:
            out[i] = trace_steps(shares[i], tick, timeout=timeout) if shares[i] else []
        except BaseException as exc:  # re-raised in the caller's thread below
            out[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(shares))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for res in out:
        if isinstance(res, BaseException):
            raise res
    merged: list[TraceResult] = []
    for j in range(len(reqs)):
        merged.append(out[j % WORKERS][j // WORKERS])  # type: ignore[index]
    return merged


_PLANS: dict[str, FitPlan] = {}


def _plan(cfg: Mapping, spec: FitSpec, timeout: float | None) -> FitPlan:
    """The layer kinds and copies of ``cfg`` (remembered per config and frozen set: a search fits
    several setups of one model, and the planning worker costs a torch import)."""
    key = json.dumps([cfg, spec.frozen_parts, spec.frozen_layer_names], sort_keys=True, default=str)
    if key not in _PLANS:
        payload = json.dumps({"config": dict(cfg), "spec": asdict(spec)})
        raw = _run_module(payload, 1, None, timeout, "planner.judge.fit")[0]
        _PLANS[key] = FitPlan(tuple(raw["kinds"]), tuple(raw["kind_counts"]), raw["copies"], raw["frozen"])
    return _PLANS[key]


# --------------------------------------------------------------------------------------------
# The planning worker (torch imported)
# --------------------------------------------------------------------------------------------


def _layer_signature(layer, index: int, layer_types) -> tuple[str, str]:  # noqa: ANN001
    """(signature, short description) of one decoder layer: its classes, parameter shapes and
    the attention attributes that change what it computes (sliding window, attention type)."""
    parts = [type(layer).__name__]
    experts = False
    for name, p in layer.named_parameters():
        parts.append(f"{name}:{tuple(p.shape)}")
        experts = experts or "expert" in name
    for mname, mod in layer.named_modules():
        parts.append(f"{mname}={type(mod).__name__}")
        for attr in ("attention_type", "is_sliding", "sliding_window", "use_rope", "is_causal"):
            value = mod.__dict__.get(attr, getattr(type(mod), attr, None) if attr in vars(type(mod)) else None)
            if isinstance(value, bool | int | str):
                parts.append(f"{mname}.{attr}={value}")
    kind = layer_types[index] if layer_types and index < len(layer_types) else "attention"
    desc = f"{type(layer).__name__} ({kind}{', experts' if experts else ''})"
    return "|".join(parts + [str(kind)]), desc


def _plan_worker(cfg: dict, spec: dict) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from planner.judge.models import decoder_stack
    from planner.profile.hf_config import _part

    cfg = dict(cfg)
    for key in ("torch_dtype", "dtype", "architectures"):
        cfg.pop(key, None)
    mtype = cfg.pop("model_type")
    config = AutoConfig.for_model(mtype, **cfg)
    n = int(config.num_hidden_layers)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    _, stack = decoder_stack(model, n)
    if stack is None:
        raise TraceError(f"{type(model).__name__}: no stack of {n} decoder layers found")
    layer_types = getattr(config, "layer_types", None)
    sigs: dict[str, int] = {}
    kinds: list[str] = []
    first: list[list[int]] = []
    for i, layer in enumerate(stack):
        sig, desc = _layer_signature(layer, i, layer_types)
        if sig not in sigs:
            sigs[sig] = len(kinds)
            kinds.append(desc)
            first.append([])
        first[sigs[sig]].append(i)
    counts = [len(idx) for idx in first]
    base = sorted(idx[0] for idx in first)
    copies = {",".join("1" for _ in kinds): base}
    for k, idx in enumerate(first):
        if len(idx) > 1:
            copies[",".join("2" if j == k else "1" for j in range(len(kinds)))] = sorted([*base, idx[1]])
    emb = model.get_input_embeddings()
    prefix = next((name for name, mod in model.named_modules() if mod is emb), "")
    prefix = prefix.rsplit(".", 1)[0] if "." in prefix else ""
    frozen_parts = set(spec.get("frozen_parts", ()))
    frozen_rel = set(spec.get("frozen_layer_names", ()))
    frozen: dict[str, list[str]] = {}
    for ck, keep in copies.items():
        names = []
        for name, _ in model.named_parameters():
            m = _LAYER_NAME.match(name)
            if m:
                idx = int(m["idx"])
                if idx in keep and m["rel"] in frozen_rel:
                    names.append(f"{m['stack']}.{keep.index(idx)}.{m['rel']}")
            elif _part(name, prefix).value in frozen_parts:
                names.append(name)
        frozen[ck] = names
    return {"kinds": kinds, "kind_counts": counts, "copies": copies, "frozen": frozen}


def _main() -> int:
    import os

    data = json.loads(sys.stdin.read())
    sys.stdout.write(_PROGRESS + "importing torch and transformers\n")
    sys.stdout.flush()
    import transformers

    transformers.logging.set_verbosity_error()
    result = _plan_worker(data["config"], data["spec"])
    sys.stdout.write(_RESULT + json.dumps(result) + "\n")
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(_main())
