"""Parameter inventories: the tensors a layer group holds, derived from its Hugging Face config.

Part of the profile stage. Each builder turns a group's config (Hugging Face field names) into
the exact list of parameter tensors the real module registers, with the names
``named_parameters()`` gives them. Pure arithmetic: tests build the real transformers classes on
the meta device and compare name by name and shape by shape.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class TensorKind(StrEnum):
    """What a parameter tensor belongs to; LoRA targets linears, Adafactor factors matrices."""

    LINEAR = "linear"  # weight of an nn.Linear: shape (out_features, in_features)
    EMBEDDING = "embedding"
    NORM = "norm"
    BIAS = "bias"
    CONV = "conv"
    OTHER = "other"  # free nn.Parameter (queries, position tables, packed attention weights)


class Part(StrEnum):
    """Where a tensor sits in a group. Decoder LLMs split into four parts that ZeRO-3 and LoRA
    treat differently; every other group is one part, ``WHOLE``."""

    EMBED_TOKENS = "embed_tokens"
    LAYERS = "layers"
    NORM = "norm"
    LM_HEAD = "lm_head"
    WHOLE = "whole"


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One parameter tensor.

    Attributes:
        name: the name ``named_parameters()`` gives it inside its group's module.
        shape: its shape, in elements.
        kind: what it belongs to.
        part: where it sits in the group.
        requires_grad: False where the module itself freezes the tensor (Whisper's
            ``embed_positions``), so it is never trained whatever the user selects.
    """

    name: str
    shape: tuple[int, ...]
    kind: TensorKind
    part: Part = Part.WHOLE
    requires_grad: bool = True
    numel: int = field(init=False, repr=False, compare=False)
    """Number of elements (computed once: the search asks for it millions of times)."""

    def __post_init__(self) -> None:
        n = 1
        for d in self.shape:
            n *= d
        object.__setattr__(self, "numel", n)

    @property
    def module(self) -> str:
        """The leaf module's attribute name (``q_proj`` for ``model.layers.0.self_attn.q_proj.weight``)."""
        parts = self.name.split(".")
        return parts[-2] if len(parts) >= 2 else parts[0]


from planner.errors import ProfileError  # noqa: E402  (re-exported: the project's user-input error)

# Bounds on a model's sizes. Far above every released model, so no real config meets them; a
# config beyond them is a typo or hostile, and building its tensors (or its transformers class)
# would take minutes or hours. docs/cli.md lists every bound memplan keeps.
MAX_LAYERS = 1024
"""Blocks in one stack. The deepest released LLM has 126 (Llama 3.1 405B); DeepNet (Wang et al.,
2022) trained 1,000 layers as an experiment."""
MAX_WIDTH = 2**18
"""Hidden, intermediate, head and projection sizes, elements (262,144). The widest released
dense LLM: Llama 3.1 405B, hidden 16,384 and intermediate 53,248."""
MAX_VOCAB = 2**22
"""Vocabulary and codebook sizes (4,194,304). The largest released: Gemma 3's 262,144."""
MAX_HEADS = 4096
"""Attention heads in one layer. The most in a released LLM: 128 (Llama 3.1 405B, DeepSeek-V3)."""
MAX_EXPERTS = 4096
"""Experts in one MoE layer. The most in a released LLM: 384 (Kimi K2)."""
MAX_POSITIONS = 2**24
"""Position tables, audio positions and image sides in pixels (16,777,216). The longest
context released: Llama 4 Scout's 10M tokens."""

