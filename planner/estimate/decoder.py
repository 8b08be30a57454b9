"""Activations and step temporaries: what one training step of a decoder LLM holds beyond the model states.

Pure arithmetic (no torch, no I/O). The step is *replayed* on the step tape
(``planner.estimate.tape``: one byte ledger and one autograd replay, shared with the encoders):
the forward of the transformers model is written out op by op (transformers 5.24
``models/<type>/modeling_<type>.py``), each op allocates its outputs and records an autograd node
with the tensors it saves, exactly as the real op does; the backward then runs the nodes in reverse
creation order, as the autograd engine does. Peaks are taken after every op, by phase. This is
more code than a closed formula, but the closed formulas (docs/activations.md) fall out of it, and
it gets the *moment* of each peak right, which a sum of saved tensors does not: the backward
peak is sometimes the loss backward, sometimes a decoder layer's backward, sometimes the last
embedding gradient. Checkpointed layers follow torch's own rule, ``Recompute.AT_UNPACK`` (as the
encoders do), and the tied embedding's two gradients ``GradSum.AFTER_ALL_USES``.

Where the parts are: the layer's modules in ``planner.estimate.decoder_modules``, the config
fields in ``planner.estimate.decoder_config``, the result and the closed forms for logits and
autocast's cache in ``planner.estimate.step_memory``, the optimizer phase's temporaries in
``planner.estimate.optimizer_phase``.

Docs: docs/activations.md derives every rule and records the comparison with ``planner.judge.trace``
(tests/estimate/test_activations_vs_trace.py; benchmarks/accuracy.py for full-size models).

Conventions:
    * b = micro-batch, s = sequence length, N = b*s tokens, h = hidden, I = intermediate, V = vocab,
      nh / nkv = query / key-value heads, hd = head dim.
    * every tensor is one storage rounded up to 512 bytes (``ALLOC_GRANULE_BYTES``), as the CUDA
      caching allocator rounds each block and as ``MemTracker`` counts them.
    * categories follow MemTracker: ``activations`` (born in forward or in a checkpoint
      recomputation), ``temporaries`` (born in backward or in the optimizer step), ``gradients``
      (parameter ``.grad``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from planner.estimate.decoder_config import DecoderDims
from planner.estimate.decoder_modules import DecoderModules
from planner.estimate.ledger import FP32, HALF, INT64, Param, Tensor, block_bytes
from planner.estimate.optimizer_phase import clip_grad_norm_temporaries_bytes, optimizer_step_temporaries_bytes
from planner.estimate.step_memory import PHASES, StepMemory
from planner.estimate.tape import GradSum, Recompute, Tape
from planner.profile.architectures import decoder_tensors
from planner.workload.options import OptimizerImpl, Precision

__all__ = ["ATTENTIONS", "PRECISIONS", "decoder_step_memory", "layer_saved_bytes"]

PRECISIONS = tuple(p.value for p in Precision)  # fp32, amp-bf16, amp-fp16, pure-bf16
ATTENTIONS = ("eager", "sdpa", "flash_attention_2")

# --------------------------------------------------------------------------------------------
# The decoder
# --------------------------------------------------------------------------------------------


_LLM_PART = re.compile(r"(?:^|\.)((?:layers\.\d+|embed_tokens|norm)\..*)$")


def _canonical(name: str) -> str:
    """An LLM tensor's name as the causal LM names it (``model.layers.0...``, ``lm_head.weight``),
    whatever module holds the LLM: ``model.language_model.layers.0...`` in a transformers
    vision-language model, ``llm.model.layers.0...`` in MiniCPM's own code."""
    if name == "lm_head.weight" or name.endswith(".lm_head.weight"):
        return "lm_head.weight"
    m = _LLM_PART.search(name)
    return f"model.{m.group(1)}" if m else name


def _lora_ranks(params: Sequence[Any] | None) -> dict[str, int]:
    """``{linear stem: rank}`` from LoRA entries of a ``planner.workload.inventory`` inventory."""
    out: dict[str, int] = {}
    for p in params or ():
        name = _canonical(p.tensor.name)
        if name.endswith(".lora_A.weight"):
            out[name.removesuffix(".lora_A.weight")] = p.tensor.shape[0]
    return out


