"""Rendering of `memplan explain`: the settings read, the estimate, the binding budget, the fixes
and the traps, as rich text or JSON. Only here do bytes become GiB.

The edge of the flow, with `cli_explain`. Nothing here computes memory; the estimate's own
screen and JSON come from `planner.cli.render`.
"""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.console import Group as RichGroup
from rich.table import Table
from rich.text import Text

from planner.cli.render import band_json, estimate_json, estimate_view, gib, needs
from planner.cli.render import console as _console
from planner.estimate.result import Verdict

MEMORY_SETTINGS = (
    "model_name_or_path", "program", "nnodes", "nproc_per_node", "world_size", "micro_batch", "grad_accum",
    "global_batch", "seq_len", "max_slice_nums", "image_max_pixels", "bf16", "fp16", "pure_bf16",
    "bf16_master_weights_and_grads", "bf16_optimizer_states", "gradient_checkpointing",
    "disable_gradient_checkpointing", "flash_attn", "deepspeed", "zero_stage", "offload_optimizer",
    "offload_optimizer_pin_memory", "offload_param", "offload_param_pin_memory", "overlap_comm",
    "contiguous_gradients", "reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold",
    "stage3_max_live_parameters", "sub_group_size", "optimizer_type", "optim", "finetuning_type", "use_lora",
    "lora_rank", "lora_dropout", "lora_target", "lora_modules_to_save", "tune_vision", "tune_llm",
    "freeze_vision_tower", "freeze_multi_modal_projector", "freeze_language_model", "lf_stage",
)
"""Settings that shape the estimate, in the order the table shows them; the rest are listed below it."""

KIND_NAMES = {"deepspeed": "DeepSpeed config", "training_args": "HF TrainingArguments JSON",
              "llamafactory": "LLaMA-Factory YAML", "script": "launch script / arguments"}


def console() -> Console:
    """The console `memplan explain` prints to."""
    return _console()


SHOWN_CHARS = 500
"""Longest value, note or problem shown on screen, characters; the rest is cut (``--json`` keeps
all). The longest real ones are about 300; a hostile file's one 1 MiB word would fill the terminal."""
SHOWN_KEYS = 100
"""Most ignored or unknown keys listed per file on screen, the rest counted; a real file has a few dozen."""


def _cut(text: str, limit: int = SHOWN_CHARS) -> str:
    return text if len(text) <= limit else f"{text[:limit - 3]}..."


def _listed(keys: list[str]) -> str:
    shown = ", ".join(_cut(str(k), 100) for k in keys[:SHOWN_KEYS])
    return shown if len(keys) <= SHOWN_KEYS else f"{shown} (and {len(keys) - SHOWN_KEYS} more)"


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 100_000 else str(v)
    return _cut(str(v))


def _short(path: str) -> str:
    return path if path.startswith("(") else path.rsplit("/", 1)[-1]


def settings_table(merged: Any) -> Table:
    """What was read that shapes the estimate: setting, value, file and key, and how it was resolved."""
    table = Table(title="settings read (the rest below)", title_justify="left", pad_edge=False)
    for col in ("setting", "value", "from", "note"):
        table.add_column(col, overflow="fold")
    for name in MEMORY_SETTINGS:
        s = merged.settings.get(name)
        if s is not None:
            table.add_row(name, _value(s.value), f"{_short(s.file)}: {s.key}", Text(s.note or "", style="dim"))
    return table


def _describe(setup: Any) -> str:
    o, w = setup.options, setup.workload
    if o.engine.value == "torch":
        how = "plain PyTorch (DDP)"
    else:
        off = [f"{k}->{v.value}" for k, v in (("optimizer", o.offload_optimizer), ("params", o.offload_param))
               if v.value != "none"]
        how = f"ZeRO-{int(o.zero)}" + (f" ({', '.join(off)})" if off else "")
    trains = f"LoRA r={o.lora.rank}" if o.lora else "full"
    return (f"{how}, {o.precision.value}, {o.optimizer.value}, ckpt {'on' if o.grad_ckpt else 'off'}, {trains}, "
            f"micro-batch {w.micro_batch} x accumulation {w.grad_accum}, context {w.seq_len}")


