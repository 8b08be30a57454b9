"""Benchmark the vision-language step (docs/any-architecture.md, "Vision-language models"): for each
case, the estimate (the whole step traced on reduced copies of both stacks, extrapolated to the
full depth) against a full-depth fake-tensor trace of the same step with the same images, and the
time of the first (tracing) and the next (cached) estimate.

    nice python tools/bench_vlm.py OUT.jsonl [--only NAME,...]

Configs are the published config.json files in tools/archs/ (llava-1.5-7b, qwen2.5-vl-7b). Every
estimate runs the real pipeline (planner.estimate.estimate under plain PyTorch on one GPU, so a
plain trace is its judge); the compared figure is the GPU tensor peak (weights, gradients,
optimizer states, activations, temporaries, inputs), the runtime overheads left out. The trace
cannot see FlashAttention-2's backward scratch, which the estimate adds for one LLM layer at the
backward peak (``generic.flash_workspace_bytes``): each row records it, and ``error`` compares
the estimate with the trace plus that scratch where the peak is in backward. Results are appended
one JSON line per case; docs/accuracy.md shows them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

LORA_TARGETS = ["k_proj", "o_proj", "q_proj", "v_proj"]

CASES = [
    # name, config, images per sample, image size, CLI-like setup, (B, S)
    ("llava-1.5-7b-frozen-tower", "llava-1.5-7b", 2, (1024, 768),
     {"precision": "amp-bf16", "attn": "sdpa", "ckpt": True, "freeze": ["vision_tower"]}, (2, 2048)),
    ("qwen2.5-vl-7b-lora", "qwen2.5-vl-7b", 2, (1024, 768),
     {"precision": "amp-bf16", "attn": "sdpa", "ckpt": True, "lora": 16}, (1, 4096)),
    ("qwen2.5-vl-7b-text-lora", "qwen2.5-vl-7b", 0, (0, 0),
     {"precision": "amp-bf16", "attn": "sdpa", "ckpt": True, "lora": 16}, (2, 2048)),
    ("llava-1.5-7b-all-trained", "llava-1.5-7b", 2, (1024, 768),
     {"precision": "amp-bf16", "attn": "sdpa", "ckpt": False}, (1, 2048)),
    ("qwen2.5-vl-7b-frozen-tower", "qwen2.5-vl-7b", 2, (1024, 768),
     {"precision": "amp-bf16", "attn": "sdpa", "ckpt": True, "freeze": ["vision_tower"]}, (1, 4096)),
]


def _options(setup: dict):  # noqa: ANN202
    from planner.workload.options import Attention, Engine, LoraOptions, Precision, TrainingOptions

    lora = LoraOptions(rank=setup["lora"], targets=tuple(LORA_TARGETS)) if setup.get("lora") else None
    return TrainingOptions(engine=Engine.TORCH, precision=Precision(setup["precision"]), attn=Attention(setup["attn"]),
                           grad_ckpt=setup["ckpt"], freeze=tuple(setup.get("freeze", ())), lora=lora)


def _full_trace(cfg: dict, setup: dict, spec, b: int, s: int, frozen: tuple[str, ...]):  # noqa: ANN001, ANN202
    """The full-depth trace of the step the estimate stands for (``spec``: its images, their size
    as the tower sees them, its LoRA with the dropout the estimate assumed)."""
    from planner.judge.protocol import TraceRequest
    from planner.judge.trace import trace_step

    images, size, lora = spec.images, spec.image_size, spec.lora
    req = TraceRequest(model_config=cfg, model_kind="image_text_to_text", precision=setup["precision"],
                       optimizer="adamw-fused", grad_ckpt=setup["ckpt"], attn=setup["attn"], micro_batch=b,
                       seq_len=s, images=images, image_size=size, lora=lora, frozen_prefixes=frozen)
    return trace_step(req, timeout=3600)


def run_case(name: str, arch: str, images: int, size: tuple[int, int], setup: dict, anchor: tuple[int, int]) -> dict:
    from planner.cli.fitting import with_fitted_terms
    from planner.estimate import estimate, generic
    from planner.profile.catalog import load_catalog
    from planner.profile.hardware import make_cluster
    from planner.profile.load import load_model
    from planner.workload.inventory import Workload, trainable_inventory
    from planner.workload.vision import vision_rule

    folder = Path(tempfile.mkdtemp(prefix=f"memplan-bench-{arch}-"))
    (folder / "config.json").write_text((HERE / "archs" / f"{arch}.json").read_text())
    cfg = json.loads((folder / "config.json").read_text())
    catalog = load_catalog()
    cluster = make_cluster("1xh100", catalog, 1024 * 2**30)
    model = load_model(str(folder), catalog)
    opts = _options(setup)
    b, s = anchor
    workload = Workload(micro_batch=b, seq_len=s, images=images, image_size=size if images else (640, 480),
                        vision=vision_rule(model))
    out: dict = {"name": name, "params": model.params, "images": images, "setup": setup, "workload": [b, s]}
    t0 = time.perf_counter()
    est, notes = with_fitted_terms(lambda: estimate(model, cluster, opts, workload))
    out["first_estimate_s"] = round(time.perf_counter() - t0, 1)
    out["notes"] = notes
    generic.forget_all()
    t0 = time.perf_counter()
    est, _ = with_fitted_terms(lambda: estimate(model, cluster, opts, workload))
    out["cached_estimate_s"] = round(time.perf_counter() - t0, 3)
    out["unmodeled"] = [str(u) for u in est.unmodeled]
    step = generic.vlm_step(model, workload)
    params = trainable_inventory(model, opts)
    spec = generic.vlm_fit_spec(step, params, opts, workload, model.groups)
    frozen = _frozen_prefixes(model, params)
    t0 = time.perf_counter()
    r = _full_trace(cfg, setup, spec, b, s, frozen)
    scratch = 0 if images and cfg["model_type"] == "gemma3" else generic.flash_workspace_bytes(
        step.llm.config, spec, b, s)
    want = r.peak_bytes + (scratch if r.peak_phase == "backward" else 0)
    got = est.per_gpu.tensor_bytes
    out.update(image_size=list(spec.image_size), trace_s=round(time.perf_counter() - t0, 1), trace_peak=r.peak_bytes,
               trace_phase=r.peak_phase, flash_scratch=scratch, estimate_peak=got,
               estimate_phase=str(est.per_gpu.peak_phase), error=round((got - want) / want, 5))
    return out


def _frozen_prefixes(model, params) -> tuple[str, ...]:  # noqa: ANN001
    """Every parameter of the tower and projector groups frozen whole (under LoRA peft freezes the
    base model itself)."""
    out = []
    for group in model.groups:
        mine = [p for p in params if p.group == group.name]
        if group.kind in ("vision_tower", "projector") and mine and not any(p.trainable for p in mine):
            out += [t.name for t in group.tensors]
    return tuple(out)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--only", default="")
    args = ap.parse_args()
    only = set(filter(None, args.only.split(",")))
    os.environ.setdefault("MEMPLAN_CACHE_DIR", tempfile.mkdtemp(prefix="memplan-bench-cache-"))
    for name, arch, images, size, setup, anchor in CASES:
        if only and name not in only:
            continue
        try:
            row = run_case(name, arch, images, size, setup, anchor)
        except Exception as exc:  # a benchmark row, not a crash
            row = {"name": name, "error_text": f"{type(exc).__name__}: {str(exc)[-600:]}"}
        with open(args.out, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(json.dumps(row)[:600], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
