"""Golden snapshot of the step simulators: every public figure of planner.estimate.decoder and
planner.estimate.encoders over a grid of calls, written as JSON.

A refactoring of the simulators must leave the file byte-identical:

    python tools/snapshot_simulators.py /tmp/sim_golden_before.json      # before the change
    python tools/snapshot_simulators.py /tmp/sim_after.json --compare /tmp/sim_golden_before.json

The grid follows the real call patterns (planner/estimate/step.py, tests/test_*_vs_trace.py):
the trace tests' tiny configs and the shipped profiles' decoders and MiniCPM encoders, every
precision, attention and checkpointing choice, frozen parts, LoRA (with and without
``enable_input_require_grads``), DeepSpeed's 16-bit module without autocast, every optimizer
implementation, and the validation errors (their messages are part of the snapshot).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from planner.estimate import decoder as dec
from planner.estimate import decoder_config as dcfg
from planner.estimate import encoder_call, ops
from planner.estimate import encoders as enc
from planner.estimate import optimizer_phase as opt
from planner.estimate import step_memory as sm
from planner.estimate import whisper as wsp
from planner.profile.architectures import TensorKind, TensorSpec, decoder_tensors
from planner.profile.catalog import load_catalog
from planner.workload.inventory import Param
from planner.workload.options import OptimizerImpl

PRECISIONS = ("fp32", "amp-bf16", "amp-fp16", "pure-bf16")
ATTNS = ("eager", "sdpa", "flash_attention_2")


def _tiny(model_type: str, **kw: Any) -> dict[str, Any]:
    """The trace tests' tiny decoder (tests/estimate/test_activations_vs_trace.py ``_decoder``)."""
    cfg = dict(model_type=model_type, vocab_size=512, hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
               num_attention_heads=8, num_key_value_heads=2)
    cfg.update(kw)
    return cfg


TINY = {
    "qwen2": _tiny("qwen2"),
    "llama-tied": _tiny("llama", tie_word_embeddings=True),
    "qwen3": _tiny("qwen3", head_dim=32),
    "gemma-mqa": _tiny("gemma", num_key_value_heads=1, head_dim=32),
    "phi3-mha": _tiny("phi3", num_key_value_heads=8, pad_token_id=0),
    "mistral": _tiny("mistral"),
    "mistral-window": _tiny("mistral", sliding_window=128),
    "qwen2-window": _tiny("qwen2", use_sliding_window=True, sliding_window=128),
    "llama-nocache": _tiny("llama", use_cache=False),
    "gemma-gelu": _tiny("gemma", hidden_act="gelu", num_key_value_heads=8),
}

SIGLIP = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, patch_size=14,
              image_size=224)
WHISPER = dict(d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=256, num_mel_bins=80)
RESAMPLER = dict(num_queries=16, embed_dim=128, kv_dim=96, num_heads=4)


def _inventory(cfg: dict, frozen: tuple[str, ...] = (), lora: dict | None = None) -> tuple[Param, ...]:
    """As tests/estimate/test_activations_vs_trace.py ``inventory``: frozen prefixes or a peft LoRA wrap."""
    params = [Param("llm", t, not any(t.name.startswith(p) for p in frozen)) for t in decoder_tensors(cfg)]
    if lora is None:
        return tuple(params)
    out = []
    for p in params:
        out.append(Param("llm", p.tensor, False))
        if p.tensor.kind is TensorKind.LINEAR and p.tensor.module in lora["targets"]:
            out_f, in_f = p.tensor.shape
            stem = p.tensor.name.removesuffix(".weight")
            for name, shape in (("lora_A", (lora["r"], in_f)), ("lora_B", (out_f, lora["r"]))):
                spec = TensorSpec(f"{stem}.{name}.weight", shape, TensorKind.LINEAR, p.tensor.part)
                out.append(Param("llm", spec, True, "lora"))
    return tuple(out)


def _profile_groups() -> tuple[dict[str, dict], dict[str, dict], dict[str, dict], dict[str, dict]]:
    """Decoders (one per profile file's first model) and MiniCPM's encoder configs."""
    cat = load_catalog()
    decoders, vision, resampler, whisper = {}, {}, {}, {}
    seen_files: set[str] = set()
    for name, m in sorted(cat.models.items()):
        origin = str(cat.origin[f"model:{name}"])
        for g in m.groups:
            key = f"{name}/{g.name}"
            if g.kind == "decoder" and origin not in seen_files:
                decoders[key] = dict(g.config)
            elif g.kind == "siglip_vision":
                vision[key] = dict(g.config)
            elif g.kind == "resampler":
                resampler[key] = dict(g.config)
            elif g.kind == "whisper_encoder":
                whisper[key] = dict(g.config)
        if any(g.kind == "decoder" for g in m.groups):
            seen_files.add(origin)
    return decoders, vision, resampler, whisper


