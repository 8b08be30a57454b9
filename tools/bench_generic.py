"""Benchmark the any-architecture activations: for each case, the estimate (terms fitted to traces
of reduced copies, extrapolated to the full depth) against a full-depth fake-tensor trace of the
same training step, at the fit's anchor and at a workload away from it; and the time of the
first (fitting) and the next (cached) estimate.

    python tools/bench_generic.py OUT.jsonl [--only NAME,...]
    python tools/bench_generic.py OUT.jsonl --fitted-from DONE.jsonl
    python tools/bench_generic.py DONE.jsonl --markdown      (the table in docs/accuracy.md)

The second form checks the terms a search uses (five points around the anchor and a check,
``planner.estimate.fitted``) against the full-depth traces the first form recorded, at the
off-anchor workload, without tracing the full model again.

Configs are in tools/archs/ (the shapes of the named models' published config.json files, main
fields only). Every estimate runs the real pipeline (planner.estimate.estimate under plain
PyTorch on one GPU, so a plain trace is its judge); the compared figure is the GPU tensor peak
(weights, gradients, optimizer states, activations, temporaries), the runtime overheads left out.
Results are appended one JSON line per case; docs/accuracy.md shows them.
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

CASES = [
    # name, config, precision, attn, ckpt, (B, S) anchor
    ("gpt2-xl", "amp-bf16", "sdpa", False, (4, 1024)),
    ("starcoderbase-1b", "amp-bf16", "sdpa", True, (4, 2048)),
    ("bloom-1b7", "pure-bf16", "eager", False, (2, 1024)),
    ("falcon-rw-1b", "amp-bf16", "sdpa", False, (4, 1024)),
    ("phi-1_5", "amp-bf16", "sdpa", True, (8, 2048)),
    ("stablelm-2-1_6b", "amp-bf16", "eager", False, (2, 2048)),
    ("gemma-2-2b", "pure-bf16", "eager", True, (2, 4096)),
    ("gemma-3-1b", "amp-bf16", "sdpa", False, (4, 2048)),
    ("mixtral-2x-small", "pure-bf16", "sdpa", False, (4, 2048)),
    ("qwen3-30b-a3b", "pure-bf16", "sdpa", True, (2, 4096)),
    ("deepseek-v2-lite", "pure-bf16", "sdpa", True, (2, 2048)),
    ("qwen2.5-1.5b", "amp-bf16", "sdpa", False, (4, 2048)),
]


def run_case(name: str, precision: str, attn: str, ckpt: bool, anchor: tuple[int, int]) -> dict:
    from planner.cli.fitting import with_fitted_terms
    from planner.estimate import estimate
    from planner.judge.protocol import TraceRequest
    from planner.judge.trace import trace_step
    from planner.profile.catalog import load_catalog
    from planner.profile.hardware import make_cluster
    from planner.profile.load import load_model
    from planner.workload.inventory import Workload
    from planner.workload.options import Attention, Engine, Precision, TrainingOptions

    cfg_path = HERE / "archs" / f"{name}.json"
    cfg = json.loads(cfg_path.read_text())
    catalog = load_catalog()
    cluster = make_cluster("1xh100", catalog, 1024 * 2**30)
    model = load_model(str(cfg_path), catalog)
    opts = TrainingOptions(engine=Engine.TORCH, precision=Precision(precision), attn=Attention(attn), grad_ckpt=ckpt)
    b, s = anchor
    off = (1, (3 * s) // 4)
    out: dict = {"name": name, "params": model.params, "precision": precision, "attn": attn, "ckpt": ckpt}
    t0 = time.perf_counter()
    est, notes = with_fitted_terms(lambda: estimate(model, cluster, opts, Workload(micro_batch=b, seq_len=s)))
    out["first_estimate_s"] = round(time.perf_counter() - t0, 1)
    out["notes"] = notes
    t0 = time.perf_counter()
    with_fitted_terms(lambda: estimate(model, cluster, opts, Workload(micro_batch=b, seq_len=s)))
    out["cached_estimate_s"] = round(time.perf_counter() - t0, 3)
    for label, (mb, sl) in (("anchor", anchor), ("off_anchor", off)):
        e, _ = with_fitted_terms(lambda mb=mb, sl=sl: estimate(model, cluster, opts,
                                                               Workload(micro_batch=mb, seq_len=sl)))
        t0 = time.perf_counter()
        r = trace_step(TraceRequest(model_config=cfg, precision=precision, optimizer="adamw-fused", grad_ckpt=ckpt,
                                    attn=attn, micro_batch=mb, seq_len=sl), timeout=3600)
        row = {"workload": [mb, sl], "trace_s": round(time.perf_counter() - t0, 1), "trace_peak": r.peak_bytes,
               "trace_phase": r.peak_phase, "unmodeled": [str(u) for u in getattr(e, "unmodeled", ())]}
        if not row["unmodeled"]:
            got = e.per_gpu.tensor_bytes
            row.update(estimate_peak=got, estimate_phase=str(e.per_gpu.peak_phase),
                       error=round((got - r.peak_bytes) / r.peak_bytes, 5))
        out[label] = row
    return out


def fitted_case(row: dict) -> dict:
    """The fit over a range (what tune uses) at the off-anchor workload of a recorded row."""
    from planner.cli.fitting import with_fitted_terms
    from planner.estimate import estimate, generic
    from planner.profile.catalog import load_catalog
    from planner.profile.hardware import make_cluster
    from planner.profile.load import load_model
    from planner.workload.inventory import Workload
    from planner.workload.options import Attention, Engine, Precision, TrainingOptions

    name = row["name"]
    catalog = load_catalog()
    cluster = make_cluster("1xh100", catalog, 1024 * 2**30)
    model = load_model(str(HERE / "archs" / f"{name}.json"), catalog)
    opts = TrainingOptions(engine=Engine.TORCH, precision=Precision(row["precision"]), attn=Attention(row["attn"]),
                           grad_ckpt=row["ckpt"])
    (b, s), (ob, os_) = row["anchor"]["workload"], row["off_anchor"]["workload"]
    generic.forget_all()

    def both() -> list:
        return [estimate(model, cluster, opts, Workload(micro_batch=mb, seq_len=sl)) for mb, sl in ((b, s), (ob, os_))]

    t0 = time.perf_counter()
    ests, notes = with_fitted_terms(both)
    out = {"name": name, "seconds": round(time.perf_counter() - t0, 1), "notes": notes}
    for label, est, recorded in (("anchor", ests[0], row["anchor"]), ("off_anchor", ests[1], row["off_anchor"])):
        got = est.per_gpu.tensor_bytes
        out[label] = {"workload": recorded["workload"], "estimate_peak": got, "trace_peak": recorded["trace_peak"],
                      "error": round((got - recorded["trace_peak"]) / recorded["trace_peak"], 5)}
    return out


def markdown(rows: list[dict]) -> str:
    """The results as the table docs/accuracy.md shows (GiB = 2^30 B)."""
    out = ["| model | parameters | setup | workload | estimate GiB | trace GiB | error | first estimate s |",
           "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if "anchor" not in row:
            out.append(f"| {row['name']} | | failed: {row.get('error_text', '')[:80]} | | | | | |")
            continue
        setup = f"{row['precision']}, {row['attn']}, ckpt {'on' if row['ckpt'] else 'off'}"
        for label in ("anchor", "off_anchor"):
            r = row[label]
            b, s = r["workload"]
            if "error" not in r:
                out.append(f"| {row['name']} | {row['params'] / 1e9:.2f}B | {setup} | {b} x {s} | UNKNOWN | "
                           f"{r['trace_peak'] / 2**30:.2f} | - | |")
                continue
            first = row["first_estimate_s"] if label == "anchor" else ""
            est, trace = r["estimate_peak"] / 2**30, r["trace_peak"] / 2**30
            out.append(f"| {row['name']} | {row['params'] / 1e9:.2f}B | {setup} | {b} x {s} | "
                       f"{est:.2f} | {trace:.2f} | {r['error']:+.2%} | {first} |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--only", default="")
    ap.add_argument("--fitted-from", default="")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    if args.markdown:
        print(markdown([json.loads(line) for line in Path(args.out).read_text().splitlines() if line.strip()]))
        return 0
    only = set(filter(None, args.only.split(",")))
    os.environ.setdefault("MEMPLAN_CACHE_DIR", tempfile.mkdtemp(prefix="memplan-bench-cache-"))
    if args.fitted_from:
        for line in Path(args.fitted_from).read_text().splitlines():
            row = json.loads(line)
            if "anchor" not in row or (only and row["name"] not in only):
                continue
            try:
                out = fitted_case(row)
            except Exception as exc:  # a benchmark row, not a crash
                out = {"name": row["name"], "error_text": f"{type(exc).__name__}: {str(exc)[-600:]}"}
            with open(args.out, "a") as fh:
                fh.write(json.dumps(out) + "\n")
            print(json.dumps(out)[:400], flush=True)
        return 0
    for name, precision, attn, ckpt, anchor in CASES:
        if only and name not in only:
            continue
        try:
            row = run_case(name, precision, attn, ckpt, anchor)
        except Exception as exc:  # a benchmark row, not a crash: the failure is the result
            row = {"name": name, "error_text": f"{type(exc).__name__}: {str(exc)[-600:]}"}
        with open(args.out, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(json.dumps(row)[:400], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