def binding_line(est: Any) -> Text:
    """The binding budget, the phase where it peaks, and by how much it is over or under."""
    name = "per GPU" if est.binding == "gpu" else "host RAM per node"
    b = est.per_gpu if est.binding == "gpu" else est.host
    high = b.band.high
    if b.over:
        state, style = f"{gib(-b.free_bytes)} over", "bold red"
    elif b.lower_bound:
        state, style = f"{gib(b.free_bytes)} left on the modelled part", "bold yellow"
    elif high > b.capacity_bytes:
        state, style = (f"{gib(b.free_bytes)} left at the expected figure, {gib(high - b.capacity_bytes)} over at "
                        "the high end"), "bold yellow"
    else:
        state, style = f"{gib(b.capacity_bytes - high)} left at the high end", "bold green"
    return Text(f"binding budget: {name}, at its {b.peak_phase.value} peak: {needs(b)} of "
                f"{gib(b.capacity_bytes)} ({state})", style=style)


def fixes_table(fixes: list[Any]) -> Table:
    """The fixes, cheapest first: what changes, the resulting bytes and the new margin."""
    table = Table(title="fixes, cheapest first (each re-estimated)", title_justify="left")
    table.add_column("#", justify="right", no_wrap=True)
    table.add_column("change", ratio=3, overflow="fold")
    for col in ("GPU GiB", "host GiB", "margin", "tok/s"):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("gives up", ratio=1)
    for i, f in enumerate(fixes, 1):
        e = f.estimate
        change = Text("\n".join(f.changes))
        if f.edits:
            change.append("\nedit: " + "; ".join(f.edits), style="dim")
        table.add_row(str(i), change, f"{e.per_gpu.total_bytes / 2**30:.2f}",
                      f"{e.host.total_bytes / 2**30:.2f}", f"{f.margin:.0%}", f"{f.tokens_per_s:,.0f}",
                      Text("; ".join(g.text for g in f.gives_up) or "-"))
    return table


def explain_view(model: Any, cluster: Any, merged: Any, setup: Any, diagnosis: Any) -> RichGroup:
    """The whole `memplan explain` screen."""
    est = diagnosis.estimate
    parts: list[Any] = [
        Text(f"memplan explain: {model.name} on {cluster.label}, host RAM {gib(cluster.host_ram_bytes)} per node",
             style="bold"),
        Text("read: " + "; ".join(f"{r.file} ({KIND_NAMES[r.kind]})" for r in merged.readings), style="dim"),
        settings_table(merged),
    ]
    rest = [n for n in merged.settings if n not in MEMORY_SETTINGS]
    if rest:
        parts.append(Text("also read (no effect on memory): " + ", ".join(
            f"{n} {_value(merged.settings[n].value)}" for n in rest), style="dim"))
    for r in merged.readings:
        if r.ignored:
            parts.append(Text(f"ignored in {_short(r.file)} (no effect on memory): {_listed(r.ignored)}",
                              style="dim"))
        if r.unknown:
            parts.append(Text(f"unknown to memplan in {_short(r.file)} (not read): {_listed(r.unknown)}",
                              style="yellow"))
    for p in merged.problems:
        parts.append(Text(f"problem: {_cut(p.text)}", style="yellow"))
    for n in merged.notes:
        parts.append(Text(f"note: {_cut(n)}", style="dim"))
    parts += [Text(""), estimate_view(est, f"the estimate: {_describe(setup)}"), binding_line(est)]
    if est.fits:
        parts.append(Text("it fits as written, at the high end of its band: no fix needed.", style="green"))
    elif est.verdict is Verdict.TIGHT:
        parts.append(Text("TIGHT as written: it fits at the expected figure, not at the high end of its band "
                          "(fragmentation, workspaces); the fixes below leave room.", style="yellow"))
        if diagnosis.fixes:
            parts.append(fixes_table(diagnosis.fixes))
    elif est.fits is None:
        what = "one part" if len(est.unmodeled) == 1 else f"{len(est.unmodeled)} parts"
        parts.append(Text(f"UNKNOWN as written: memplan does not model {what} of this step (not modelled, above); "
                          "nothing is over on the modelled part, so no fix was searched.", style="yellow"))
    elif diagnosis.fixes:
        parts.append(fixes_table(diagnosis.fixes))
    else:
        unknown = "; a setup that leaves out what is not modelled here is never a fix" if est.unmodeled else ""
        parts.append(Text(f"no fix found in the search space (see memplan tune for the whole space){unknown}",
                          style="red"))
    if diagnosis.traps:
        parts.append(Text("known traps that apply:", style="bold"))
        for t in diagnosis.traps:
            parts.append(Text(f"  {t.title}: ", style="bold yellow").append(Text(t.text, style="default")))
    return RichGroup(*parts)


