"""The judge's request and result: what a trace asks for, what it measured, and the JSON lines the
trace worker (planner.judge.worker) and its caller (planner.judge.trace) exchange."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from planner.workload.options import Precision

PRECISIONS = tuple(p.value for p in Precision)  # fp32, amp-bf16, amp-fp16, pure-bf16
OPTIMIZERS = ("adamw-forloop", "adamw-foreach", "adamw-fused", "sgd", "adafactor", "none")
ATTENTIONS = ("eager", "sdpa")
DEVICES = ("cuda", "cpu")
PHASES = ("forward", "backward", "optimizer")
MODEL_KINDS = ("causal_lm", "image_text_to_text", "siglip_vision", "whisper_encoder", "module")
"""What ``TraceRequest.model_kind`` can build: a ``*ForCausalLM`` (the default), a vision-language
model (``AutoModelForImageTextToText``: LLaVA, Qwen2-VL, Qwen2.5-VL, Gemma 3), transformers'
``SiglipVisionModel`` or ``WhisperEncoder`` (the vision and audio towers of multimodal models), or
any ``torch.nn.Module`` a factory function builds (``module_factory``)."""
LM_KINDS = ("causal_lm", "image_text_to_text")
"""The kinds whose step is a language model's: ``input_ids`` and ``labels``, HF Trainer's loss."""
VLM_FAMILIES = ("llava", "qwen2_vl", "qwen2_5_vl", "gemma3")
"""The vision-language ``model_type`` values whose processor inputs the judge builds
(``planner.judge.vlm``)."""

# MemTracker's _MemRefType values -> our category names.
CATEGORY_NAMES = {
    "Parameter": "weights",
    "Buffer": "buffers",
    "Gradient": "gradients",
    "Activation": "activations",
    "Temp": "temporaries",
    "Optstate": "optimizer_states",
    "Other": "other",
}
CATEGORIES = tuple(CATEGORY_NAMES.values())

_PROGRESS = "memplan-trace-progress\t"
_RESULT = "memplan-trace-result\t"


class TraceError(RuntimeError):
    """The traced step failed (the worker's error and the tail of its stderr are in the message)."""


@dataclass(frozen=True)
class TraceRequest:
    """One training step to trace.

    Attributes:
        model_config: HF ``config.json`` fields, ``model_type`` included; the model is built with
            ``AutoModelForCausalLM.from_config`` (``AutoModelForImageTextToText`` for
            ``image_text_to_text``). ``use_cache`` is left to the config, as HF
            Trainer leaves it (without gradient checkpointing a ``DynamicCache`` is then filled
            during the training forward; put ``"use_cache": False`` in the config to avoid it).
        precision: ``fp32``; ``amp-bf16``/``amp-fp16`` (fp32 weights, ``torch.autocast`` over
            forward and loss, as HF Trainer); ``pure-bf16`` (``model.to(bfloat16)``, no autocast).
        optimizer: ``adamw-forloop`` | ``adamw-foreach`` | ``adamw-fused`` (torch AdamW),
            ``sgd`` (momentum 0.9), ``adafactor`` (transformers Adafactor as HF Trainer builds it:
            ``scale_parameter=False, relative_step=False``), ``none`` (no optimizer step).
        grad_ckpt: ``gradient_checkpointing_enable({"use_reentrant": False})`` as HF Trainer does.
        attn: ``eager`` | ``sdpa`` (``attn_implementation``).
        frozen_prefixes: parameter name prefixes set to ``requires_grad=False``.
        micro_batch, seq_len: shape of ``input_ids`` and ``labels``; no attention mask is passed
            (packed / unpadded batch), so sdpa runs causal without a mask.
        steps: training steps to run; >= 2 so optimizer states exist during the second step.
        device: ``cuda`` (fake CUDA tensors; GPU behaviour) or ``cpu`` (fake CPU tensors).
        max_grad_norm: HF Trainer's gradient clipping (default 1.0); None skips it.
        model_kind: what to build (``MODEL_KINDS``). For the encoders the step is the encoder's
            forward, a consumer loss ``output.mean()`` (one scalar; its backward hands the
            encoder a gradient of the output's shape and dtype, as a real downstream module
            does) and ``loss.backward()`` when anything requires grad (a frozen encoder whose
            input needs no grad has no backward). ``micro_batch`` is then the encoder batch:
            ``siglip_vision``: crops, ``pixel_values`` [micro_batch, channels, image_size,
            image_size] (so ``(image_size // patch_size)**2`` patches per crop; no mask);
            ``whisper_encoder``: 30-second pieces, ``input_features`` [micro_batch,
            num_mel_bins, 2 * max_source_positions]; ``module``: ``module_factory``'s module.
            ``seq_len`` is ignored for encoders. Inputs are fp32, bf16 under ``pure-bf16``.
        encoder_chunk: run the encoder on slices of this many batch entries and ``torch.cat``
            the outputs, as MiniCPM's ``get_vllm_embedding`` runs the vision tower in chunks of
            ``vision_batch_size`` (16); the chunk outputs stay referenced until the loss is
            computed. 0: the whole batch at once.
        module_factory: ``"package.module:function"`` for ``model_kind="module"``. The worker
            calls ``function(model_config)`` under ``torch.device("meta")``; it returns an
            ``nn.Module`` with a method ``memplan_inputs(batch, device, dtype)`` returning the
            keyword arguments of its forward. The forward returns a tensor (or an object with
            ``last_hidden_state``).
        keep_layers: for ``causal_lm`` and ``image_text_to_text``: build only these layers of the
            decoder stack (indices of the full model, ascending), each as the full model builds it
            (its attention kind, its dense or mixture-of-experts MLP), renumbered 0..n-1; empty:
            every layer. The reduced copies of ``planner.judge.fit`` are built this way.
        lora: for ``causal_lm`` and ``image_text_to_text``: peft LoRA over the model, ``{"r": 8,
            "alpha": 16, "targets": ["q_proj", ...]}`` (peft's ``target_modules``; "all-linear"
            allowed), dropout 0, base frozen as peft freezes it; None: no adapters. In a
            vision-language model only the language model's linears get adapters, as memplan's
            inventory and LLaMA-Factory place them.
        keep_vision_layers: for ``image_text_to_text``: the same as ``keep_layers`` for the
            vision tower's stack of layers (Qwen2.5-VL's full-attention block indices follow).
        images: for ``image_text_to_text``: images per sample (0: a text-only step, the tower
            does not run). ``seq_len`` counts their LLM tokens, as the processor expands them.
        image_size: (width, height) in pixels of each image as the family's processor hands it
            to the tower (LLaVA's center crop, Qwen-VL's ``smart_resize`` size, Gemma 3's
            square); the inputs per family are ``planner.judge.vlm.vlm_inputs``'.
    """

    model_config: dict
    precision: str = "amp-bf16"
    optimizer: str = "adamw-fused"
    grad_ckpt: bool = False
    attn: str = "sdpa"
    frozen_prefixes: tuple[str, ...] = ()
    micro_batch: int = 1
    seq_len: int = 512
    steps: int = 2
    device: str = "cuda"
    max_grad_norm: float | None = 1.0
    model_kind: str = "causal_lm"
    encoder_chunk: int = 0
    module_factory: str = ""
    keep_layers: tuple[int, ...] = ()
    lora: dict | None = None
    keep_vision_layers: tuple[int, ...] = ()
    images: int = 0
    image_size: tuple[int, int] = (0, 0)

    def __post_init__(self) -> None:
        if self.model_kind not in MODEL_KINDS:
            raise ValueError(f"model_kind must be one of {', '.join(MODEL_KINDS)}; got {self.model_kind!r}")
        if self.model_kind in LM_KINDS and "model_type" not in self.model_config:
            raise ValueError("model_config needs a 'model_type'")
        if self.model_kind == "module" and ":" not in self.module_factory:
            raise ValueError("model_kind 'module' needs module_factory='package.module:function'")
        if self.encoder_chunk < 0:
            raise ValueError("encoder_chunk must be >= 0")
        for name, value, allowed in (("precision", self.precision, PRECISIONS),
                                     ("optimizer", self.optimizer, OPTIMIZERS),
                                     ("attn", self.attn, ATTENTIONS), ("device", self.device, DEVICES)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
        if self.micro_batch < 1 or self.seq_len < 2 or self.steps < 1:
            raise ValueError("micro_batch >= 1, seq_len >= 2 and steps >= 1 are required")
        object.__setattr__(self, "frozen_prefixes", tuple(self.frozen_prefixes))
        for name in ("keep_layers", "keep_vision_layers"):
            keep = tuple(int(i) for i in getattr(self, name))
            object.__setattr__(self, name, keep)
            if list(keep) != sorted(set(keep)) or any(i < 0 for i in keep):
                raise ValueError(f"{name} must be distinct, ascending layer indices >= 0")
        object.__setattr__(self, "image_size", tuple(int(x) for x in self.image_size))
        if (self.keep_layers or self.lora) and self.model_kind not in LM_KINDS:
            raise ValueError("keep_layers and lora apply to model_kind 'causal_lm' and 'image_text_to_text' only")
        if (self.keep_vision_layers or self.images) and self.model_kind != "image_text_to_text":
            raise ValueError("keep_vision_layers and images apply to model_kind 'image_text_to_text' only")
        if self.images < 0 or (self.images and min(self.image_size) < 1):
            raise ValueError("images >= 0, with an image_size of at least 1x1 pixels")
        if self.lora is not None and (int(self.lora.get("r", 0)) < 1 or not self.lora.get("targets")):
            raise ValueError("lora needs r >= 1 and targets")

    def to_json(self) -> str:
        """The request as JSON (what the worker reads)."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> TraceRequest:
        """Inverse of ``to_json``."""
        d = json.loads(text)
        d["frozen_prefixes"] = tuple(d.get("frozen_prefixes", ()))
        d["keep_layers"] = tuple(d.get("keep_layers", ()))
        d["keep_vision_layers"] = tuple(d.get("keep_vision_layers", ()))
        d["image_size"] = tuple(d.get("image_size", (0, 0)))
        return cls(**d)


@dataclass(frozen=True)
class TraceResult:
    """What the traced step used on the traced device (bytes; MemTracker's accounting).

    Attributes:
        peak_bytes: max over all steps of all tracked tensor bytes on the device.
        peak_phase: phase in which that peak happened: forward | backward | optimizer.
        at_peak: bytes by category at that peak (weights, buffers, gradients, activations,
            temporaries, optimizer_states, other).
        phase_peaks: peak total in each phase (max over steps).
        module_peaks: peak total while each top-level module was running, in the last step
            (forward and backward, recomputation included), e.g. ``model.embed_tokens``,
            ``model.layers.0``, ``model.norm``, ``lm_head``, ``loss`` (the loss function, which
            the tracer wraps in a module so it is tracked) and ``(root)``.
        seconds: wall time of model build + traced steps in the worker (no interpreter start).
        device: device actually traced (``cpu`` if a fake CUDA device was not possible).
        notes: how the trace deviated from the request or from a GPU, if at all.
        step_peaks: peak total of each step.
        phase_breakdown: bytes by category at each phase's peak.
        after_forward: bytes by category at the end of the last step's forward (loss computed,
            model outputs dropped, before backward): what the step holds for backward.
        after_backward: bytes by category right after the last step's ``loss.backward()``.
        after_step: bytes by category after the last step's ``zero_grad``.
        moment_peaks: the last step's peak in each phase at each *moment*, by category: inside
            decoder layer i (``"3"``: its forward, its backward, its recomputation), before any
            layer ran in that phase (``"pre"``) or after the last one (``"post"``). A phase's peak
            is the largest of its moments; ``planner.judge.fit`` extrapolates each moment.
    """

    peak_bytes: int
    peak_phase: str
    at_peak: dict[str, int]
    phase_peaks: dict[str, int]
    module_peaks: dict[str, int]
    seconds: float
    device: str = "cuda"
    notes: tuple[str, ...] = ()
    step_peaks: tuple[int, ...] = ()
    phase_breakdown: dict[str, dict[str, int]] = field(default_factory=dict)
    after_forward: dict[str, int] = field(default_factory=dict)
    after_backward: dict[str, int] = field(default_factory=dict)
    after_step: dict[str, int] = field(default_factory=dict)
    moment_peaks: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> TraceResult:
        d = dict(d)
        d["notes"] = tuple(d.get("notes", ()))
        d["step_peaks"] = tuple(d.get("step_peaks", ()))
        return cls(**d)
