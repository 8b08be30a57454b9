"""The encoder activation estimates (planner.estimate.encoders, whisper, audio_projection) against
traced steps (planner.judge.trace), MiniCPM's training dummies included.

Every case traces a tiny encoder in a worker subprocess (real transformers SigLIP / Whisper
classes, or the modules built below, under fake CUDA tensors and MemTracker) and checks that the
estimate is within 5 % of the traced activations + temporaries at the forward peak, after the
forward and at the backward peak (gradients included), and within 3 % of the traced step peak
(weights, buffers and inputs from planner.profile.architectures plus the estimate). Two worker processes
trace half the cases each.

These modules are built here because transformers has no class for them, or runs them
differently from MiniCPM:

* ``build_resampler``: MiniCPM-V 2.6 / o 2.6's perceiver resampler, written from the structure
  of its published ``resampler.py`` (learned queries, kv_proj, three LayerNorms, one
  ``nn.MultiheadAttention`` over the crop's patches with a key padding mask and a 2-D sin-cos
  position table [70, 70, D] sliced per crop, a square projection). All crops have the same size.
* ``build_masked_siglip``: transformers' SigLIP vision tower fed the additive [C, 1, L, L] mask
  MiniCPM's navit tower builds when crops differ in length (``_prepare_4d_attention_mask``).
* ``build_navit_dummy``: the tower run as MiniCPM's navit runs the training dummy
  ``self.vpm(torch.zeros((1, 3, 224, 224)))`` for a sample without images: a position table
  larger than the 224 x 224 image, position ids made per call, no mask.
* ``build_minicpm_whisper``: Whisper layers run as MiniCPM-o's ``get_audio_embedding`` runs
  ``MiniCPMWhisperEncoder``, with the padding + chunk mask (audio) or without (the 100-frame
  training dummy).
* ``build_audio_projection``: a copy of MiniCPM-o 2.6's ``MultiModalProjector`` (linear1, ReLU,
  linear2) and the ``AvgPool1d`` with the transposes around it, as ``get_audio_embedding`` runs them.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from planner.estimate.audio_projection import audio_projection_memory, pooled_positions
from planner.estimate.encoder_call import EncoderMemory
from planner.estimate.encoders import resampler_memory, vision_tower_memory
from planner.estimate.whisper import whisper_encoder_memory
from planner.judge.protocol import TraceRequest, TraceResult
from planner.judge.trace import trace_steps
from planner.profile.architectures import (
    mlp_projector_tensors,
    resampler_tensors,
    siglip_vision_tensors,
    whisper_encoder_tensors,
)

pytestmark = pytest.mark.judge

SIGLIP = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, patch_size=14,
              image_size=224, vision_use_head=False)  # 16 x 16 = 256 patches per crop
WHISPER = dict(d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=256, num_mel_bins=80,
               max_source_positions=100, decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=256)
RESAMPLER = dict(num_queries=16, embed_dim=128, kv_dim=96, num_heads=4, grid=[16, 16])
NAVIT = dict(SIGLIP, image_size=448)  # a 32 x 32 position table; MiniCPM's vpm has 70 x 70
PROJECTION = dict(in_dim=64, hidden_dim=192, out_dim=192, bias=True)  # in_dim: WHISPER's d_model
DUMMY_IMAGE_SIDE = 224  # get_vllm_embedding: torch.zeros((1, 3, 224, 224))
DUMMY_MEL_FRAMES = 100  # get_audio_embedding: torch.zeros((1, 80, 100))

ACT_TOLERANCE = 0.05
PEAK_TOLERANCE = 0.03
SLACK_BYTES = 2 * 512  # the consumer loss scalar and its ones_like gradient, which the estimate omits


# --------------------------------------------------------------------------------------------
# Modules without a transformers class (built by the trace worker; torch imported lazily)
# --------------------------------------------------------------------------------------------


def build_resampler(cfg: dict):  # noqa: ANN201
    """An nn.Module equivalent to MiniCPM's ``Resampler`` for crops of ``cfg["grid"]`` patches."""
    import torch
    from torch import nn

    class Resampler(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            d, kv = cfg["embed_dim"], cfg.get("kv_dim", cfg["embed_dim"])
            self.grid, self.kv_dim = tuple(cfg["grid"]), kv
            self.input_grad = bool(cfg.get("input_requires_grad", False))
            self.query = nn.Parameter(torch.zeros(cfg["num_queries"], d))
            self.kv_proj = nn.Linear(kv, d, bias=False) if kv != d else nn.Identity()
            self.attn = nn.MultiheadAttention(d, cfg["num_heads"])
            self.ln_q, self.ln_kv, self.ln_post = (nn.LayerNorm(d, eps=1e-6) for _ in range(3))
            self.proj = nn.Parameter(torch.empty(d, d))
            self.register_buffer("pos_embed", torch.empty(70, 70, d), persistent=False)

        def memplan_inputs(self, batch: int, device, dtype) -> dict:  # noqa: ANN001
            h, w = self.grid
            x = torch.zeros((batch, h * w, self.kv_dim), dtype=dtype, device=device, requires_grad=self.input_grad)
            return {"x": x}

        def forward(self, x):  # noqa: ANN001, ANN202
            h, w = self.grid
            bs, length = x.shape[0], h * w
            key_padding_mask = torch.zeros((bs, length), dtype=torch.bool, device=x.device)
            per_crop = [self.pos_embed[:h, :w, :].reshape((length, -1)).to(x.dtype) for _ in range(bs)]
            pos_embed = nn.utils.rnn.pad_sequence(per_crop, batch_first=True, padding_value=0.0).permute(1, 0, 2)
            del per_crop
            x = self.kv_proj(x)
            x = self.ln_kv(x).permute(1, 0, 2)
            q = self.ln_q(self.query)
            out = self.attn(q.unsqueeze(1).repeat(1, bs, 1), x + pos_embed, x, key_padding_mask=key_padding_mask)[0]
            x = out.permute(1, 0, 2)
            x = self.ln_post(x)
            return x @ self.proj

    return Resampler()


def build_masked_siglip(cfg: dict):  # noqa: ANN201
    """transformers' SigLIP vision tower called with MiniCPM navit's additive padding mask."""
    import torch
    from torch import nn
    from transformers import SiglipVisionConfig, SiglipVisionModel

    tower = SiglipVisionModel._from_config(SiglipVisionConfig(**cfg), attn_implementation="eager",
                                           dtype=torch.float32)

    class MaskedTower(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tower = tower

        def gradient_checkpointing_enable(self, **kwargs) -> None:  # noqa: ANN003
            self.tower.gradient_checkpointing_enable(**kwargs)

        def memplan_inputs(self, batch: int, device, dtype) -> dict:  # noqa: ANN001
            c = tower.config
            patches = (c.image_size // c.patch_size) ** 2
            # which patches are padding does not matter to memory (fake tensors have no values)
            valid = torch.ones((batch, patches), dtype=torch.bool, device=device)
            pixels = torch.zeros((batch, c.num_channels, c.image_size, c.image_size), dtype=dtype, device=device)
            return {"pixel_values": pixels, "patch_mask": valid}

        def forward(self, pixel_values, patch_mask):  # noqa: ANN001, ANN202
            hidden = tower.embeddings(pixel_values)
            # navit: _prepare_4d_attention_mask(patch_attention_mask, hidden_states.dtype), i.e.
            # 1 - mask[:, None, None, :].expand(...).to(dtype), masked_fill(.to(bool), finfo.min)
            bsz, length = patch_mask.shape
            expanded = patch_mask[:, None, None, :].expand(bsz, 1, length, length).to(hidden.dtype)
            inverted = 1.0 - expanded
            del expanded
            mask = inverted.masked_fill(inverted.to(torch.bool), torch.finfo(hidden.dtype).min)
            del inverted
            out = tower.encoder(inputs_embeds=hidden, attention_mask=mask)
            return tower.post_layernorm(out.last_hidden_state)

    return MaskedTower()


def build_navit_dummy(cfg: dict):  # noqa: ANN201
    """transformers' SigLIP layers run as MiniCPM's navit ``SiglipVisionTransformer`` runs the
    training dummy: ``patch_attention_mask`` all ones (so no attention mask), position ids made
    on the host per call and moved to the device, looked up in a table of ``image_size`` /
    ``patch_size`` squared rows, larger than the 224 x 224 image (modeling_navit_siglip.py
    ``SiglipVisionEmbeddings.forward``)."""
    import torch
    from torch import nn
    from transformers import SiglipVisionConfig, SiglipVisionModel

    tower = SiglipVisionModel._from_config(SiglipVisionConfig(**cfg), attn_implementation="eager",
                                           dtype=torch.float32)

    class NavitDummy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tower = tower

        def gradient_checkpointing_enable(self, **kwargs) -> None:  # noqa: ANN003
            self.tower.gradient_checkpointing_enable(**kwargs)

        def memplan_inputs(self, batch: int, device, dtype) -> dict:  # noqa: ANN001
            side = DUMMY_IMAGE_SIDE
            return {"pixel_values": torch.zeros((batch, 3, side, side), dtype=dtype, device=device)}

        def forward(self, pixel_values):  # noqa: ANN001, ANN202
            batch, side = pixel_values.size(0), pixel_values.size(2) // tower.config.patch_size
            patch_attention_mask = torch.ones((batch, side, side), dtype=torch.bool, device=pixel_values.device)
            hidden = self._embeddings(pixel_values)
            patch_attention_mask = patch_attention_mask.view(batch, -1)
            full = torch.any(~patch_attention_mask)  # all ones: attention_mask = None
            del full
            out = tower.encoder(inputs_embeds=hidden, attention_mask=None)
            return tower.post_layernorm(out.last_hidden_state)

        def _embeddings(self, pixel_values):  # noqa: ANN001, ANN202
            emb = tower.embeddings
            embeddings = emb.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
            side = pixel_values.size(2) // tower.config.patch_size
            # made on the host, then moved (bucketized coordinates; their values do not matter here)
            position_ids = torch.full((pixel_values.size(0), side * side), 0).to(pixel_values.device)
            return embeddings + emb.position_embedding(position_ids)

    return NavitDummy()


def build_minicpm_whisper(cfg: dict):  # noqa: ANN201
    """transformers' Whisper encoder layers run the way MiniCPM-o 2.6 runs its
    ``MiniCPMWhisperEncoder`` from ``get_audio_embedding``: an additive padding + chunk mask
    [P, 1, L, L] in conv1's dtype, the position table sliced, ``output_hidden_states=True``.
    ``cfg["memplan_dummy"]``: the training dummy instead, a [1, 80, 100] mel input and no mask."""
    import torch
    from torch import nn
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    cfg = dict(cfg)
    dummy = cfg.pop("memplan_dummy", False)
    enc = WhisperEncoder._from_config(WhisperConfig(**cfg), attn_implementation="eager", dtype=torch.float32)

    class MiniCPMOAudio(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = enc

        def gradient_checkpointing_enable(self, **kwargs) -> None:  # noqa: ANN003
            enc.gradient_checkpointing_enable(**kwargs)

        def memplan_inputs(self, batch: int, device, dtype) -> dict:  # noqa: ANN001
            frames = DUMMY_MEL_FRAMES if dummy else 2 * enc.config.max_source_positions
            return {"input_features": torch.zeros((batch, enc.config.num_mel_bins, frames), dtype=dtype,
                                                  device=device)}

        def forward(self, input_features):  # noqa: ANN001, ANN202
            pieces, length = input_features.shape[0], (input_features.shape[-1] - 1) // 2 + 1
            mask = None if dummy else _minicpm_o_mask(pieces, length, input_features.device)
            embeds = nn.functional.gelu(enc.conv1(input_features))
            embeds = nn.functional.gelu(enc.conv2(embeds)).permute(0, 2, 1)
            hidden = embeds + enc.embed_positions.weight[:length, :]
            states = ()
            for layer in enc.layers:
                states += (hidden,)
                hidden = layer(hidden, mask)
            hidden = enc.layer_norm(hidden)
            states += (hidden,)
            return states[-1]

    def _minicpm_o_mask(pieces: int, length: int, dev):  # noqa: ANN001, ANN202
        padding = torch.zeros((pieces, length), dtype=torch.bool, device=dev)  # seq_range >= lengths
        square = padding.view(pieces, 1, 1, length).expand(pieces, 1, length, length)
        mask = square.to(dtype=enc.conv1.weight.dtype)
        chunk = torch.ones((length, length), dtype=torch.bool, device=dev)  # subsequent_chunk_mask
        square = torch.logical_or(square, torch.logical_not(chunk))
        mask.masked_fill_(square, float("-inf"))  # MiniCPM-o: mask[square] = -inf (same memory)
        return mask

    return MiniCPMOAudio()


def build_audio_projection(cfg: dict):  # noqa: ANN201
    """MiniCPM-o 2.6's ``audio_projection_layer`` and ``audio_avg_pooler`` as
    ``get_audio_embedding`` runs them on the Whisper encoder's last hidden state
    (modeling_minicpmo.py ``MultiModalProjector``, line 2578 of the copy cited in
    profiles/models/minicpm.toml). ``cfg["positions"]``: encoder positions per piece."""
    import torch
    from torch import nn

    class MultiModalProjector(nn.Module):  # copied, with its two hidden widths as the profile's
        def __init__(self, in_dim: int, out_dim: int) -> None:
            super().__init__()
            self.linear1 = nn.Linear(in_features=in_dim, out_features=out_dim, bias=True)
            self.relu = nn.ReLU()
            self.linear2 = nn.Linear(in_features=out_dim, out_features=out_dim, bias=True)

        def forward(self, audio_features):  # noqa: ANN001, ANN202
            hidden_states = self.relu(self.linear1(audio_features))
            hidden_states = self.linear2(hidden_states)
            return hidden_states

    class AudioProjection(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.audio_projection_layer = MultiModalProjector(cfg["in_dim"], cfg["out_dim"])
            self.audio_avg_pooler = nn.AvgPool1d(2, stride=2)  # config.audio_pool_step

        def memplan_inputs(self, batch: int, device, dtype) -> dict:  # noqa: ANN001
            grad = bool(cfg.get("input_requires_grad", False))
            states = torch.zeros((batch, cfg["positions"], cfg["in_dim"]), dtype=dtype, device=device,
                                 requires_grad=grad)
            return {"audio_states": states}

        def forward(self, audio_states):  # noqa: ANN001, ANN202
            audio_embeds = self.audio_projection_layer(audio_states)
            audio_embeds = audio_embeds.transpose(1, 2)
            audio_embeds = self.audio_avg_pooler(audio_embeds)
            audio_embeds = audio_embeds.transpose(1, 2)
            return audio_embeds

    return AudioProjection()


# --------------------------------------------------------------------------------------------
# Cases: (name, trace request, estimate thunk, weight + buffer + input bytes on the device)
# --------------------------------------------------------------------------------------------


def _alloc(nbytes: int) -> int:
    return -(-nbytes // 512) * 512


def _precision(kw: dict) -> tuple[str, int, bool]:
    prec = kw.get("precision", "amp-bf16")
    return prec, (2 if prec == "pure-bf16" else 4), prec.startswith("amp")


def _siglip(name: str, crops: int, *, chunk: int = 0, masked: bool = False, **kw) -> tuple:  # noqa: ANN003
    cfg = SIGLIP
    prec, item, amp = _precision(kw)
    trained = not kw.get("frozen_prefixes")
    patches = (cfg["image_size"] // cfg["patch_size"]) ** 2
    if masked:
        req = TraceRequest(model_config=cfg, model_kind="module", encoder_chunk=chunk, micro_batch=crops,
                           module_factory="tests.estimate.test_encoders_vs_trace:build_masked_siglip", **_common(kw))
    else:
        req = TraceRequest(model_config=cfg, model_kind="siglip_vision", encoder_chunk=chunk, micro_batch=crops,
                           **_common(kw))

    def est() -> EncoderMemory:
        return vision_tower_memory(cfg, crops=crops, patches=patches, chunk=chunk, attn=kw.get("attn", "eager"),
                                   trained=trained, grad_ckpt=kw.get("grad_ckpt", False), module_dtype_bytes=item,
                                   autocast=amp, masked=masked)

    fixed = sum(_alloc(t.numel * item) for t in siglip_vision_tensors(cfg))
    fixed += _alloc(patches * 8)  # position_ids buffer (int64)
    fixed += _alloc(crops * 3 * cfg["image_size"] ** 2 * item)  # pixel_values
    if masked:
        fixed += _alloc(crops * patches)  # the bool patch mask
    return name, req, est, fixed


def _navit_dummy(name: str, **kw) -> tuple:  # noqa: ANN003
    """The training dummy through the vision tower: one 224 x 224 crop on a larger position table,
    estimated as step.py asks for it (1 crop of (224 / 14)^2 patches, no mask)."""
    cfg = NAVIT
    prec, item, amp = _precision(kw)
    patches = (DUMMY_IMAGE_SIDE // cfg["patch_size"]) ** 2
    req = TraceRequest(model_config=cfg, model_kind="module", micro_batch=1,
                       module_factory="tests.estimate.test_encoders_vs_trace:build_navit_dummy", **_common(kw))

    def est() -> EncoderMemory:
        return vision_tower_memory(cfg, crops=1, patches=patches, attn="eager", trained=not kw.get("frozen_prefixes"),
                                   grad_ckpt=kw.get("grad_ckpt", False), module_dtype_bytes=item, autocast=amp)

    fixed = sum(_alloc(t.numel * item) for t in siglip_vision_tensors(cfg))
    fixed += _alloc((cfg["image_size"] // cfg["patch_size"]) ** 2 * 8)  # transformers' position_ids buffer
    fixed += _alloc(3 * DUMMY_IMAGE_SIDE**2 * item)  # the dummy image
    return name, req, est, fixed


def _whisper(name: str, pieces: int, minicpm_o: bool = False, dummy: bool = False, **kw) -> tuple:  # noqa: ANN003
    prec, item, amp = _precision(kw)
    frames = DUMMY_MEL_FRAMES if dummy else 2 * WHISPER["max_source_positions"]
    positions = (frames - 1) // 2 + 1  # conv2: kernel 3, stride 2, padding 1
    if minicpm_o:
        req = TraceRequest(model_config=dict(WHISPER, memplan_dummy=dummy), model_kind="module", micro_batch=pieces,
                           module_factory="tests.estimate.test_encoders_vs_trace:build_minicpm_whisper", **_common(kw))
    else:
        req = TraceRequest(model_config=WHISPER, model_kind="whisper_encoder", micro_batch=pieces, **_common(kw))

    def est() -> EncoderMemory:
        return whisper_encoder_memory(WHISPER, pieces=pieces, positions=positions, attn=kw.get("attn", "eager"),
                                      trained=not kw.get("frozen_prefixes"), grad_ckpt=kw.get("grad_ckpt", False),
                                      module_dtype_bytes=item, autocast=amp, minicpm_o=minicpm_o, masked=not dummy)

    fixed = sum(_alloc(t.numel * item) for t in whisper_encoder_tensors(WHISPER))
    fixed += _alloc(pieces * WHISPER["num_mel_bins"] * frames * item)  # input_features
    return name, req, est, fixed


def _projection(name: str, pieces: int, positions: int, input_grad: bool = False, **kw) -> tuple:  # noqa: ANN003
    cfg = dict(PROJECTION, positions=positions, input_requires_grad=input_grad)
    prec, item, amp = _precision(kw)
    req = TraceRequest(model_config=cfg, model_kind="module", micro_batch=pieces,
                       module_factory="tests.estimate.test_encoders_vs_trace:build_audio_projection", **_common(kw))

    def est() -> EncoderMemory:
        return audio_projection_memory(PROJECTION, pieces=pieces, positions=positions,
                                       trained=not kw.get("frozen_prefixes"), module_dtype_bytes=item, autocast=amp,
                                       input_requires_grad=input_grad)

    fixed = sum(_alloc(t.numel * item) for t in mlp_projector_tensors(PROJECTION))
    fixed += _alloc(pieces * positions * PROJECTION["in_dim"] * item)  # the Whisper encoder's output
    return name, req, est, fixed


def _resampler(name: str, crops: int, input_grad: bool = False, **kw) -> tuple:  # noqa: ANN003
    cfg = dict(RESAMPLER, input_requires_grad=input_grad)
    prec, item, amp = _precision(kw)
    patches = cfg["grid"][0] * cfg["grid"][1]
    req = TraceRequest(model_config=cfg, model_kind="module", micro_batch=crops,
                       module_factory="tests.estimate.test_encoders_vs_trace:build_resampler", **_common(kw))

    def est() -> EncoderMemory:
        return resampler_memory(cfg, crops=crops, patches=patches, trained=True, module_dtype_bytes=item,
                                autocast=amp, input_requires_grad=input_grad)

    fixed = sum(_alloc(t.numel * item) for t in resampler_tensors(cfg))
    fixed += _alloc(70 * 70 * cfg["embed_dim"] * item)  # the 2-D sin-cos table, a buffer
    fixed += _alloc(crops * patches * cfg["kv_dim"] * item)  # the vision tower's output
    return name, req, est, fixed


def _common(kw: dict) -> dict:
    out = {k: v for k, v in kw.items() if k in ("precision", "grad_ckpt", "frozen_prefixes")}
    out.setdefault("attn", kw.get("attn", "eager"))
    return dict(out, optimizer="none", max_grad_norm=None, steps=1)


FROZEN = {"frozen_prefixes": ("",)}  # every parameter frozen (MiniCPM --tune_vision false)

CASES = [
    _siglip("siglip frozen eager amp", 2, **FROZEN),
    _siglip("siglip trained eager amp", 2),
    _siglip("siglip trained eager amp, one crop", 1),  # matmul folds one crop's heads without copies
    _siglip("siglip trained eager amp ckpt chunks", 5, chunk=2, grad_ckpt=True),
    _siglip("siglip trained eager bf16 chunks", 3, chunk=2, precision="pure-bf16"),
    _siglip("siglip trained sdpa amp ckpt", 2, attn="sdpa", grad_ckpt=True),
    _siglip("siglip frozen sdpa bf16 chunks", 5, chunk=2, attn="sdpa", precision="pure-bf16", **FROZEN),
    _siglip("siglip masked trained eager amp", 2, masked=True),
    _siglip("siglip masked frozen eager bf16", 3, masked=True, precision="pure-bf16", **FROZEN),
    _siglip("siglip masked trained eager bf16 ckpt", 2, masked=True, precision="pure-bf16", grad_ckpt=True),
    _siglip("siglip trained sdpa bf16", 3, attn="sdpa", precision="pure-bf16"),
    _whisper("whisper frozen eager amp", 2, **FROZEN),
    _whisper("whisper trained eager amp", 2),
    _whisper("whisper trained sdpa amp ckpt", 2, attn="sdpa", grad_ckpt=True),
    _whisper("whisper frozen sdpa bf16", 2, attn="sdpa", precision="pure-bf16", **FROZEN),
    _whisper("whisper trained eager bf16 ckpt", 3, precision="pure-bf16", grad_ckpt=True),
    _whisper("whisper minicpm-o frozen amp", 2, minicpm_o=True, **FROZEN),
    _whisper("whisper minicpm-o trained amp ckpt", 2, minicpm_o=True, grad_ckpt=True),
    _whisper("whisper minicpm-o trained bf16", 1, minicpm_o=True, precision="pure-bf16"),
    _resampler("resampler amp", 2),
    _resampler("resampler amp, one crop", 1),
    _resampler("resampler bf16", 2, precision="pure-bf16"),
    _resampler("resampler bf16, one crop", 1, precision="pure-bf16"),  # [L, 1, D] views are contiguous
    _resampler("resampler amp, trained tower", 3, input_grad=True),
    # MiniCPM's training dummies (a sample without images / audio) and the audio projection
    _navit_dummy("dummy image siglip frozen eager amp", **FROZEN),
    _navit_dummy("dummy image siglip trained eager amp ckpt", grad_ckpt=True),
    _navit_dummy("dummy image siglip trained eager bf16", precision="pure-bf16"),
    _resampler("dummy image resampler bf16, trained tower", 1, input_grad=True, precision="pure-bf16"),
    _whisper("dummy audio whisper minicpm-o frozen amp", 1, minicpm_o=True, dummy=True, **FROZEN),
    _whisper("dummy audio whisper minicpm-o trained amp ckpt", 1, minicpm_o=True, dummy=True, grad_ckpt=True),
    _whisper("dummy audio whisper minicpm-o trained bf16", 1, minicpm_o=True, dummy=True, precision="pure-bf16"),
    _projection("dummy audio projection bf16, trained encoder", 1, 50, input_grad=True, precision="pure-bf16"),
    _projection("audio projection amp, trained encoder", 2, 100, input_grad=True),
    _projection("audio projection amp", 2, 100),
    _projection("audio projection bf16", 3, 100, precision="pure-bf16"),
    _projection("audio projection amp, weights not trained, encoder trained", 2, 100, input_grad=True, **FROZEN),
    _projection("audio projection frozen bf16", 2, 100, precision="pure-bf16", **FROZEN),
]


@pytest.fixture(scope="module")
def traces() -> dict[str, TraceResult]:
    """All cases traced by two worker processes (one per core), each tracing half the cases in
    turn (``trace_steps``: one torch import per worker)."""
    halves = [CASES[0::2], CASES[1::2]]
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(trace_steps, [req for _, req, _, _ in half], timeout=600) for half in halves]
        results = [f.result() for f in futures]
    return {case[0]: res for half, out in zip(halves, results, strict=True)
            for case, res in zip(half, out, strict=True)}


def _close(estimate: int, traced: int, tolerance: float) -> bool:
    return abs(estimate - traced) <= tolerance * traced + SLACK_BYTES


@pytest.mark.parametrize("name,req,est,fixed", CASES, ids=[c[0] for c in CASES])
def test_estimate_matches_trace(traces: dict[str, TraceResult], name: str, req, est, fixed: int) -> None:  # noqa: ANN001
    res, e = traces[name], est()
    assert res.device == "cuda", res.notes
    fwd, bwd = res.phase_breakdown["forward"], res.phase_breakdown["backward"]
    fwd_traced = fwd["activations"] + fwd["temporaries"]
    assert _close(e.forward_peak_bytes, fwd_traced, ACT_TOLERANCE), (e, fwd)
    assert _close(e.held_for_backward, res.after_forward["activations"], ACT_TOLERANCE), (e, res.after_forward)
    bwd_traced = bwd["activations"] + bwd["temporaries"] + bwd["gradients"]
    assert _close(e.backward_peak_bytes, bwd_traced, ACT_TOLERANCE), (e, bwd)
    # The step peak: weights, buffers and inputs (constant) plus the larger phase.
    assert _close(fixed + e.peak_bytes, res.peak_bytes, PEAK_TOLERANCE), (fixed, e, res.peak_bytes, res.at_peak)
    # The constant part is what planner.profile.architectures says it is.
    at_peak = res.at_peak
    assert at_peak["weights"] + at_peak["buffers"] + at_peak["other"] == fixed


def test_frozen_tower_saves_nothing(traces: dict[str, TraceResult]) -> None:
    """A frozen tower whose input needs no grad: autograd saves nothing and there is no backward."""
    for name, _, est, _ in CASES:
        if "frozen" in name:
            assert est().held_for_backward == 0 and est().backward_peak_bytes == 0
            assert traces[name].after_forward["activations"] <= SLACK_BYTES
            assert traces[name].phase_peaks["backward"] == 0


def test_checkpointing_and_eager_ordering() -> None:
    """Orderings that must hold at full MiniCPM scale (vpm: 1152 wide, 27 layers, 16 heads;
    a 448 x 448 crop is 1024 patches), without tracing."""
    vpm = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
               patch_size=14, image_size=980)
    kw = dict(crops=10, patches=1024, module_dtype_bytes=2, autocast=False)
    eager = vision_tower_memory(vpm, attn="eager", trained=True, grad_ckpt=False, **kw)
    sdpa = vision_tower_memory(vpm, attn="sdpa", trained=True, grad_ckpt=False, **kw)
    ckpt = vision_tower_memory(vpm, attn="eager", trained=True, grad_ckpt=True, **kw)
    frozen = vision_tower_memory(vpm, attn="eager", trained=False, grad_ckpt=False, **kw)
    scores = 10 * 16 * 1024 * 1024
    # eager keeps the fp32 softmax output and its bf16 copy per layer, 6 bytes a score; flash
    # keeps an fp32 logsumexp (4 bytes per query row) instead
    lse = 10 * 16 * 1024 * 4
    assert eager.held_for_backward - sdpa.held_for_backward == pytest.approx(27 * (6 * scores - lse), rel=1e-3)
    assert ckpt.held_for_backward < 27 * 10 * 1024 * 1152 * 2 * 2
    # frozen: one layer's transient (10 bytes a score at the softmax) dominates
    assert 10 * scores <= frozen.forward_peak_bytes < 12 * scores
    assert frozen.held_for_backward == 0


def test_validation() -> None:
    with pytest.raises(ValueError):
        vision_tower_memory(SIGLIP, crops=1, patches=256, attn="flash", trained=True, grad_ckpt=False,
                            module_dtype_bytes=2, autocast=False)
    with pytest.raises(ValueError):
        vision_tower_memory(SIGLIP, crops=1, patches=256, attn="sdpa", trained=True, grad_ckpt=False,
                            module_dtype_bytes=2, autocast=False, masked=True)
    with pytest.raises(ValueError):
        whisper_encoder_memory(WHISPER, pieces=1, positions=100, attn="eager", trained=True, grad_ckpt=False,
                               module_dtype_bytes=2, autocast=True)
    with pytest.raises(ValueError):
        resampler_memory({"embed_dim": 8}, crops=1, patches=4, trained=True, module_dtype_bytes=4, autocast=True)
    with pytest.raises(ValueError):
        vision_tower_memory(SIGLIP, crops=0, patches=256, trained=False, grad_ckpt=False, module_dtype_bytes=2,
                            autocast=False)
    with pytest.raises(ValueError):
        whisper_encoder_memory(WHISPER, pieces=1, positions=100, attn="sdpa", trained=True, grad_ckpt=False,
                               module_dtype_bytes=2, autocast=False, minicpm_o=True)
    # the dummy builds no mask, so sdpa is allowed there
    whisper_encoder_memory(WHISPER, pieces=1, positions=50, attn="sdpa", trained=True, grad_ckpt=False,
                           module_dtype_bytes=2, autocast=False, minicpm_o=True, masked=False)
    with pytest.raises(ValueError):  # AvgPool1d(2) of one position: torch refuses the empty output
        audio_projection_memory(PROJECTION, pieces=1, positions=1, trained=True, module_dtype_bytes=2,
                                autocast=False)
    assert (pooled_positions(1500), pooled_positions(501), pooled_positions(50)) == (750, 250, 25)


def test_encoder_requests() -> None:
    """The tracer's encoder fields: validated, and carried through JSON."""
    with pytest.raises(ValueError):
        TraceRequest(model_config=SIGLIP, model_kind="vision")
    with pytest.raises(ValueError):
        TraceRequest(model_config=SIGLIP, model_kind="module")  # no factory
    with pytest.raises(ValueError):
        TraceRequest(model_config=SIGLIP, model_kind="siglip_vision", encoder_chunk=-1)
    req = TraceRequest(model_config=SIGLIP, model_kind="siglip_vision", encoder_chunk=16, micro_batch=20)
    assert TraceRequest.from_json(req.to_json()) == req
    assert "model_type" not in SIGLIP  # encoders need none; causal LMs still do
    with pytest.raises(ValueError):
        TraceRequest(model_config=SIGLIP)
