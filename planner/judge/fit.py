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
    base_counts,
    check_point,
    fit_points,
    fit_terms,
    one_more,
    point_terms,
)
from planner.estimate.moments import moment_quantities
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
    """counts key ("1,2") -> layer indices of the full model to keep (the text stack's, for a
    vision-language model)."""
    frozen: dict[str, list[str]] = field(default_factory=dict)
    """counts key -> parameter names of that copy to freeze."""
    vision_copies: dict[str, list[int]] = field(default_factory=dict)
    """counts key -> the vision stack's layers to keep; empty for a text model."""
    layer_kinds: list[int] = field(default_factory=list)
    """The kind of each layer of the full model's (text) stack; empty where the moments of a
    phase are not told apart."""
    vision_layer_kinds: list[int] = field(default_factory=list)
    """The kind of each layer of a vision-language model's vision stack (indices after the text
    kinds), where the tower runs; the trace marks its layers after the text ones
    (``planner.judge.vlm.marked_layers``)."""

    def copy_kinds(self, ck: str) -> list[int] | None:
        """The kind of each marked layer of copy ``ck`` (the text stack's, then the vision
        stack's where the tower runs), in that order; None without per-layer kinds."""
        if not self.layer_kinds:
            return None
        vision = [self.vision_layer_kinds[i] for i in self.vision_copies[ck]] if self.vision_layer_kinds else []
        return [self.layer_kinds[i] for i in self.copies[ck]] + vision


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
    base = ",".join(str(n) for n in base_counts(plan.kind_counts))
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
    samples = [Sample(tuple(int(x) for x in ck.split(",")), b, s,
                      {**_quantities(r, bool(plan.vision_copies)), **_moments(r, plan, ck)})
               for (ck, b, s), r in zip(jobs, results, strict=True)]
    notes = tuple(dict.fromkeys(n for r in results for n in r.notes if not n.startswith("CPU-only torch")))
    source = f"fitted to {len(results)} traced steps of reduced copies ({versions()})"
    if at_anchor_only:
        terms = point_terms(samples, plan.kinds, plan.kind_counts, anchor, source=source)
    else:
        check = samples.pop()
        terms = fit_terms(samples, plan.kinds, plan.kind_counts, points, check, source=source)
    return replace(terms, notes=notes)


def _quantities(r: TraceResult, inputs: bool = False) -> dict[str, int]:
    """The fitted quantities of one traced step (``planner.estimate.fitted.QUANTITIES``), with
    ``inputs``, the step's input tensors (MemTracker's "other": what the trace registered as
    external), as well."""

    def act(d: Mapping[str, int]) -> int:
        return int(d.get("activations", 0)) + int(d.get("temporaries", 0))

    pb = r.phase_breakdown
    return {**({"inputs": int(r.after_forward.get("other", 0))} if inputs else {}),
        "forward": act(pb.get("forward", {})),
        "held": act(r.after_forward),
        "backward": act(pb.get("backward", {})),
        "backward_gradients": int(pb.get("backward", {}).get("gradients", 0)),
        "optimizer": act(pb.get("optimizer", {})),
        "buffers": int(r.at_peak.get("buffers", 0)),
    }


def _moments(r: TraceResult, plan: FitPlan, ck: str) -> dict[str, int]:
    """The moment quantities of copy ``ck``'s trace (``planner.estimate.moments``), or none."""
    kinds = plan.copy_kinds(ck)
    if kinds is None or not r.moment_peaks:
        return {}
    return moment_quantities(r.moment_peaks, kinds, len(plan.kinds))


def _request(cfg: Mapping, spec: FitSpec, plan: FitPlan, ck: str, b: int, s: int) -> TraceRequest:
    vlm = {"model_kind": "image_text_to_text", "keep_vision_layers": tuple(plan.vision_copies[ck]),
           "images": spec.images, "image_size": spec.image_size} if plan.vision_copies else {}
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
        **vlm,
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
    """The layer kinds and copies of ``cfg`` (remembered per config, frozen set and, for a
    vision-language model, whether the tower runs: a search fits several setups of one model, and
    the planning worker costs a torch import)."""
    key = json.dumps([cfg, spec.frozen_parts, spec.frozen_layer_names, spec.frozen_groups, bool(spec.images)],
                     sort_keys=True, default=str)
    if key not in _PLANS:
        payload = json.dumps({"config": dict(cfg), "spec": asdict(spec)})
        raw = _run_module(payload, 1, None, timeout, "planner.judge.fit")[0]
        _PLANS[key] = FitPlan(tuple(raw["kinds"]), tuple(raw["kind_counts"]), raw["copies"], raw["frozen"],
                              raw.get("vision_copies", {}), raw.get("layer_kinds", []),
                              raw.get("vision_layer_kinds", []))
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


def _stack_kinds(stack, layer_types) -> tuple[list[str], list[list[int]]]:  # noqa: ANN001
    """The distinct kinds of a stack's layers (descriptions) and the indices of each kind's layers."""
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
    return kinds, first


