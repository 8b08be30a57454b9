"""FLOPs of one training sample: forward, backward and recomputation, group by group.

Estimate stage, beside the memory estimate; pure arithmetic (no torch, no I/O). Only matrix
products are counted, as ``torch.utils.flop_counter.FlopCounterMode`` counts them (mm, addmm,
bmm, convolution, scaled-dot-product attention); norms, activations, softmax, RoPE and the loss
are not. docs/speed.md derives every rule and compares the totals with FlopCounterMode on real
transformers models (tests/speed/test_speed.py).

* A weight matrix of ``k`` elements costs ``2 k`` FLOPs per position it is applied to in the
  forward (one multiply and one add per weight; Kaplan et al. 2020, Table 1). An embedding
  lookup is not a product and costs nothing; a tied ``lm_head`` still costs ``2 V d``.
* Attention scores and the weighted sum cost ``2 * 2 * s * A`` per query position and layer
  (``A`` = heads x head_dim, ``s`` = keys), the causal mask ignored as in PaLM's MFU
  (Chowdhery et al. 2022, App. B) and Chinchilla (Hoffmann et al. 2022, App. F) and as
  FlopCounterMode counts sdpa.
* Backward: a product's input gradient costs as much as its forward and is computed only when
  its input requires grad, i.e. when a trained tensor lies upstream in the dataflow; its weight
  gradient costs as much again when the weight is trained. Attention's backward costs twice its
  forward (dQ, dK from dS; dV, dP). Hence the textbook 6N for a fully trained model, 4N (less
  the bottom layer's input gradient) for a frozen model with LoRA, 2N plus the head for a model
  that trains only its head.
* Recomputation (non-reentrant checkpointing of every transformer layer): one more forward of
  each checkpointed layer that the backward passes through, less the layer's last product, which
  checkpointing's early stop never reruns.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from planner.profile.architectures import Part, TensorKind, TensorSpec
from planner.profile.catalog import Group, ModelSpec
from planner.workload.inventory import Origin, Param, Workload

FLOPS_PER_MAC = 2  # one multiply and one add
ATTENTION_PRODUCTS = 2  # Q K^T and P V, each s x A multiply-adds per query position
ATTENTION_BACKWARD_FACTOR = 2  # dV = P^T dO, dP = dO V^T, dQ = dS K, dK = dS^T Q: four products for two

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")
# Dataflow position of a module inside one transformer layer. Equal stages are parallel branches
# (q, k and v read the same input, so a trained q_proj does not make k_proj's input need grad).
_STAGE = {
    "input_layernorm": 0, "layer_norm1": 0, "self_attn_layer_norm": 0,
    "q_proj": 1, "k_proj": 1, "v_proj": 1, "qkv_proj": 1,
    "q_norm": 1.5, "k_norm": 1.5,
    "o_proj": 3, "out_proj": 3,
    "post_attention_layernorm": 4, "layer_norm2": 4, "final_layer_norm": 4,
    "gate_proj": 5, "up_proj": 5, "gate_up_proj": 5, "fc1": 5,
    "down_proj": 6, "fc2": 6,
}
_ATTENTION_STAGE = 2
_UNKNOWN_STAGE = 3.5
_LAYER_STRIDE = 10
_GROUP_STRIDE = 100_000  # the second group of a chain sits above the first (resampler above vpm)
_CHAIN_ORDER = {"vision": 0, "audio": 1, "llm": 2}  # encoders run before the LLM
_CHAIN = {"siglip_vision": ("vision", 0), "resampler": ("vision", 1), "whisper_encoder": ("audio", 0),
          "mlp_projector": ("audio", 1), "decoder": ("llm", 0)}


@dataclass
class Unit:
    """One module of the step (or one attention product) in dataflow order.

    Attributes:
        group: the layer group.
        chain: ``vision``, ``audio`` or ``llm``; the LLM's input depends on the encoder chains.
        stage: position in the chain's dataflow; equal stages are parallel.
        layer: the transformer layer (checkpointed under ``grad_ckpt``), None outside layers.
        flops: forward FLOPs per sample.
        weight: the FLOPs are a weight times an input (else attention scores, no weight).
        weight_trained: that weight is trained: its gradient costs ``flops`` again.
        trained: any tensor here is trained (the output then needs grad, and so does everything
            downstream).
        input_needs_grad: the input needs grad whatever lies upstream (LoRA's B reads A's output).
        adapter: a LoRA matrix.
        tensors: ``(group/name, numel)`` of the parameter tensors it uses (what ZeRO-3 gathers
            for it); a tied ``lm_head`` uses ``embed_tokens``' tensor.
    """

    group: str
    chain: str
    stage: float
    layer: int | None
    flops: float = 0.0
    weight: bool = True
    weight_trained: bool = False
    trained: bool = False
    input_needs_grad: bool = False
    adapter: bool = False
    tensors: list[tuple[str, int]] = field(default_factory=list)
    grad_in: bool = False  # set by `units`: the input requires grad
    backward: bool = False  # set by `units`: the backward passes through this unit


@dataclass(frozen=True)
class SampleFlops:
    """FLOPs of one sample (one sequence with its images and audio), all groups.

    Attributes:
        forward, backward: FLOPs of the forward and of the backward.
        recompute: FLOPs of the extra forward of checkpointed layers (0 without ``grad_ckpt``).
        by_group: forward + backward FLOPs of each group.
        skipped: groups built but not modeled (they hold memory but do not run in the step).
    """

    forward: float
    backward: float
    recompute: float
    by_group: dict[str, float]
    skipped: tuple[str, ...] = ()


def _tensor_state(params: Sequence[Param]) -> tuple[dict[str, TensorSpec], dict[str, bool], dict[str, list[Param]]]:
    """Per base tensor: spec and trained (a peft ``modules_to_save`` copy replaces the frozen
    original in the forward); LoRA matrices by the stem of the linear they adapt."""
    spec: dict[str, TensorSpec] = {}
    trained: dict[str, bool] = defaultdict(bool)
    lora: dict[str, list[Param]] = defaultdict(list)
    for p in params:
        name = p.tensor.name
        if p.origin == Origin.LORA:
            lora[name.rsplit(".lora_", 1)[0]].append(p)
            continue
        spec.setdefault(name, p.tensor)
        trained[name] |= p.trainable
    return spec, trained, lora


def _module(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else name


def _layered_units(group: Group, params: Sequence[Param], chain: str, base: float, tokens: float,
                   attn_len: float, per_position: dict[str, float]) -> list[Unit]:
    """Units of a transformer stack (decoder, SigLIP, Whisper): one per module, one attention
    product per layer. ``tokens``: positions per sample; ``attn_len``: keys per query;
    ``per_position``: module -> positions it runs over when not ``tokens`` (convolutions)."""
    spec, trained, lora = _tensor_state(params)
    modules: dict[str, list[str]] = {}
    for name in spec:
        modules.setdefault(_module(name), []).append(name)
    layer_ids = [int(m.group(1)) for n in spec if (m := _LAYER_RE.search(n))]
    top = (max(layer_ids) + 2) * _LAYER_STRIDE if layer_ids else _LAYER_STRIDE
    out: list[Unit] = []
    widths: dict[int, int] = {}
    for order, (mod, names) in enumerate(modules.items()):
        m = _LAYER_RE.search(mod + ".")
        layer = int(m.group(1)) if m else None
        leaf = mod.rsplit(".", 1)[-1]
        tensors = [spec[n] for n in names]
        if layer is not None:
            stage = base + (layer + 1) * _LAYER_STRIDE + _STAGE.get(leaf, _UNKNOWN_STAGE)
        elif any(t.part in (Part.NORM, Part.LM_HEAD) for t in tensors) or leaf in ("post_layernorm", "layer_norm"):
            stage = base + top + (1 if any(t.part is Part.LM_HEAD for t in tensors) else 0)
        else:  # embeddings, patch and audio convolutions, position tables: in the order they run
            stage = base + order * 1e-3
        weight = next((t for t in tensors if t.kind in (TensorKind.LINEAR, TensorKind.CONV)), None)
        unit = Unit(group.name, chain, stage, layer, trained=any(trained[n] for n in names),
                    tensors=[(f"{group.name}/{t.name}", t.numel) for t in tensors])
        if weight is not None:
            unit.flops = FLOPS_PER_MAC * weight.numel * per_position.get(leaf, tokens)
            unit.weight_trained = trained[weight.name]
            if layer is not None and leaf in ("o_proj", "out_proj"):
                widths[layer] = weight.shape[1]
        out.append(unit)
        for ad in sorted(lora.get(mod, ()), key=lambda p: p.tensor.name):  # lora_A, then lora_B
            b_matrix = ".lora_B." in ad.tensor.name
            out.append(Unit(group.name, chain, stage + (0.25 if b_matrix else 0), layer,
                            flops=FLOPS_PER_MAC * ad.numel * tokens, weight_trained=ad.trainable,
                            trained=ad.trainable, input_needs_grad=b_matrix, adapter=True,
                            tensors=[(f"{group.name}/{ad.tensor.name}", ad.numel)]))
    for layer, width in widths.items():  # scores and weighted sum
        flops = FLOPS_PER_MAC * ATTENTION_PRODUCTS * attn_len * width * tokens
        out.append(Unit(group.name, chain, base + (layer + 1) * _LAYER_STRIDE + _ATTENTION_STAGE, layer,
                        flops=flops, weight=False))
    if group.tied_lm_head:  # lm_head multiplies by embed_tokens' matrix
        embed = next(t for t in spec.values() if t.part is Part.EMBED_TOKENS)
        out.append(Unit(group.name, chain, base + top + 1, None, flops=FLOPS_PER_MAC * embed.numel * tokens,
                        weight_trained=trained[embed.name], trained=trained[embed.name],
                        tensors=[(f"{group.name}/{embed.name}", embed.numel)]))
    return out


def _resampler_units(group: Group, params: Sequence[Param], base: float, crops: float, patches: float) -> list[Unit]:
    """MiniCPM's resampler per sample: kv_proj over every patch, the packed in_proj's q part over
    the queries and its k, v parts over the patches, attention of the queries over the patches,
    out_proj and the square ``proj`` over the queries (resampler.py ``forward``)."""
    spec, trained, _ = _tensor_state(params)
    cfg = group.config
    q, e = cfg["num_queries"], cfg["embed_dim"]
    kv = cfg.get("kv_dim", e)
    modules: dict[str, list[str]] = defaultdict(list)
    for name in spec:
        modules[_module(name)].append(name)

    def unit(mods: tuple[str, ...], stage: float, flops: float = 0.0, weight: str | None = None) -> Unit:
        names = [n for m in mods for n in modules.get(m, ())]
        return Unit(group.name, "vision", base + stage, None, flops=flops * crops,
                    weight_trained=bool(weight and trained[weight]), trained=any(trained[n] for n in names),
                    tensors=[(f"{group.name}/{n}", spec[n].numel) for n in names])

    return [
        unit(("kv_proj",), 0, FLOPS_PER_MAC * kv * e * patches if "kv_proj" in modules else 0.0, "kv_proj.weight"),
        unit(("ln_kv",), 1),
        unit(("query", "ln_q"), 1),
        unit(("attn",), 2, FLOPS_PER_MAC * e * e * (q + 2 * patches), "attn.in_proj_weight"),
        Unit(group.name, "vision", base + 3, None, weight=False,
             flops=FLOPS_PER_MAC * ATTENTION_PRODUCTS * q * patches * e * crops),
        unit(("attn.out_proj",), 4, FLOPS_PER_MAC * e * e * q, "attn.out_proj.weight"),
        unit(("ln_post",), 5),
        unit(("proj",), 6, FLOPS_PER_MAC * e * e * q, "proj"),
    ]


_MEMO: dict[tuple, tuple[list[Unit], tuple[str, ...]]] = {}
_MEMO_LIMIT = 256


def units(model: ModelSpec, params: Sequence[Param], workload: Workload,
          grad_ckpt: bool = False) -> tuple[list[Unit], tuple[str, ...]]:
    """``_units``, remembered: the search asks the same question for every ZeRO stage, offload and
    link. The units returned are shared; callers only read them."""
    key = (tuple((g.name, g.kind) for g in model.groups), tuple(params), workload, grad_ckpt)
    hit = _MEMO.get(key)
    if hit is None:
        if len(_MEMO) >= _MEMO_LIMIT:
            _MEMO.clear()
        hit = _MEMO[key] = _units(model, params, workload, grad_ckpt)
    return hit


def _units(model: ModelSpec, params: Sequence[Param], workload: Workload,
           grad_ckpt: bool) -> tuple[list[Unit], tuple[str, ...]]:
    """Every unit that runs in one sample's step, in forward order, with ``grad_in`` and
    ``backward`` resolved; and the groups that hold parameters but are not run or not modeled.

    Under ``grad_ckpt`` the LLM's input embeddings require grad whatever is trained:
    transformers' ``gradient_checkpointing_enable`` calls ``enable_input_require_grads()`` for
    models whose main input is ``input_ids`` (transformers 5.24 modeling_utils.py), so the
    backward runs down to the embedding even when the bottom layers are frozen.

    The encoders run only when the sample has their media: the vision chain (vision tower, then
    resampler) over ``images x crops`` crops of ``max_crop_patches`` patches each (MiniCPM pads
    the crops of a vision batch to the longest), the audio chain (Whisper encoder, then its
    projection) over ``pieces`` of at most 1500 positions. The LLM runs over ``seq_len`` tokens
    and its input needs grad when any running encoder is trained.
    """
    built = {p.group for p in params}
    layout, audio = workload.image_layout(), workload.audio()
    out: list[Unit] = []
    skipped: list[str] = []
    for group in model.groups:
        if group.name not in built:
            continue
        mine = [p for p in params if p.group == group.name]
        chain, position = _CHAIN.get(group.kind, ("", 0))
        runs = chain == "llm" or (chain == "vision" and layout is not None) or (chain == "audio" and audio is not None)
        if not runs:
            skipped.append(group.name)
            continue
        base = position * _GROUP_STRIDE
        if group.kind == "decoder":
            s = workload.seq_len
            out += _layered_units(group, mine, "llm", base, s, s, {})
        elif group.kind == "siglip_vision":
            crops = workload.images * len(layout.crops)
            p = layout.max_crop_patches
            out += _layered_units(group, mine, "vision", base, crops * p, p, {})
        elif group.kind == "resampler":
            out += _resampler_units(group, mine, base, workload.images * len(layout.crops), layout.max_crop_patches)
        elif group.kind == "whisper_encoder":
            positions = min(audio.encoder_positions, 1500)
            n = audio.pieces * positions
            # conv1 (kernel 3, stride 1) runs over the 2 x positions mel frames, conv2 (stride 2) over positions
            out += _layered_units(group, mine, "audio", base, n, positions, {"conv1": 2 * n})
        else:  # mlp_projector: over the encoder's positions, before MiniCPM-o's average pooling
            positions = audio.pieces * min(audio.encoder_positions, 1500)
            out += _layered_units(group, mine, "audio", base, positions, positions, {})
    out.sort(key=lambda u: (_CHAIN_ORDER[u.chain], u.stage))
    _resolve(out, llm_input_grad=grad_ckpt)
    return out, tuple(skipped)


def _resolve(all_units: list[Unit], llm_input_grad: bool = False) -> None:
    """Set ``grad_in`` (a trained tensor lies strictly upstream in the chain, or in a chain that
    feeds it) and ``backward`` (the output needs grad) on every unit; ``llm_input_grad``: the
    LLM's embedding output requires grad regardless."""
    feeds = {"vision": False, "audio": False}
    by_chain: dict[str, list[Unit]] = defaultdict(list)
    for u in all_units:
        by_chain[u.chain].append(u)
    for chain in ("vision", "audio", "llm"):
        items = sorted(by_chain.get(chain, []), key=lambda u: u.stage)
        upstream = any(feeds.values()) if chain == "llm" else False
        forced = llm_input_grad and chain == "llm"
        i = 0
        while i < len(items):
            j = i
            while j < len(items) and items[j].stage == items[i].stage:
                j += 1
            for u in items[i:j]:
                u.grad_in = upstream or u.input_needs_grad
                u.backward = u.grad_in or u.trained or forced
            upstream = upstream or forced or any(u.trained for u in items[i:j])
            forced = False  # only the first stage (the embedding) is forced
            i = j
        if chain in feeds:
            feeds[chain] = upstream