class _Decoder(DecoderModules):
    """One training step of a ``*ForCausalLM`` decoder, replayed on a ``Tape``."""

    def __init__(
        self,
        cfg: Mapping[str, Any],
        dims: DecoderDims,
        *,
        micro_batch: int,
        seq_len: int,
        weight_item: int,
        autocast: bool,
        attn: str,
        grad_ckpt: bool,
        use_cache: bool,
        trainable: Mapping[str, bool],
        lora: Mapping[str, int],
        lora_dropout: float,
        workspaces: bool,
        input_requires_grad: bool,
    ) -> None:
        self.d = dims
        self.b, self.s = micro_batch, seq_len
        self.N = micro_batch * seq_len
        self.w_item = weight_item
        self.autocast = autocast
        self.attn = attn
        self.ckpt = grad_ckpt
        self.use_cache = use_cache and not grad_ckpt
        self.workspaces = workspaces
        self.input_requires_grad = input_requires_grad
        self.lora = lora
        self.lora_dropout = lora_dropout
        self.sim = Tape(autocast=autocast, weight_item=weight_item, recompute=Recompute.AT_UNPACK,
                        grad_sum=GradSum.AFTER_ALL_USES)
        self.params: dict[str, Tensor] = {}
        for t in decoder_tensors(cfg):
            p = Param(t.name, t.numel, weight_item, trainable.get(t.name, True))
            self.params[t.name] = Tensor(t.numel, weight_item, p.trainable, None, p)
        if dims.tied:
            self.params["lm_head.weight"] = self.params["model.embed_tokens.weight"]
        for stem, r in lora.items():
            w = self.params[stem + ".weight"]
            out_f = w.numel // self._in_features(stem)
            for suffix, numel in ((".lora_A.weight", r * self._in_features(stem)), (".lora_B.weight", out_f * r)):
                p = Param(stem + suffix, numel, weight_item, True)
                self.params[stem + suffix] = Tensor(numel, weight_item, True, None, p)
        self.a = FP32 if weight_item == FP32 else HALF  # residual stream: the embedding's dtype

    # ---- shapes -----------------------------------------------------------------------------
    def _in_features(self, stem: str) -> int:
        d = self.d
        leaf = stem.rsplit(".", 1)[-1]
        return {"o_proj": d.heads * d.head_dim, "down_proj": d.intermediate}.get(leaf, d.hidden)

    @property
    def q_dim(self) -> int:
        return self.d.heads * self.d.head_dim

    @property
    def kv_dim(self) -> int:
        return self.d.kv_heads * self.d.head_dim

    def mask_needed(self) -> bool:
        """Whether transformers materialises an attention mask: always for eager; for sdpa only
        when a sliding window does not cover the sequence (masking_utils
        ``_ignore_causal_mask_sdpa``: ``kv_length >= local_attention_size`` keeps the mask)."""
        if self.attn == "eager":
            return True
        w = self.d.sliding_window
        return self.attn == "sdpa" and w is not None and self.s >= w

    # ---- the step ----------------------------------------------------------------------------
    def forward(self) -> tuple[Tensor, int]:
        """Forward with labels under the precision's autocast, then what HF Trainer does with the
        outputs (accelerate's fp32 upcast under amp, then drop). Returns the loss and the bytes
        held for backward."""
        d, sim = self.d, self.sim
        emb = sim.embedding(self.params["model.embed_tokens.weight"], self.N * d.hidden)
        if d.model_type == "gemma":  # GemmaTextScaledWordEmbedding: * embed_scale
            scaled = sim.mul(emb, None)
            sim.drop(emb)
            emb = scaled
        if self.input_requires_grad and not emb.rg:
            # PreTrainedModel.enable_input_require_grads: a forward hook on the input embeddings
            # calls output.requires_grad_(True) (peft and TRL do it for LoRA with checkpointing)
            sim.make_leaf(emb)
        inputs_embeds = emb
        self.cache_keep: list[Tensor] = []
        mask = None
        if self.mask_needed():
            # masking_utils: a bool [b, 1, s, s] (expanded), turned into a float mask of the
            # embeddings' dtype by eager_mask (torch.where), or kept bool for sdpa.
            boolean = sim.new(self.s * self.s, 1)
            if self.attn == "eager":
                mask = sim.new(self.b * self.s * self.s, self.a)
                sim.drop(boolean)
            else:
                mask = boolean
        pos = sim.new(self.s, INT64)  # position_ids = arange(s): [1, s]
        cos = sim.new(self.s * d.head_dim, self.a)  # rotary_emb: [1, s, hd] in the embeddings' dtype
        sin = sim.new(self.s * d.head_dim, self.a)
        x = sim.alias(inputs_embeds)
        for i in range(d.layers):
            # a checkpointed layer keeps its inputs: hidden states, cos/sin, the mask (and position ids)
            out = sim.checkpoint(lambda t, i=i: self.layer(t, i, cos, sin, mask), x, (cos, sin, mask, pos), self.ckpt)
            sim.drop(x)
            x = out
        hn = self.rmsnorm(x, "model.norm.weight", self.N)
        sim.drop(x)
        sim.drop(inputs_embeds, pos, cos, sin, mask)  # the base model returns
        logits = self.linear(hn, "lm_head", d.vocab)
        loss = self.loss(logits)
        sim.drop(hn)  # *ForCausalLM.forward returns
        sim.end_autocast()
        if self.autocast and logits.item != FP32:  # accelerate convert_outputs_to_fp32
            up = sim.new(logits.numel, FP32)
            sim.drop(up)
        sim.drop(logits, *self.cache_keep)  # HF Trainer drops the outputs
        held = sim.ledger.now["activations"] + sim.ledger.now["temporaries"]
        return loss, held

    def loss(self, logits: Tensor) -> Tensor:
        """``ForCausalLMLoss`` (transformers/loss/loss_utils.py): ``logits.float()``, labels padded
        and shifted, ``cross_entropy`` = ``log_softmax`` (saved) + ``nll_loss``."""
        sim = self.sim
        lf = sim.cast(logits, FP32)
        labels = sim.new(self.b * (self.s + 1), INT64)  # nn.functional.pad(labels, (0, 1))
        target = sim.new(self.N, INT64) if self.b > 1 else sim.alias(labels)  # [..., 1:].contiguous()
        lsm = sim.softmax(lf, FP32)  # log_softmax saves its output too (_log_softmax_backward_data)
        loss = sim.new(1, FP32, rg=lsm.rg)
        weight = sim.new(1, FP32)  # nll_loss total_weight
        sim.node([loss], [lsm], [lsm, target, weight], lambda s, g, lsm=lsm: [s.grad(lsm)])  # nll_loss_backward
        sim.drop(target, weight, lsm, labels, lf)  # labels and the fp32 logits stay bound until it returns
        return loss


