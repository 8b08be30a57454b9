"""Grouping by parameter names alone (no torch): the module layouts of models that ship their own
code, which the tests cannot build, as their published checkpoints name their tensors."""

from __future__ import annotations

from planner.profile.architectures import Part, TensorKind
from planner.profile.hf_groups import RawParam, group_params


def _groups(names: list[str], prefix: str, remote: bool = True) -> dict[str, tuple[str, list[str]]]:
    params = [RawParam(n, (2, 2), TensorKind.LINEAR, True) for n in names]
    return {g: (kind, [t.name for t in ts]) for g, (kind, ts) in group_params(params, prefix, remote).items()}


def test_minicpm_v_keeps_its_names():
    """modeling_minicpmv.py: ``self.llm = Qwen2ForCausalLM(config)``, ``self.vpm``, ``self.resampler``."""
    names = ["llm.model.embed_tokens.weight", "llm.model.layers.0.self_attn.q_proj.weight", "llm.model.norm.weight",
             "llm.lm_head.weight", "vpm.embeddings.patch_embedding.weight", "vpm.encoder.layers.0.mlp.fc1.weight",
             "resampler.query", "resampler.kv_proj.weight", "apm.layers.0.fc1.weight"]
    groups = _groups(names, "llm.model")
    assert {g: k for g, (k, _) in groups.items()} == {"llm": "decoder", "vpm": "vision_tower",
                                                      "resampler": "projector", "apm": "module"}
    assert groups["llm"][1] == names[:4]


def test_internvl2_and_phi35_vision():
    internvl = _groups(["language_model.model.embed_tokens.weight", "language_model.model.layers.0.mlp.up_proj.weight",
                        "language_model.lm_head.weight", "vision_model.encoder.layers.0.attn.qkv.weight",
                        "mlp1.1.weight"], "language_model.model")
    assert {g: k for g, (k, _) in internvl.items()} == {"llm": "decoder", "vision_model": "vision_tower",
                                                        "mlp1": "projector"}
    phi = _groups(["model.embed_tokens.weight", "model.layers.0.qkv_proj.weight", "model.norm.weight",
                   "lm_head.weight", "model.vision_embed_tokens.glb_GN",
                   "model.vision_embed_tokens.img_processor.vision_model.embeddings.patch_embedding.weight",
                   "model.vision_embed_tokens.img_projection.0.weight"], "model")
    assert phi["llm"][1] == ["model.embed_tokens.weight", "model.layers.0.qkv_proj.weight", "model.norm.weight",
                             "lm_head.weight"]
    assert phi["vision_embed_tokens"][0] == "vision_tower" and len(phi["vision_embed_tokens"][1]) == 2
    assert phi["img_projection"] == ("projector", ["model.vision_embed_tokens.img_projection.0.weight"])


def test_llm_parts_under_any_prefix():
    params = [RawParam(n, (2, 2), TensorKind.LINEAR, True) for n in
              ("model.language_model.embed_tokens.weight", "model.language_model.layers.3.mlp.up_proj.weight",
               "model.language_model.norm.weight", "lm_head.weight")]
    kind, tensors = group_params(params, "model.language_model", remote=False)["llm"]
    assert [t.part for t in tensors] == [Part.EMBED_TOKENS, Part.LAYERS, Part.NORM, Part.LM_HEAD]