def _jsonable(v: Any) -> Any:
    return json.loads(json.dumps(v, default=str))


def fix_json(f: Any) -> dict[str, Any]:
    """One fix in ``memplan explain --json``."""
    e = f.estimate
    return {
        "changes": list(f.changes),
        "edits": list(f.edits),
        "per_gpu_bytes": e.per_gpu.total_bytes,
        "host_bytes": e.host.total_bytes,
        "per_gpu_band": band_json(e.per_gpu.band),
        "host_band": band_json(e.host.band),
        "nvme_bytes": e.nvme_bytes,
        "fits": e.fits,
        "verdict": e.verdict.value,
        "binding": e.binding,
        "margin": f.margin,
        "tokens_per_s": f.tokens_per_s,
        "gives_up": [g.model_dump() for g in f.gives_up],
        "hardware": f.hardware,
        "gpus": f.cluster.label,
        "host_ram_bytes": f.cluster.host_ram_bytes,
        "options": f.options.model_dump(mode="json"),
        "workload": f.workload.model_dump(mode="json"),
    }


def explain_json(model: Any, cluster: Any, merged: Any, setup: Any, diagnosis: Any) -> dict[str, Any]:
    """The ``memplan explain --json`` document (keys in docs/explain.md): the estimate's keys plus
    ``settings``, ``fixes`` and ``traps``."""
    doc = estimate_json(diagnosis.estimate, {
        "model": model.name,
        "gpus": cluster.label,
        "world_size": cluster.world_size,
        "host_ram_bytes": cluster.host_ram_bytes,
        "trainer": setup.trainer,
        "options": setup.options.model_dump(mode="json"),
        "workload": setup.workload.model_dump(mode="json"),
        "zero": {k: getattr(setup.zero, k) for k in setup.zero.__dataclass_fields__},
    })
    doc["files"] = [{"file": r.file, "kind": r.kind, "trainer": r.trainer} for r in merged.readings]
    doc["settings"] = {n: {"value": _jsonable(s.value), "file": s.file, "key": s.key, **({"note": s.note}
                       if s.note else {})} for n, s in merged.settings.items()}
    doc["ignored"] = [{"file": r.file, "key": k} for r in merged.readings for k in r.ignored]
    doc["unknown"] = [{"file": r.file, "key": k} for r in merged.readings for k in r.unknown]
    doc["problems"] = [p.text for p in merged.problems]
    doc["fixes"] = [fix_json(f) for f in diagnosis.fixes]
    doc["traps"] = [{"name": t.name, "title": t.title, "text": t.text, **t.numbers} for t in diagnosis.traps]
    doc["notes"] = list(diagnosis.estimate.notes) + list(merged.notes)
    return doc