def layer_saved_bytes(
    cfg: Mapping[str, Any],
    *,
    micro_batch: int,
    seq_len: int,
    precision: str,
    attn: str = "sdpa",
    grad_ckpt: bool = False,
) -> int:
    """What one fully trained decoder layer leaves for backward (its share of
    ``held_for_backward``), from the replay: the difference between the model with one more
    layer and the model as configured. Closed forms for the common cases are in
    docs/activations.md."""
    more = dict(cfg, num_hidden_layers=cfg["num_hidden_layers"] + 1)
    kw = dict(micro_batch=micro_batch, seq_len=seq_len, precision=precision, attn=attn, grad_ckpt=grad_ckpt)
    return decoder_step_memory(more, **kw).held_for_backward - decoder_step_memory(cfg, **kw).held_for_backward


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def _precision(precision: str, module_dtype_bytes: int | None, autocast: bool | None) -> tuple[int, bool]:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    w = FP32 if precision in ("fp32", "amp-bf16", "amp-fp16") else HALF
    ac = precision.startswith("amp")
    if module_dtype_bytes is not None:
        if module_dtype_bytes not in (FP32, HALF):
            raise ValueError("module_dtype_bytes must be 4 or 2")
        w = module_dtype_bytes
        ac = precision.startswith("amp") and w == FP32  # DeepSpeed casts the module, no autocast
    if autocast is not None:
        ac = autocast
    return w, ac


def _trainable_map(dims: DecoderDims, params: Sequence[Any] | None) -> dict[str, bool]:
    """Which base tensors train: a name maps to True if any inventory entry of it trains (a peft
    ``modules_to_save`` copy trains in the original's place)."""
    if params is None:
        return {}
    out: dict[str, bool] = {}
    for p in params:
        if ".lora_" in p.tensor.name:
            continue
        name = _canonical(p.tensor.name)
        out[name] = out.get(name, False) or bool(p.trainable)
    return out