def _points() -> Iterator[tuple[str, Callable[[], Any]]]:
    """(key, thunk) for every point of the grid."""
    dsm = dec.decoder_step_memory
    # 1. Tiny decoders: every precision x attention x checkpointing, two shapes.
    for cname, cfg in TINY.items():
        for prec in PRECISIONS:
            for attn in ATTNS:
                for ckpt in (False, True):
                    for mb, seq in ((1, 128), (2, 256)):
                        key = f"dec/{cname}/{prec}/{attn}/ckpt={ckpt}/b={mb}/s={seq}"
                        yield key, lambda cfg=cfg, prec=prec, attn=attn, ckpt=ckpt, mb=mb, seq=seq: dsm(
                            cfg, micro_batch=mb, seq_len=seq, precision=prec, attn=attn, grad_ckpt=ckpt)
    # 2. Frozen parts, LoRA, optimizers, DeepSpeed module, switches (tiny qwen2 / llama / phi3 / gemma).
    variants: dict[str, dict[str, Any]] = {}
    for cname in ("qwen2", "llama-tied", "phi3-mha", "gemma-mqa", "qwen3"):
        cfg = TINY[cname]
        variants[f"{cname}/frozen-embed-l0"] = dict(
            cfg=cfg, params=_inventory(cfg, ("model.embed_tokens", "model.layers.0.")))
        variants[f"{cname}/frozen-l0"] = dict(cfg=cfg, params=_inventory(cfg, ("model.layers.0.",)))
        variants[f"{cname}/frozen-all-but-head"] = dict(cfg=cfg, params=_inventory(cfg, ("model.",)))
        targets = ["q_proj", "k_proj", "v_proj", "o_proj"] if cname != "phi3-mha" else ["qkv_proj", "o_proj"]
        variants[f"{cname}/lora-attn"] = dict(cfg=cfg, params=_inventory(cfg, lora=dict(r=8, targets=targets)))
        mlp = ["gate_proj", "up_proj", "down_proj"] if cname != "phi3-mha" else ["gate_up_proj", "down_proj"]
        variants[f"{cname}/lora-mlp"] = dict(cfg=cfg, params=_inventory(cfg, lora=dict(r=16, targets=["q_proj", *mlp])))
    for vname, v in variants.items():
        for prec in PRECISIONS:
            for attn in ("eager", "sdpa"):
                for ckpt in (False, True):
                    key = f"dec-var/{vname}/{prec}/{attn}/ckpt={ckpt}"
                    yield key, lambda v=v, prec=prec, attn=attn, ckpt=ckpt: dsm(
                        v["cfg"], micro_batch=2, seq_len=128, precision=prec, attn=attn, grad_ckpt=ckpt,
                        params=v["params"])
    for vname in ("qwen2/lora-mlp", "phi3-mha/lora-attn"):  # lora_dropout > 0: copies and masks
        for prec in PRECISIONS:
            for ckpt in (False, True):
                key = f"dec-dropout/{vname}/{prec}/ckpt={ckpt}"
                yield key, lambda v=variants[vname], prec=prec, ckpt=ckpt: dsm(
                    v["cfg"], micro_batch=2, seq_len=128, precision=prec, grad_ckpt=ckpt, params=v["params"],
                    lora_dropout=0.05)
    lora_q = variants["qwen2/lora-attn"]["params"]
    for irg in (False, True):
        for ckpt in (False, True):
            for attn in ATTNS:
                key = f"dec-irg/qwen2-lora/irg={irg}/ckpt={ckpt}/{attn}"
                yield key, lambda irg=irg, ckpt=ckpt, attn=attn: dsm(
                    TINY["qwen2"], micro_batch=1, seq_len=256, precision="amp-bf16", attn=attn, grad_ckpt=ckpt,
                    params=lora_q, input_requires_grad=irg)
    for impl in OptimizerImpl:
        for prec in ("fp32", "pure-bf16", "amp-bf16"):
            key = f"dec-opt/{impl.name}/{prec}"
            yield key, lambda impl=impl, prec=prec: dsm(TINY["mistral"], micro_batch=1, seq_len=128, precision=prec,
                                                        optimizer_impl=impl)
    for cname in ("qwen2", "phi3-mha", "llama-tied"):
        for prec in ("amp-bf16", "amp-fp16"):
            for mdb in (2, 4):
                for ckpt in (False, True):
                    key = f"dec-ds/{cname}/{prec}/mdb={mdb}/ckpt={ckpt}"
                    yield key, lambda cname=cname, prec=prec, mdb=mdb, ckpt=ckpt: dsm(
                        TINY[cname], micro_batch=2, seq_len=128, precision=prec, module_dtype_bytes=mdb,
                        autocast=False, grad_ckpt=ckpt, optimizer_impl=OptimizerImpl.DS_FUSED_ADAM)
        for switch in ("use_cache=True", "use_cache=False", "max_grad_norm=False", "workspaces=False",
                       "autocast=True", "autocast=False"):
            name, val = switch.split("=")
            for attn in ATTNS:
                key = f"dec-switch/{cname}/{switch}/{attn}"
                yield key, lambda cname=cname, name=name, val=val, attn=attn: dsm(
                    TINY[cname], micro_batch=1, seq_len=256, precision="amp-bf16", attn=attn,
                    **{name: val == "True"})
    # 3. Shipped decoders at realistic sizes (fewer combinations: a layer is the unit of cost).
    decoders, vision, resampler, whisper = _profile_groups()
    for gname, cfg in decoders.items():
        for prec, attn, ckpt in (("amp-bf16", "sdpa", True), ("pure-bf16", "flash_attention_2", False),
                                 ("fp32", "eager", True), ("amp-fp16", "sdpa", False)):
            key = f"dec-profile/{gname}/{prec}/{attn}/ckpt={ckpt}"
            yield key, lambda cfg=cfg, prec=prec, attn=attn, ckpt=ckpt: dsm(
                cfg, micro_batch=1, seq_len=2048, precision=prec, attn=attn, grad_ckpt=ckpt)
    # 4. The decoder's helpers (decoder, decoder_config, step_memory, ops, optimizer_phase).
    for cname in ("qwen2", "gemma-mqa", "phi3-mha"):
        for prec in PRECISIONS:
            for attn in ("eager", "sdpa"):
                yield f"layer_saved/{cname}/{prec}/{attn}", lambda cname=cname, prec=prec, attn=attn: \
                    dec.layer_saved_bytes(TINY[cname], micro_batch=2, seq_len=128, precision=prec, attn=attn)
        for item in (2, 4):
            yield f"buffers/{cname}/{item}", lambda cname=cname, item=item: dcfg.decoder_buffer_bytes(TINY[cname], item)
    for prec in PRECISIONS:
        for tokens in (1, 333, 4096):
            yield f"logits_loss/{prec}/{tokens}", lambda prec=prec, tokens=tokens: sm.logits_loss_bytes(
                32000, tokens, prec)
    for s in (1, 127, 500, 4096):
        for hd in (32, 100, 128, 256):
            yield f"flash_ws/{s}/{hd}", lambda s=s, hd=hd: ops.flash_backward_workspace(2, s, 8, 2, hd, 2)
    q_lora = variants["qwen2/lora-attn"]["params"]
    yield "autocast_cache/qwen2-lora", lambda: sm.autocast_weight_cache_bytes(q_lora)
    yield "autocast_cache/qwen2-all", lambda: sm.autocast_weight_cache_bytes(_inventory(TINY["qwen2"]))
    for n in (0, 1, 7):
        yield f"clip/{n}", lambda n=n: opt.clip_grad_norm_temporaries_bytes(n)
    for impl in OptimizerImpl:
        for item in (2, 4):
            yield f"opt_tmp/{impl.name}/{item}", lambda impl=impl, item=item: opt.optimizer_step_temporaries_bytes(
                impl, [1000, 1, 123457, 4096], item)
    # 5. Encoders, tiny: the trace tests' grid and more.
    dtypes = ((4, True), (4, False), (2, False))
    for crops, chunk in ((1, 0), (2, 0), (5, 2), (3, 16)):
        for attn in ("eager", "sdpa"):
            for trained in (False, True):
                for ckpt in (False, True):
                    for mdb, amp in dtypes:
                        for masked in ((False, True) if attn == "eager" else (False,)):
                            key = (f"vision/tiny/c={crops}/k={chunk}/{attn}/tr={trained}/ckpt={ckpt}/{mdb}/{amp}"
                                   f"/m={masked}")
                            yield key, lambda crops=crops, chunk=chunk, attn=attn, trained=trained, ckpt=ckpt, \
                                mdb=mdb, amp=amp, masked=masked: enc.vision_tower_memory(
                                    SIGLIP, crops=crops, patches=256, chunk=chunk, attn=attn, trained=trained,
                                    grad_ckpt=ckpt, module_dtype_bytes=mdb, autocast=amp, masked=masked)
    for pieces in (1, 2, 3):
        for attn in ("eager", "sdpa"):
            for trained in (False, True):
                for ckpt in (False, True):
                    for mdb, amp in dtypes:
                        for mo in ((False, True) if attn == "eager" else (False,)):
                            key = f"whisper/tiny/p={pieces}/{attn}/tr={trained}/ckpt={ckpt}/{mdb}/{amp}/o={mo}"
                            yield key, lambda pieces=pieces, attn=attn, trained=trained, ckpt=ckpt, mdb=mdb, \
                                amp=amp, mo=mo: wsp.whisper_encoder_memory(
                                    WHISPER, pieces=pieces, positions=100, attn=attn, trained=trained,
                                    grad_ckpt=ckpt, module_dtype_bytes=mdb, autocast=amp, minicpm_o=mo)
    for rcfg_name, rcfg in (("kv96", RESAMPLER), ("square", dict(RESAMPLER, kv_dim=128))):
        for crops in (1, 2, 3):
            for trained in (False, True):
                for irg in (False, True):
                    for mdb, amp in dtypes:
                        key = f"resampler/{rcfg_name}/c={crops}/tr={trained}/irg={irg}/{mdb}/{amp}"
                        yield key, lambda rcfg=rcfg, crops=crops, trained=trained, irg=irg, mdb=mdb, amp=amp: \
                            enc.resampler_memory(rcfg, crops=crops, patches=256, trained=trained,
                                                 module_dtype_bytes=mdb, autocast=amp, input_requires_grad=irg)
    # 6. Encoders at MiniCPM scale, as step.py calls them.
    for gname, cfg in vision.items():
        for crops, masked in ((1, False), (10, True), (20, True)):
            for trained, ckpt in ((True, True), (True, False), (False, False)):
                for mdb, amp in ((4, True), (2, False)):
                    key = f"vision/{gname}/c={crops}/tr={trained}/ckpt={ckpt}/{mdb}/{amp}"
                    yield key, lambda cfg=cfg, crops=crops, masked=masked, trained=trained, ckpt=ckpt, mdb=mdb, \
                        amp=amp: enc.vision_tower_memory(cfg, crops=crops, patches=1024, attn="eager",
                                                         trained=trained, grad_ckpt=ckpt, module_dtype_bytes=mdb,
                                                         autocast=amp, masked=masked)
    for gname, cfg in resampler.items():
        for crops in (1, 10):
            for irg in (False, True):
                for mdb, amp in ((4, True), (2, False)):
                    key = f"resampler/{gname}/c={crops}/irg={irg}/{mdb}/{amp}"
                    yield key, lambda cfg=cfg, crops=crops, irg=irg, mdb=mdb, amp=amp: enc.resampler_memory(
                        cfg, crops=crops, patches=1024, trained=True, module_dtype_bytes=mdb, autocast=amp,
                        input_requires_grad=irg)
    for gname, cfg in whisper.items():
        for pieces in (1, 2):
            for trained, ckpt in ((True, True), (True, False), (False, False)):
                for mdb, amp in ((4, True), (2, False)):
                    key = f"whisper/{gname}/p={pieces}/tr={trained}/ckpt={ckpt}/{mdb}/{amp}"
                    yield key, lambda cfg=cfg, pieces=pieces, trained=trained, ckpt=ckpt, mdb=mdb, amp=amp: \
                        wsp.whisper_encoder_memory(cfg, pieces=pieces, positions=1500, attn="eager", trained=trained,
                                                   grad_ckpt=ckpt, module_dtype_bytes=mdb, autocast=amp,
                                                   minicpm_o=True)
    # 7. Validation errors (the message is part of the contract).
    bad = {
        "dec/bad-precision": lambda: dsm(TINY["qwen2"], micro_batch=1, seq_len=8, precision="bf16"),
        "dec/bad-attn": lambda: dsm(TINY["qwen2"], micro_batch=1, seq_len=8, precision="fp32", attn="flash"),
        "dec/bad-seq": lambda: dsm(TINY["qwen2"], micro_batch=1, seq_len=1, precision="fp32"),
        "dec/bad-mdb": lambda: dsm(TINY["qwen2"], micro_batch=1, seq_len=8, precision="fp32", module_dtype_bytes=3),
        "dec/bad-act": lambda: dsm(dict(TINY["llama-tied"], hidden_act="relu"), micro_batch=1, seq_len=8,
                                   precision="fp32"),
        "vision/bad-chunk": lambda: enc.vision_tower_memory(SIGLIP, crops=1, patches=4, chunk=-1, trained=True,
                                                            grad_ckpt=False, module_dtype_bytes=2, autocast=False),
        "vision/bad-masked": lambda: enc.vision_tower_memory(SIGLIP, crops=1, patches=4, attn="sdpa", trained=True,
                                                             grad_ckpt=False, module_dtype_bytes=2, autocast=False,
                                                             masked=True),
        "vision/bad-crops": lambda: enc.vision_tower_memory(SIGLIP, crops=0, patches=4, trained=True, grad_ckpt=False,
                                                            module_dtype_bytes=2, autocast=False),
        "whisper/bad-amp": lambda: wsp.whisper_encoder_memory(WHISPER, pieces=1, positions=10, attn="eager",
                                                              trained=True, grad_ckpt=False, module_dtype_bytes=2,
                                                              autocast=True),
        "whisper/bad-o": lambda: wsp.whisper_encoder_memory(WHISPER, pieces=1, positions=10, attn="sdpa",
                                                            trained=True, grad_ckpt=False, module_dtype_bytes=4,
                                                            autocast=False, minicpm_o=True),
        "whisper/bad-dtype": lambda: wsp.whisper_encoder_memory(WHISPER, pieces=1, positions=10, attn="eager",
                                                                trained=True, grad_ckpt=False, module_dtype_bytes=3,
                                                                autocast=False),
        "resampler/missing": lambda: enc.resampler_memory({"embed_dim": 8}, crops=1, patches=4, trained=True,
                                                          module_dtype_bytes=4, autocast=True),
    }
    yield from bad.items()


