"""Known traps: facts about a setup that surprise people, stated with their numbers when they apply.

Beside the diagnosis (`planner.explain.diagnose`), after the estimate in the flow. Each trap is checked
against the setup read from the user's files and quantified with the estimate itself:
ZeRO-3 with every rank loading the whole model, pure bf16 with ZeRO-3 under LLaMA-Factory, "auto"
DeepSpeed buckets sized from the width, images that MiniCPM's script does not truncate with the
text, a frozen LLM that still keeps its activations, and fp32 logits for large vocabularies.
docs/explain.md explains each.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from planner.estimate import Estimate, estimate
from planner.estimate.result import Category, Phase
from planner.estimate.step_memory import logits_loss_bytes
from planner.explain.from_files import FileSetup
from planner.plan import group_plans
from planner.profile.catalog import ModelSpec
from planner.profile.hardware import Cluster
from planner.units import format_bytes
from planner.workload.options import Engine, Precision, ZeroStage

IMAGE_SHARE = 0.5
"""The images-not-truncated trap is stated when a sample's image tokens are at least this share of
its context: then cutting the context mostly cuts text while the vision tower's work stays."""

AUTO_BUCKET_SHARE = 0.05
"""The auto-bucket trap is stated when the buckets HF sized from the hidden size hold at least
this share of the per-GPU peak."""

LOGITS_SHARE = 0.10
"""The fp32-logits trap is stated when the logits and the loss's fp32 copies are at least this
share of the per-GPU peak."""


@dataclass(frozen=True)
class Trap:
    """A known trap that applies to this setup, with the numbers that make it one."""

    name: str
    title: str
    text: str
    numbers: dict[str, int | float] = field(default_factory=dict)


def _row(est: Estimate, group: str, place: str, *cats: Category) -> int:
    for r in est.groups:
        if r.name == group:
            cells = r.gpu if place == "gpu" else r.host
            return sum(cells[c] for c in cats)
    return 0


gib_text = format_bytes
"""Bytes as GiB (MiB below one GiB), for the traps' sentences: `units.format_bytes`."""


_ZERO_FIELD = {"reduce_bucket_size": "reduce_bucket_size", "stage3_prefetch_bucket_size": "prefetch_bucket_size",
               "stage3_param_persistence_threshold": "param_persistence_threshold"}
_AUTO_RULE = {"reduce_bucket_size": "hidden^2", "stage3_prefetch_bucket_size": "0.9 x hidden^2",
              "stage3_param_persistence_threshold": "10 x hidden"}


def _auto_bucket_trap(model: ModelSpec, cluster: Cluster, setup: FileSetup, est: Estimate) -> Trap | None:
    """What HF's "auto" bucket sizes are for this width and what they hold of the per-GPU peak (the
    peak less the same estimate with one-element buckets); None below `AUTO_BUCKET_SHARE`."""
    hidden = model.hidden_size or 0
    item = setup.options.precision.half_dtype.itemsize
    values = {k: getattr(setup.zero, _ZERO_FIELD[k]) for k in setup.auto_buckets}
    sized = {k: v for k, v in values.items() if k != "stage3_param_persistence_threshold"}
    if not sized:
        return None
    tiny = replace(setup.zero, **{_ZERO_FIELD[k]: 1 for k in sized})
    cost = est.per_gpu.total_bytes - estimate(model, cluster, setup.options, setup.workload, tiny).per_gpu.total_bytes
    if cost < AUTO_BUCKET_SHARE * est.per_gpu.total_bytes:
        return None
    listed = "; ".join(f"{k} = {_AUTO_RULE[k]} = {v:,} elements"
                       + (f" ({gib_text(v * item)})" if k in sized else "") for k, v in values.items())
    return Trap(
        "auto_buckets", "DeepSpeed \"auto\" buckets grow with the square of the width",
        f"HF Trainer fills the \"auto\" values from hidden_size {hidden}: {listed}. They hold "
        f"{gib_text(cost)} of the {gib_text(est.per_gpu.total_bytes)} per-GPU peak "
        f"({cost / est.per_gpu.total_bytes:.0%}), and grow with the square of the width; explicit sizes in the "
        "DeepSpeed file bound them.",
        {"hidden_size": hidden, **values, "bucket_gpu_bytes": cost})