def _copies(first: list[list[int]], in_stack: list[int], n_stacks: int) -> list[tuple[str, list[list[int]]]]:
    """The reduced copies: counts key -> kept layers of each stack. ``first`` holds each kind's
    layer indices, ``in_stack`` the stack each kind belongs to. The base keeps the first
    ``BASE_LAYERS`` layers of every kind (``planner.estimate.fitted.base_counts``); for each kind
    with more, one more copy adds its next layer."""
    counts = [len(idx) for idx in first]
    take = base_counts(counts)
    base = [sorted(i for idx, st, n in zip(first, in_stack, take, strict=True) if st == j for i in idx[:n])
            for j in range(n_stacks)]
    out = [(",".join(str(n) for n in take), base)]
    for k, idx in enumerate(first):
        if len(idx) > take[k]:
            keep = [sorted([*layers, idx[take[k]]]) if j == in_stack[k] else layers for j, layers in enumerate(base)]
            out.append((",".join(str(n) for n in one_more(take, k)), keep))
    return out


def _renamed(name: str, stack_name: str, keep: list[int]) -> str | None:
    """A parameter's name in a copy keeping ``keep`` of the stack ``stack_name``; None when its
    layer is not kept."""
    if not name.startswith(stack_name + "."):
        return name
    idx, _, rel = name[len(stack_name) + 1:].partition(".")
    return f"{stack_name}.{keep.index(int(idx))}.{rel}" if int(idx) in keep else None


def _plan_worker(cfg: dict, spec: dict) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from planner.judge.models import decoder_stack
    from planner.profile.hf_config import _part

    if isinstance(cfg.get("vision_config"), dict):
        return _plan_vlm(cfg, spec)
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
    kinds, first = _stack_kinds(stack, getattr(config, "layer_types", None))
    counts = [len(idx) for idx in first]
    copies = {ck: keep[0] for ck, keep in _copies(first, [0] * len(first), 1)}
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
    layer_kinds = [0] * len(stack)
    for k, idx in enumerate(first):
        for i in idx:
            layer_kinds[i] = k
    return {"kinds": kinds, "kind_counts": counts, "copies": copies, "frozen": frozen, "layer_kinds": layer_kinds}


def _plan_vlm(cfg: dict, spec: dict) -> dict:
    """The kinds of a vision-language model's two stacks (text kinds first), its reduced copies
    (``copies``: text layers kept, ``vision_copies``: vision layers kept) and each copy's frozen
    parameters: whole groups (``frozen_groups``: the tower, the projector, as ``hf_groups``
    names them) and the language model's parts and in-layer names."""
    import torch
    from transformers import AutoModelForImageTextToText

    from planner.judge.vlm import llm_prefix, stacks, vision_layer_types, vlm_config
    from planner.profile.hf_groups import LLM_GROUP, _part, group_of

    config = vlm_config(cfg, (), ())
    _check_feature_layer(config)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    found = stacks(model)
    (text_name, text), (vision_name, vision) = found["text"], found["vision"]
    t_kinds, t_first = _stack_kinds(text, getattr(config.get_text_config(), "layer_types", None))
    v_kinds, v_first = _stack_kinds(vision, vision_layer_types(config.vision_config, len(vision)))
    if not spec.get("images"):  # a text-only step: the tower does not run, one layer of it is built
        v_kinds, v_first = [], []
    first = t_first + v_first
    copies = [(ck, [t, v or [0]]) for ck, (t, v) in _copies(first, [0] * len(t_first) + [1] * len(v_first), 2)]
    prefix = llm_prefix(model)
    frozen_groups = set(spec.get("frozen_groups", ()))
    frozen_parts = set(spec.get("frozen_parts", ()))
    frozen_rel = set(spec.get("frozen_layer_names", ()))
    frozen: dict[str, list[str]] = {}
    for ck, (keep_t, keep_v) in copies:
        names = []
        for name, _ in model.named_parameters():
            new = _renamed(name, text_name, keep_t)
            new = new and _renamed(new, vision_name, keep_v)
            if new is None:
                continue
            group = group_of(name)
            if group in frozen_groups:
                names.append(new)
            elif group == LLM_GROUP and name.startswith(text_name + "."):
                if new[len(text_name) + 1:].partition(".")[2] in frozen_rel:
                    names.append(new)
            elif group == LLM_GROUP and _part(name, prefix).value in frozen_parts:
                names.append(new)
        frozen[ck] = names
    return {"kinds": t_kinds + [f"vision: {k}" for k in v_kinds], "kind_counts": [len(i) for i in first],
            "copies": {ck: keep[0] for ck, keep in copies}, "vision_copies": {ck: keep[1] for ck, keep in copies},
            "frozen": frozen, "layer_kinds": _kind_of_layer(t_first, len(text)),
            "vision_layer_kinds": [len(t_first) + k for k in _kind_of_layer(v_first, len(vision))] if v_first else []}


def _kind_of_layer(first: list[list[int]], n_layers: int) -> list[int]:
    """Each layer's kind index, from each kind's layer indices."""
    out = [0] * n_layers
    for k, idx in enumerate(first):
        for i in idx:
            out[i] = k
    return out


def _check_feature_layer(config) -> None:  # noqa: ANN001
    """LLaVA reads the tower's hidden states at ``vision_feature_layer``; a copy with one or two
    vision layers holds the same layer relative to the end only for -1 and -2 (LLaVA-1.5's).

    Raises:
        TraceError: another feature layer (the copies cannot keep the one it reads).
    """
    layer = getattr(config, "vision_feature_layer", -1)
    if not isinstance(layer, int) or layer not in (-1, -2):
        raise TraceError(f"vision_feature_layer {layer}: memplan's reduced copies keep one or two vision layers "
                         "and trace -1 and -2 only")


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