_CONFIG_BOUNDS: dict[str, tuple[int, str]] = {
    **dict.fromkeys(("num_hidden_layers", "num_layers", "n_layer", "n_layers", "encoder_layers",
                     "decoder_layers"), (MAX_LAYERS, "layers")),
    **dict.fromkeys(("hidden_size", "intermediate_size", "d_model", "encoder_ffn_dim", "decoder_ffn_dim",
                     "n_embd", "n_inner", "ffn_dim", "embed_dim", "kv_dim", "in_dim", "hidden_dim", "out_dim",
                     "llm_dim", "head_dim", "moe_intermediate_size", "num_queries", "num_mel_bins",
                     "num_channels", "num_vq", "patch_size"), (MAX_WIDTH, "elements")),
    **dict.fromkeys(("vocab_size", "num_audio_tokens", "num_text_tokens"), (MAX_VOCAB, "tokens")),
    **dict.fromkeys(("num_attention_heads", "num_key_value_heads", "encoder_attention_heads",
                     "decoder_attention_heads", "n_head"), (MAX_HEADS, "heads")),
    **dict.fromkeys(("num_experts", "num_local_experts", "n_routed_experts"), (MAX_EXPERTS, "experts")),
    **dict.fromkeys(("max_position_embeddings", "max_source_positions", "n_positions", "image_size"),
                    (MAX_POSITIONS, "positions")),
}
"""Config field -> (largest value accepted, what it counts). Every such field, where it is a number,
must be a whole number from 1 to its bound."""


def check_config_bounds(cfg: Mapping[str, Any], where: str = "") -> None:
    """Refuse a config (a profile group's, or a whole ``config.json`` with its nested
    ``text_config``/``vision_config``...) whose sizes are not whole numbers within the bounds above.

    Raises:
        ProfileError: names the field (its path in nested configs), its value and the bound.
    """
    stack: list[tuple[str, Mapping[str, Any]]] = [(where, cfg)]
    while stack:
        prefix, node = stack.pop()
        for key, value in node.items():
            if isinstance(value, Mapping):
                stack.append((f"{prefix}{key}.", value))
                continue
            bound = _CONFIG_BOUNDS.get(key)
            if bound is None or not isinstance(value, int | float):
                continue  # not a size, or a type (a list, a string, null) the builder judges itself
            limit, unit = bound
            shown = f"{prefix}{key} = {value!r}"[:120]
            if isinstance(value, bool | float):
                raise ProfileError(f"{shown}: must be a whole number of {unit}")
            if value < 1:
                raise ProfileError(f"{shown}: must be at least 1")
            if value > limit:
                raise ProfileError(f"{shown}: more than the {limit:,} {unit} memplan accepts "
                                   "(far beyond every released model)")


def _req(cfg: Mapping[str, Any], key: str) -> Any:
    if key not in cfg:
        raise ProfileError(f"config is missing required field {key!r}")
    return cfg[key]


class _Emitter:
    """Collects tensors with a name prefix; keeps the builders short and readable."""

    def __init__(self) -> None:
        self.tensors: list[TensorSpec] = []

    def linear(self, name: str, in_f: int, out_f: int, bias: bool, part: Part = Part.WHOLE) -> None:
        self.tensors.append(TensorSpec(f"{name}.weight", (out_f, in_f), TensorKind.LINEAR, part))
        if bias:
            self.tensors.append(TensorSpec(f"{name}.bias", (out_f,), TensorKind.BIAS, part))

    def norm(self, name: str, dim: int, bias: bool, part: Part = Part.WHOLE) -> None:
        self.tensors.append(TensorSpec(f"{name}.weight", (dim,), TensorKind.NORM, part))
        if bias:
            self.tensors.append(TensorSpec(f"{name}.bias", (dim,), TensorKind.BIAS, part))

    def add(
        self, name: str, shape: tuple[int, ...], kind: TensorKind, part: Part = Part.WHOLE, requires_grad: bool = True
    ) -> None:
        self.tensors.append(TensorSpec(name, shape, kind, part, requires_grad))