def _record(value: Any) -> Any:
    """A JSON form of a result: every dataclass field, plus the derived peaks."""
    if dataclasses.is_dataclass(value):
        out: dict[str, Any] = dataclasses.asdict(value)
        out["__type__"] = type(value).__name__
        if isinstance(value, sm.StepMemory):
            out.update({f"phase_bytes.{p}": value.phase_bytes(p) for p in sm.PHASES}, peak_bytes=value.peak_bytes)
        if isinstance(value, encoder_call.EncoderMemory):
            out.update(forward_peak_bytes=value.forward_peak_bytes, backward_peak_bytes=value.backward_peak_bytes,
                       peak_bytes=value.peak_bytes)
        return out
    if isinstance(value, tuple):
        return [_record(v) for v in value]
    return value


def snapshot() -> dict[str, Any]:
    """Every point of the grid: its result, or the error it raised."""
    out: dict[str, Any] = {}
    for key, thunk in _points():
        if key in out:
            raise SystemExit(f"duplicate key {key}")
        try:
            out[key] = _record(thunk())
        except Exception as exc:  # noqa: BLE001 - the error is the point's value
            out[key] = {"__error__": type(exc).__name__, "message": str(exc)}
    return out


def compare(got: dict[str, Any], want: dict[str, Any]) -> list[str]:
    """Differences, one line each (missing keys, differing fields)."""
    diffs = [f"missing: {k}" for k in want if k not in got] + [f"extra: {k}" for k in got if k not in want]
    for key in want.keys() & got.keys():
        if got[key] != want[key]:
            diffs.append(f"{key}: got {got[key]} want {want[key]}")
    return sorted(diffs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="JSON file to write")
    ap.add_argument("--compare", type=Path, help="golden JSON to require exact equality with")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    snap = snapshot()
    elapsed = time.perf_counter() - t0
    args.out.write_text(json.dumps(snap, indent=1, sort_keys=True) + "\n")
    errors = sum(1 for v in snap.values() if isinstance(v, dict) and "__error__" in v)
    print(f"{len(snap)} points ({errors} expected errors) in {elapsed:.1f}s -> {args.out}")
    if args.compare:
        want = json.loads(args.compare.read_text())
        diffs = compare(json.loads(args.out.read_text()), want)
        for line in diffs[:50]:
            print(line)
        print(f"compared {len(want)} points: {'ALL EQUAL' if not diffs else f'{len(diffs)} DIFFER'}")
        return 1 if diffs else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