def decoder_step_memory(
    cfg: Mapping[str, Any],
    *,
    micro_batch: int,
    seq_len: int,
    precision: str,
    attn: str = "sdpa",
    grad_ckpt: bool = False,
    optimizer_impl: OptimizerImpl | str = OptimizerImpl.TORCH_ADAMW_FUSED,
    params: Sequence[Any] | None = None,
    module_dtype_bytes: int | None = None,
    autocast: bool | None = None,
    use_cache: bool | None = None,
    max_grad_norm: bool = True,
    workspaces: bool = True,
    input_requires_grad: bool | None = None,
    lora_dropout: float = 0.0,
) -> StepMemory:
    """What one training step of a ``*ForCausalLM`` decoder holds beyond its model states.

    Args:
        cfg: the HF config fields of the decoder (``model_type`` among qwen2, qwen3, llama,
            mistral, gemma, phi3).
        micro_batch, seq_len: tokens of one micro-step (no padding: a packed or unpadded batch).
        precision: ``fp32``; ``amp-bf16`` / ``amp-fp16`` (fp32 weights, autocast over forward and
            loss, as HF Trainer); ``pure-bf16`` (bf16 module, no autocast).
        attn: ``eager``, ``sdpa`` (routed as a GPU does: flash for 16-bit without a mask, else
            memory-efficient without GQA, else math) or ``flash_attention_2`` (saves like flash;
            not traceable on a CPU-only machine).
        grad_ckpt: HF's non-reentrant ``gradient_checkpointing_enable``: each decoder layer keeps
            its input, and its forward is replayed during its backward.
        optimizer_impl: the optimizer implementation (its step temporaries).
        params: the run's parameter inventory (``planner.workload.inventory.trainable_inventory``): which
            tensors train, and LoRA adapters (``*.lora_A.weight`` / ``*.lora_B.weight``).
            None: everything trains.
        module_dtype_bytes: the module's parameter dtype when it differs from what ``precision``
            implies. DeepSpeed casts the module to 16 bit and runs no autocast: pass 2 with
            ``amp-bf16``; activation-wise that is ``pure-bf16``.
        autocast: override whether forward runs under autocast.
        use_cache: whether the forward fills a ``DynamicCache`` (HF Trainer leaves the config's
            ``use_cache``, True by default; gradient checkpointing turns it off). None: from cfg.
        max_grad_norm: gradient clipping runs (HF Trainer default 1.0).
        workspaces: count kernel workspaces that meta kernels do not show (FlashAttention
            backward's dq accumulator, softmax_d and GQA-expanded dk/dv). The tracer cannot see
            them; tests comparing with it pass False.
        input_requires_grad: the embeddings' output requires grad
            (``enable_input_require_grads``), so frozen leading layers save for backward. None:
            True with gradient checkpointing (transformers 5's ``gradient_checkpointing_enable``
            calls it for every ``input_ids`` model; peft, TRL and LLaMA-Factory call it for LoRA).
        lora_dropout: peft's ``lora_dropout`` (0 <= p < 1; the probability itself changes no
            byte, only whether it is 0): above 0 each adapter keeps a dropped copy of its input
            and a bool mask for backward (docs/activations.md, "Frozen parameters and LoRA").
    """
    if attn not in ATTENTIONS:
        raise ValueError(f"attn must be one of {', '.join(ATTENTIONS)}; got {attn!r}")
    if micro_batch < 1 or seq_len < 2:
        raise ValueError("micro_batch >= 1 and seq_len >= 2 are required")
    if not 0 <= lora_dropout < 1:
        raise ValueError(f"lora_dropout must be in [0, 1); got {lora_dropout!r}")
    dims = DecoderDims.from_config(cfg)
    w_item, ac = _precision(precision, module_dtype_bytes, autocast)
    cache = cfg.get("use_cache", True) if use_cache is None else use_cache
    lora = _lora_ranks(params)
    if input_requires_grad is None:
        input_requires_grad = grad_ckpt
    dec = _Decoder(
        cfg,
        dims,
        micro_batch=micro_batch,
        seq_len=seq_len,
        weight_item=w_item,
        autocast=ac,
        attn=attn,
        grad_ckpt=grad_ckpt,
        use_cache=bool(cache),
        trainable=_trainable_map(dims, params),
        lora=lora,
        lora_dropout=lora_dropout,
        workspaces=workspaces,
        input_requires_grad=input_requires_grad,
    )
    sim = dec.sim
    loss, held = dec.forward()
    sim.ledger.phase = "backward"
    root = sim.new(1, FP32)  # torch.ones_like(loss): held by backward() until it returns
    sim.backward(loss, sim.alias(root))
    sim.drop(root, loss)
    fwd, bwd = sim.ledger.peak("forward"), sim.ledger.peak("backward")

    trained = {id(t.param): t for t in dec.params.values() if t.param is not None and t.param.trainable}
    sizes = [block_bytes(t.nbytes) for t in trained.values()]
    opt_grads = sum(sizes)
    clip = clip_grad_norm_temporaries_bytes(len(sizes)) if max_grad_norm else 0
    step = optimizer_step_temporaries_bytes(optimizer_impl, [t.numel for t in trained.values()], w_item)
    opt_tmp = max(clip, step)
    inputs = 2 * block_bytes(micro_batch * seq_len * INT64)
    mem = {
        "forward": fwd["activations"] + fwd["temporaries"] + fwd["gradients"],
        "backward": bwd["activations"] + bwd["temporaries"] + bwd["gradients"],
        "optimizer": opt_grads + opt_tmp,
    }
    phase = max(PHASES, key=lambda p: (mem[p], -PHASES.index(p)))
    return StepMemory(
        forward_activations=fwd["activations"],
        forward_temporaries=fwd["temporaries"] + fwd["gradients"],
        held_for_backward=held,
        backward_activations=bwd["activations"],
        backward_temporaries=bwd["temporaries"],
        backward_gradients=bwd["gradients"],
        optimizer_gradients=opt_grads,
        optimizer_temporaries=opt_tmp,
        inputs=inputs,
        peak_phase=phase,
    )