# Per model_type facts that the config does not state. Sources: transformers 5.24
# models/<type>/modeling_<type>.py (the nn.Linear calls of each Attention and MLP class).
_QKV_BIAS_ALWAYS = {"qwen2"}  # Qwen2Attention: q/k/v bias=True, o_proj bias=False
_HAS_QK_NORM = {"qwen3"}  # Qwen3Attention: q_norm, k_norm over head_dim
_FUSED_PROJ = {"phi3"}  # Phi3: qkv_proj and gate_up_proj
_DEFAULT_TIED = {"gemma": True}  # GemmaConfig(tie_word_embeddings=True); the others default False
DECODER_TYPES = ("qwen2", "qwen3", "llama", "mistral", "gemma", "phi3")


def decoder_tensors(cfg: Mapping[str, Any]) -> list[TensorSpec]:
    """A ``*ForCausalLM`` decoder (Qwen2/2.5, Qwen3, Llama, Mistral, Gemma, Phi-3), as the
    transformers class names its parameters (``model.layers.N...``, ``lm_head.weight``).

    A tied ``lm_head`` shares ``embed_tokens``' tensor and is not listed again, as
    ``named_parameters()`` does not list it.
    """
    mtype = _req(cfg, "model_type")
    if mtype not in DECODER_TYPES:
        raise ProfileError(f"decoder model_type {mtype!r} is not supported (supported: {', '.join(DECODER_TYPES)})")
    vocab, hidden = _req(cfg, "vocab_size"), _req(cfg, "hidden_size")
    inter, layers = _req(cfg, "intermediate_size"), _req(cfg, "num_hidden_layers")
    heads = _req(cfg, "num_attention_heads")
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or hidden // heads
    tied = cfg.get("tie_word_embeddings", _DEFAULT_TIED.get(mtype, False))
    attn_bias = bool(cfg.get("attention_bias", False))
    mlp_bias = bool(cfg.get("mlp_bias", False)) if mtype == "llama" else False
    qkv_bias = attn_bias or mtype in _QKV_BIAS_ALWAYS
    o_bias = attn_bias

    e = _Emitter()
    L = Part.LAYERS
    e.add("model.embed_tokens.weight", (vocab, hidden), TensorKind.EMBEDDING, Part.EMBED_TOKENS)
    for i in range(layers):
        p = f"model.layers.{i}"
        if mtype in _FUSED_PROJ:
            e.linear(f"{p}.self_attn.o_proj", heads * head_dim, hidden, False, L)
            e.linear(f"{p}.self_attn.qkv_proj", hidden, (heads + 2 * kv_heads) * head_dim, False, L)
            e.linear(f"{p}.mlp.gate_up_proj", hidden, 2 * inter, False, L)
            e.linear(f"{p}.mlp.down_proj", inter, hidden, False, L)
        else:
            e.linear(f"{p}.self_attn.q_proj", hidden, heads * head_dim, qkv_bias, L)
            e.linear(f"{p}.self_attn.k_proj", hidden, kv_heads * head_dim, qkv_bias, L)
            e.linear(f"{p}.self_attn.v_proj", hidden, kv_heads * head_dim, qkv_bias, L)
            e.linear(f"{p}.self_attn.o_proj", heads * head_dim, hidden, o_bias, L)
            if mtype in _HAS_QK_NORM:
                e.norm(f"{p}.self_attn.q_norm", head_dim, False, L)
                e.norm(f"{p}.self_attn.k_norm", head_dim, False, L)
            e.linear(f"{p}.mlp.gate_proj", hidden, inter, mlp_bias, L)
            e.linear(f"{p}.mlp.up_proj", hidden, inter, mlp_bias, L)
            e.linear(f"{p}.mlp.down_proj", inter, hidden, mlp_bias, L)
        e.norm(f"{p}.input_layernorm", hidden, False, L)
        e.norm(f"{p}.post_attention_layernorm", hidden, False, L)
    e.norm("model.norm", hidden, False, Part.NORM)
    if not tied:
        e.linear("lm_head", hidden, vocab, False, Part.LM_HEAD)
    return e.tensors