def recomputed(layer_units: list[Unit]) -> list[Unit]:
    """What recomputation runs again of one checkpointed layer: all of its forward but the last
    product (the MLP's down_proj / fc2, and LoRA's B on it), whose output nothing in the layer
    saves, so non-reentrant checkpointing stops before it (``torch.utils.checkpoint`` early stop,
    on by default)."""
    top = max((int(u.stage) for u in layer_units if u.weight), default=None)

    def last(u: Unit) -> bool:
        return u.weight and int(u.stage) == top and (not u.adapter or u.input_needs_grad)

    return [u for u in layer_units if not last(u)]


def sample_flops(model: ModelSpec, params: Sequence[Param], workload: Workload, grad_ckpt: bool) -> SampleFlops:
    """Forward, backward and recomputed FLOPs of one sample (see the module docstring)."""
    all_units, skipped = units(model, params, workload, grad_ckpt)
    fwd = bwd = rec = 0.0
    by_group: dict[str, float] = defaultdict(float)
    layers: dict[tuple[str, int], list[Unit]] = defaultdict(list)
    for u in all_units:
        if u.weight:
            back = u.flops * ((1 if u.grad_in else 0) + (1 if u.weight_trained else 0))
        else:
            back = ATTENTION_BACKWARD_FACTOR * u.flops if u.grad_in else 0.0
        fwd += u.flops
        bwd += back
        by_group[u.group] += u.flops + back
        if u.layer is not None:
            layers[(u.group, u.layer)].append(u)
    if grad_ckpt:
        for layer_units in layers.values():
            if any(u.backward for u in layer_units):  # no backward through a layer, no recomputation
                rec += sum(u.flops for u in recomputed(layer_units))
    return SampleFlops(fwd, bwd, rec, dict(by_group), skipped)