def find_traps(model: ModelSpec, cluster: Cluster, setup: FileSetup, est: Estimate) -> list[Trap]:
    """The known traps that apply to this setup (docs/explain.md explains each)."""
    o, w = setup.options, setup.workload
    traps: list[Trap] = []
    zero3 = o.engine is Engine.DEEPSPEED and o.zero is ZeroStage.PARAMETERS
    if zero3:
        whole = estimate(model, cluster, o.model_copy(update={"zero_init": False}), w, setup.zero,
                         activations=False).host.phase_totals[Phase.LOAD]
        with_init = estimate(model, cluster, o.model_copy(update={"zero_init": True}), w, setup.zero,
                             activations=False).host.phase_totals[Phase.LOAD]
        if not o.zero_init or whole > cluster.host_ram_bytes:
            state = "is the case here (--no-zero-init)" if not o.zero_init else "would happen"
            traps.append(Trap(
                "zero3_full_model_per_rank", "ZeRO-3 with every rank loading the whole model",
                f"Without deepspeed.zero.Init (a model built before the DeepSpeed config is known, or not through "
                f"from_pretrained) each of the {cluster.gpus_per_node} ranks on a node loads the whole model into "
                f"host RAM before ZeRO-3 partitions it: {gib_text(whole)} at load instead of "
                f"{gib_text(with_init)} with zero.Init, against {gib_text(cluster.host_ram_bytes)} of host RAM. "
                f"This {state}.",
                {"load_bytes_without_zero_init": whole, "load_bytes_with_zero_init": with_init}))
    if setup.trainer == "llamafactory" and zero3 and o.precision is Precision.PURE_BF16:
        traps.append(Trap(
            "pure_bf16_zero3_llamafactory", "pure_bf16 with DeepSpeed ZeRO-3 in LLaMA-Factory",
            "LLaMA-Factory refuses this combination before training starts (\"`pure_bf16` is incompatible with "
            "DeepSpeed ZeRO-3.\", hparams/parser.py). The estimate above shows what it would need; the fixes keep "
            "to what LLaMA-Factory accepts (pure_bf16 with ZeRO-0/1/2, or ZeRO-3 with mixed precision).", {}))
    bucket_trap = _auto_bucket_trap(model, cluster, setup, est) if setup.auto_buckets else None
    if bucket_trap is not None:
        traps.append(bucket_trap)
    layout = w.image_layout()
    if setup.trainer == "minicpm" and layout is not None and layout.llm_tokens * w.images >= w.seq_len * IMAGE_SHARE:
        tokens = layout.llm_tokens * w.images
        vision = _row(est, "vpm", "gpu", Category.ACTIVATIONS, Category.TEMPORARIES)
        over = f", more than the {w.seq_len} the text is cut to" if tokens > w.seq_len else f" of the {w.seq_len}"
        traps.append(Trap(
            "images_not_truncated", "Images are not truncated with the text",
            f"finetune.py cuts each sample's tokens at model_max_length {w.seq_len} but never drops an image: "
            f"{w.images} image(s) of {w.image_size[0]}x{w.image_size[1]} with max_slice_nums {w.max_slice_nums} "
            f"become {len(layout.crops) * w.images} crops, {layout.patches * w.images:,} SigLIP patches and "
            f"{tokens} LLM tokens{over}. A shorter model_max_length leaves the vision tower's work as it is "
            f"({gib_text(vision)} of its activations per GPU at the peak); max_slice_nums is what bounds it.",
            {"image_tokens": tokens, "crops": len(layout.crops) * w.images, "patches": layout.patches * w.images,
             "vision_gpu_bytes": vision}))
    plans = {g.name: g for g in group_plans(model, o)}
    llm = next((g for g in model.groups if g.kind == "decoder" and g.name in plans), None)
    upstream = [g.name for g in model.groups if g.name in plans and g.kind not in ("decoder", "chattts")
                and plans[g.name].training != "frozen"]  # the TTS reads the LLM's output; the rest feed it
    if llm is not None and plans[llm.name].training == "frozen" and upstream:
        kept = _row(est, llm.name, "gpu", Category.ACTIVATIONS, Category.TEMPORARIES)
        traps.append(Trap(
            "frozen_llm_keeps_activations", "A frozen LLM still keeps its activations",
            f"The {llm.name} is frozen but {', '.join(upstream)} before it train{'s' if len(upstream) == 1 else ''}: "
            "their gradients flow back through every LLM layer, so the LLM keeps its activations and computes "
            f"input gradients as if it trained: {gib_text(kept)} of LLM activations per GPU at the peak.",
            {"llm_activation_bytes": kept}))
    if llm is not None:
        vocab = llm.config.get("vocab_size", 0)
        fwd, bwd = logits_loss_bytes(vocab, w.micro_batch * w.seq_len, o.precision.value)
        if vocab and fwd >= LOGITS_SHARE * est.per_gpu.total_bytes:
            traps.append(Trap(
                "fp32_logits", "fp32 logits for a large vocabulary",
                f"The loss upcasts the [batch, seq, vocab] logits to fp32 and keeps its log-softmax: "
                f"{w.micro_batch} x {w.seq_len} tokens x {vocab:,} vocabulary entries take {gib_text(fwd)} at the "
                f"loss ({gib_text(bwd)} in its backward), {fwd / est.per_gpu.total_bytes:.0%} of the per-GPU peak. "
                "They grow with micro-batch x context, not with the model.",
                {"vocab_size": vocab, "tokens": w.micro_batch * w.seq_len, "forward_bytes": fwd,
                 "backward_bytes": bwd}))
    return traps