def _mha(e: _Emitter, name: str, dim: int) -> None:
    """``nn.MultiheadAttention(dim, heads)`` with bias: packed in_proj plus an out_proj linear."""
    e.add(f"{name}.in_proj_weight", (3 * dim, dim), TensorKind.OTHER)
    e.add(f"{name}.in_proj_bias", (3 * dim,), TensorKind.BIAS)
    e.linear(f"{name}.out_proj", dim, dim, True)


def siglip_vision_tensors(cfg: Mapping[str, Any]) -> list[TensorSpec]:
    """SigLIP vision transformer (transformers ``SiglipVisionTransformer``; MiniCPM's navit
    variant registers the same parameters), names relative to the transformer module."""
    hidden, inter = _req(cfg, "hidden_size"), _req(cfg, "intermediate_size")
    layers, patch = _req(cfg, "num_hidden_layers"), _req(cfg, "patch_size")
    image, channels = _req(cfg, "image_size"), cfg.get("num_channels", 3)
    e = _Emitter()
    e.add("embeddings.patch_embedding.weight", (hidden, channels, patch, patch), TensorKind.CONV)
    e.add("embeddings.patch_embedding.bias", (hidden,), TensorKind.BIAS)
    e.add("embeddings.position_embedding.weight", ((image // patch) ** 2, hidden), TensorKind.EMBEDDING)
    for i in range(layers):
        p = f"encoder.layers.{i}"
        e.norm(f"{p}.layer_norm1", hidden, True)
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            e.linear(f"{p}.self_attn.{proj}", hidden, hidden, True)
        e.norm(f"{p}.layer_norm2", hidden, True)
        e.linear(f"{p}.mlp.fc1", hidden, inter, True)
        e.linear(f"{p}.mlp.fc2", inter, hidden, True)
    e.norm("post_layernorm", hidden, True)
    if cfg.get("vision_use_head", True):
        e.add("head.probe", (1, 1, hidden), TensorKind.OTHER)
        _mha(e, "head.attention", hidden)
        e.norm("head.layernorm", hidden, True)
        e.linear("head.mlp.fc1", hidden, inter, True)
        e.linear("head.mlp.fc2", inter, hidden, True)
    return e.tensors


def whisper_encoder_tensors(cfg: Mapping[str, Any]) -> list[TensorSpec]:
    """Whisper encoder (transformers ``WhisperEncoder``; MiniCPM-o's ``apm`` subclasses it)."""
    d, ffn = _req(cfg, "d_model"), _req(cfg, "encoder_ffn_dim")
    layers, mels = _req(cfg, "encoder_layers"), _req(cfg, "num_mel_bins")
    positions = _req(cfg, "max_source_positions")
    e = _Emitter()
    e.add("conv1.weight", (d, mels, 3), TensorKind.CONV)
    e.add("conv1.bias", (d,), TensorKind.BIAS)
    e.add("conv2.weight", (d, d, 3), TensorKind.CONV)
    e.add("conv2.bias", (d,), TensorKind.BIAS)
    # WhisperEncoder.__init__: self.embed_positions.requires_grad_(False)
    e.add("embed_positions.weight", (positions, d), TensorKind.EMBEDDING, requires_grad=False)
    for i in range(layers):
        p = f"layers.{i}"
        e.linear(f"{p}.self_attn.k_proj", d, d, False)
        e.linear(f"{p}.self_attn.v_proj", d, d, True)
        e.linear(f"{p}.self_attn.q_proj", d, d, True)
        e.linear(f"{p}.self_attn.out_proj", d, d, True)
        e.norm(f"{p}.self_attn_layer_norm", d, True)
        e.linear(f"{p}.fc1", d, ffn, True)
        e.linear(f"{p}.fc2", ffn, d, True)
        e.norm(f"{p}.final_layer_norm", d, True)
    e.norm("layer_norm", d, True)
    return e.tensors


def resampler_tensors(cfg: Mapping[str, Any]) -> list[TensorSpec]:
    """MiniCPM's perceiver resampler (``resampler.py``: learned queries, one cross-attention,
    three LayerNorms and a square projection; its 2-D position embedding is a buffer)."""
    queries, dim = _req(cfg, "num_queries"), _req(cfg, "embed_dim")
    kv_dim = cfg.get("kv_dim", dim)
    e = _Emitter()
    e.add("query", (queries, dim), TensorKind.OTHER)
    if kv_dim != dim:
        e.linear("kv_proj", kv_dim, dim, False)
    _mha(e, "attn", dim)
    for ln in ("ln_q", "ln_kv", "ln_post"):
        e.norm(ln, dim, True)
    e.add("proj", (dim, dim), TensorKind.OTHER)
    return e.tensors


def mlp_projector_tensors(cfg: Mapping[str, Any]) -> list[TensorSpec]:
    """Two linears with an activation between (MiniCPM-o's ``MultiModalProjector``)."""
    in_dim, hidden, out_dim = _req(cfg, "in_dim"), _req(cfg, "hidden_dim"), _req(cfg, "out_dim")
    bias = bool(cfg.get("bias", True))
    e = _Emitter()
    e.linear("linear1", in_dim, hidden, bias)
    e.linear("linear2", hidden, out_dim, bias)
    return e.tensors


# ChatTTS DVAE sizes are hard-coded in MiniCPM-o 2.6 modeling_minicpmo.py (class DVAE, line 2351;
# DVAEDecoder 2306; ConvNeXtBlock 2209; GFSQ 2263), not config fields.
_DVAE_MELS, _DVAE_DIM, _DVAE_HIDDEN, _DVAE_BN, _DVAE_BLOCKS, _DVAE_INTER = 100, 512, 256, 128, 12, 1024
_FSQ_GROUPS, _FSQ_QUANTIZERS, _FSQ_CODE_DIM = 2, 2, 4  # GroupedResidualFSQ(levels=(5,5,5,5), groups=2)
_CHATTTS_BACKBONE_VOCAB = 32000  # LlamaConfig default: ConditionalChatTTS never passes vocab_size


def _dvae_decoder(e: _Emitter, name: str, idim: int, odim: int) -> None:
    e.add(f"{name}.conv_in.0.weight", (_DVAE_BN, idim, 3), TensorKind.CONV)
    e.add(f"{name}.conv_in.0.bias", (_DVAE_BN,), TensorKind.BIAS)
    e.add(f"{name}.conv_in.2.weight", (_DVAE_HIDDEN, _DVAE_BN, 3), TensorKind.CONV)
    e.add(f"{name}.conv_in.2.bias", (_DVAE_HIDDEN,), TensorKind.BIAS)
    for i in range(_DVAE_BLOCKS):
        b = f"{name}.decoder_block.{i}"
        e.add(f"{b}.dwconv.weight", (_DVAE_HIDDEN, 1, 7), TensorKind.CONV)
        e.add(f"{b}.dwconv.bias", (_DVAE_HIDDEN,), TensorKind.BIAS)
        e.norm(f"{b}.norm", _DVAE_HIDDEN, True)
        e.linear(f"{b}.pwconv1", _DVAE_HIDDEN, _DVAE_INTER, True)
        e.linear(f"{b}.pwconv2", _DVAE_INTER, _DVAE_HIDDEN, True)
        e.add(f"{b}.coef", (_DVAE_HIDDEN,), TensorKind.OTHER)
    e.add(f"{name}.conv_out.weight", (odim, _DVAE_HIDDEN, 1), TensorKind.CONV)


def chattts_tensors(cfg: Mapping[str, Any]) -> list[TensorSpec]:
    """MiniCPM-o 2.6's ``ConditionalChatTTS`` (modeling_minicpmo.py, ``__init__`` at line 2685):
    an MLP projector from the LLM, code and text embeddings, weight-normed code heads, the DVAE
    and a Llama backbone (no lm_head). The full derivation is in profiles/models/minicpm.toml."""
    hidden, llm_dim = _req(cfg, "hidden_size"), _req(cfg, "llm_dim")
    audio, text, num_vq = _req(cfg, "num_audio_tokens"), _req(cfg, "num_text_tokens"), _req(cfg, "num_vq")
    e = _Emitter()
    if cfg.get("use_mlp", True):
        e.linear("projector.linear1", llm_dim, hidden, True)
        e.linear("projector.linear2", hidden, hidden, True)
    else:
        e.linear("projector", llm_dim, hidden, False)
    for i in range(num_vq):
        e.add(f"emb_code.{i}.weight", (audio, hidden), TensorKind.EMBEDDING)
    e.add("emb_text.weight", (text, hidden), TensorKind.EMBEDDING)
    for i in range(num_vq):  # torch.nn.utils.parametrizations.weight_norm: g and v
        e.add(f"head_code.{i}.parametrizations.weight.original0", (audio, 1), TensorKind.OTHER)
        e.add(f"head_code.{i}.parametrizations.weight.original1", (audio, hidden), TensorKind.OTHER)
    e.add("dvae.coef", (1, _DVAE_MELS, 1), TensorKind.OTHER)
    e.add("dvae.downsample_conv.0.weight", (_DVAE_DIM, _DVAE_MELS, 3), TensorKind.CONV)
    e.add("dvae.downsample_conv.0.bias", (_DVAE_DIM,), TensorKind.BIAS)
    e.add("dvae.downsample_conv.2.weight", (_DVAE_DIM, _DVAE_DIM, 4), TensorKind.CONV)
    e.add("dvae.downsample_conv.2.bias", (_DVAE_DIM,), TensorKind.BIAS)
    _dvae_decoder(e, "dvae.encoder", _DVAE_DIM, 2 * _DVAE_DIM)
    _dvae_decoder(e, "dvae.decoder", _DVAE_DIM, _DVAE_DIM)
    e.add("dvae.out_conv.weight", (_DVAE_MELS, _DVAE_DIM, 3), TensorKind.CONV)
    group_dim = 2 * _DVAE_DIM // _FSQ_GROUPS
    for g in range(_FSQ_GROUPS):
        q = f"dvae.vq_layer.quantizer.rvqs.{g}"
        e.linear(f"{q}.project_in", group_dim, _FSQ_CODE_DIM, True)
        e.linear(f"{q}.project_out", _FSQ_CODE_DIM, group_dim, True)
    backbone = {
        "model_type": "llama",
        "vocab_size": _CHATTTS_BACKBONE_VOCAB,
        "hidden_size": hidden,
        "intermediate_size": _req(cfg, "intermediate_size"),
        "num_hidden_layers": _req(cfg, "num_hidden_layers"),
        "num_attention_heads": _req(cfg, "num_attention_heads"),
        "tie_word_embeddings": True,
    }
    # A LlamaModel: the decoder's tensors without an lm_head (tied => not listed), all in one part.
    e.tensors += [TensorSpec(t.name, t.shape, t.kind) for t in decoder_tensors(backbone)]
    return e.tensors


BUILDERS: dict[str, Callable[[Mapping[str, Any]], list[TensorSpec]]] = {
    "decoder": decoder_tensors,
    "siglip_vision": siglip_vision_tensors,
    "whisper_encoder": whisper_encoder_tensors,
    "resampler": resampler_tensors,
    "mlp_projector": mlp_projector_tensors,
    "chattts": chattts_tensors,
}


def build_tensors(kind: str, cfg: Mapping[str, Any]) -> list[TensorSpec]:
    """The tensors of a group of ``kind`` with config ``cfg``; raises ProfileError on bad input."""
    try:
        builder = BUILDERS[kind]
    except KeyError:
        raise ProfileError(f"unknown group kind {kind!r} (known: {', '.join(sorted(BUILDERS))})") from None
    check_config_bounds(cfg)
    try:
        return builder(cfg)
    except TypeError as exc:  # a field of the wrong type, e.g. a string where a count belongs
        raise ProfileError(f"{kind} config has a field of the wrong type: {exc}") from None
