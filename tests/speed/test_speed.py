"""The speed model (planner.speed.flops, planner.speed.traffic, planner.speed.step_time) against real components.

* FLOPs: real transformers models (Qwen2.5-0.5B from its profile, tiny Qwen2s with a frozen part
  and with peft LoRA, SigLIP / resampler / Whisper encoders) are built on the meta device, turned
  into fake tensors and run forward + backward under ``torch.utils.flop_counter.FlopCounterMode``;
  the model's FLOPs must match (they do exactly; the tolerance only absorbs float rounding).
* Communication: DeepSpeed's own comms logger on a real engine (tests/ds_harness.py, two CPU
  ranks over gloo) against ``traffic.collectives`` for ZeRO-2 with accumulation and ZeRO-3 with
  checkpointing, byte for byte.
* Behaviour: offloading adds its terms, NVLink vs PCIe scales the communication by the link
  ratio, checkpointing adds one forward of the layers less early stop.

About 60 s on two cores; the DeepSpeed part is most of it.
"""

from __future__ import annotations

import dataclasses
import math

import pytest

from planner.estimate.states import ZeroSettings
from planner.profile.architectures import (
    build_tensors,
    resampler_tensors,
    siglip_vision_tensors,
    whisper_encoder_tensors,
)
from planner.profile.catalog import Group, ModelSpec, build_model
from planner.profile.hardware import Cluster
from planner.speed.flops import sample_flops
from planner.speed.step_time import (
    CPU_ADAM_BYTES_PER_ELEMENT,
    HOST_MEMORY_BYTES_PER_S,
    MODEL_FLOPS_UTILIZATION,
    TERMS,
    describe,
    peak_flops,
    peer_link,
    step_time,
)
from planner.speed.traffic import collectives
from planner.workload.inventory import Workload, trainable_inventory
from planner.workload.options import Engine, LoraOptions, Offload, Precision, TrainingOptions, ZeroStage

TINY = {"model_type": "qwen2", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 160,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "tie_word_embeddings": False, "max_position_embeddings": 256}
SIGLIP = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2,
          "patch_size": 14, "image_size": 448, "vision_use_head": False}  # one 448 px crop: 1024 patches
RESAMPLER = {"num_queries": 16, "embed_dim": 64, "kv_dim": 64, "num_heads": 2, "grid": [32, 32]}
WHISPER = {"d_model": 64, "encoder_layers": 1, "encoder_attention_heads": 2, "encoder_ffn_dim": 128,
           "num_mel_bins": 80, "max_source_positions": 100, "decoder_layers": 1, "decoder_attention_heads": 2,
           "decoder_ffn_dim": 128}  # 2 s of audio: 200 mel frames, 100 positions, one piece
REL = 1e-6


def _spec(*groups: tuple[str, str, dict]) -> ModelSpec:
    built = []
    for name, kind, cfg in groups:
        builder = {"siglip_vision": siglip_vision_tensors, "resampler": resampler_tensors,
                   "whisper_encoder": whisper_encoder_tensors}.get(kind)
        tensors = builder(cfg) if builder else build_tensors(kind, cfg)
        built.append(Group(name, kind, tuple(tensors), dict(cfg)))
    return ModelSpec("test", "tests/test_speed.py", tuple(built))


# --------------------------------------------------------------------------------------------
# FlopCounterMode on fake models (torch imported inside, so collecting the tests stays cheap)
# --------------------------------------------------------------------------------------------


def _counted(build, inputs, frozen=(), lora: LoraOptions | None = None, grad_ckpt=False) -> tuple[float, float]:
    """(forward, backward) FLOPs FlopCounterMode counts for one step of the module ``build()``
    makes on the meta device; ``inputs(model)`` gives its keyword inputs, the loss is ``.loss``
    or the output's mean."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    from planner.judge.models import fake_from_meta

    with torch.device("meta"):
        model = build()
        if lora is not None:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=lora.rank, target_modules=list(lora.targets),
                                                     lora_dropout=0.0))
    with FakeTensorMode(allow_non_fake_inputs=True):
        fake_from_meta(model, "cpu", "fp32")
        for name, p in model.named_parameters():
            if any(name.startswith(f) for f in frozen):
                p.requires_grad_(False)
        if grad_ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        with FlopCounterMode(display=False) as counter:
            out = model(**inputs(model))
            loss = out.loss if hasattr(out, "loss") else (out if isinstance(out, torch.Tensor)
                                                         else out.last_hidden_state).float().mean()
            forward = counter.get_total_flops()
            loss.backward()
        return forward, counter.get_total_flops() - forward


def _causal_lm(cfg: dict):
    def build():
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        fields = {k: v for k, v in cfg.items() if k not in ("model_type", "torch_dtype")}
        config = AutoConfig.for_model(cfg["model_type"], **fields)
        return AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)

    return build


def _token_inputs(seq: int):
    def inputs(model):
        import torch

        ids = torch.zeros((1, seq), dtype=torch.long)
        return {"input_ids": ids, "labels": ids}

    return inputs


def _close(ours: float, counted: float) -> bool:
    return math.isclose(ours, counted, rel_tol=REL, abs_tol=1.0)


@pytest.mark.judge
@pytest.mark.parametrize("grad_ckpt", [False, True], ids=["plain", "grad_ckpt"])
def test_qwen25_05b_flops_equal_flop_counter(catalog, grad_ckpt: bool) -> None:
    """6N + attention for a fully trained model; checkpointing adds the layers' forward without
    the down_proj that early stop skips (1.07 N per token of 1.49 N)."""
    profile = catalog.model("qwen2.5-0.5b")
    seq = 128
    fwd, bwd = _counted(_causal_lm(profile.groups[0].config), _token_inputs(seq), grad_ckpt=grad_ckpt)
    model = build_model(profile)
    ours = sample_flops(model, trainable_inventory(model, TrainingOptions()), Workload(seq_len=seq), grad_ckpt)
    assert _close(ours.forward, fwd)
    assert _close(ours.backward + ours.recompute, bwd)
    assert (ours.recompute > 0) == grad_ckpt


TINY_CASES = {
    # name: (options, the same freezing as parameter-name prefixes, grad_ckpt)
    "layers-only": (TrainingOptions(freeze=("llm.embed_tokens", "llm.lm_head")),
                    ("model.embed_tokens", "lm_head"), False),
    "head-only": (TrainingOptions(train=("llm.lm_head",)), ("model.",), False),
    "lora": (TrainingOptions(lora=LoraOptions(rank=8)), (), False),
    # checkpointing makes the embedding output require grad (enable_input_require_grads)
    "lora-ckpt": (TrainingOptions(lora=LoraOptions(rank=8), grad_ckpt=True), (), True),
}


@pytest.mark.judge
@pytest.mark.parametrize("case", list(TINY_CASES))
def test_partly_trained_flops_equal_flop_counter(case: str) -> None:
    options, prefixes, ckpt = TINY_CASES[case]
    seq = 64
    fwd, bwd = _counted(_causal_lm(TINY), _token_inputs(seq), frozen=prefixes, lora=options.lora, grad_ckpt=ckpt)
    model = _spec(("llm", "decoder", TINY))
    ours = sample_flops(model, trainable_inventory(model, options), Workload(seq_len=seq), ckpt)
    assert _close(ours.forward, fwd)
    assert _close(ours.backward + ours.recompute, bwd)


@pytest.mark.judge
def test_encoder_flops_equal_flop_counter() -> None:
    """Each encoder traced alone, trained, with the gradient its consumer hands back; the
    resampler's input needs grad because the vision tower below it is trained."""
    from tests.estimate.test_encoders_vs_trace import build_minicpm_whisper, build_resampler

    def siglip():
        import torch
        from transformers import SiglipVisionConfig, SiglipVisionModel

        return SiglipVisionModel._from_config(SiglipVisionConfig(**SIGLIP), attn_implementation="eager",
                                              dtype=torch.float32)

    def pixels(model):
        import torch

        return {"pixel_values": torch.zeros((1, 3, 448, 448))}

    def features(model):
        import torch

        return {"input_features": torch.zeros((1, 80, 200))}

    def patches(model):
        import torch

        return {"x": torch.zeros((1, 1024, 64), requires_grad=True)}

    counted = {
        "vpm": _counted(siglip, pixels),
        "resampler": _counted(lambda: build_resampler(RESAMPLER), patches),
        "apm": _counted(lambda: build_minicpm_whisper(WHISPER), features),
    }
    model = _spec(("llm", "decoder", TINY), ("vpm", "siglip_vision", SIGLIP), ("resampler", "resampler", RESAMPLER),
                  ("apm", "whisper_encoder", WHISPER))
    workload = Workload(seq_len=128, images=1, max_slice_nums=1, audio_seconds=2.0)  # 66 image + 54 audio tokens
    ours = sample_flops(model, trainable_inventory(model, TrainingOptions()), workload, False)
    for group, (fwd, bwd) in counted.items():
        assert _close(ours.by_group[group], fwd + bwd), group


# --------------------------------------------------------------------------------------------
# ZeRO communication against DeepSpeed's comms logger
# --------------------------------------------------------------------------------------------


def _logged(rank: dict, op: str) -> int:
    """Bytes of ``op`` messages over the last step, without the 1-8 byte norm and flag reductions."""
    return sum(int(size) * calls for size, calls in rank["comms"].get(op, {}).items() if int(size) > 8)


@pytest.mark.judge
@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_collectives_equal_deepspeed_comms_logger(stage: int) -> None:
    """ZeRO-2, two micro-steps: the gradient buckets are all-reduced in each, the parameters
    all-gathered once. ZeRO-3 under checkpointing, with reuse distance and prefetch off so every
    release is visible: forward, recomputation (without down_proj) and backward (down to the
    embedding, whose output checkpointing makes require grad) each gather again."""
    pytest.importorskip("deepspeed")
    from tests.ds_harness import DEFAULT_MODEL_CONFIG, apply_hf_auto_values, measure

    hidden = DEFAULT_MODEL_CONFIG["hidden_size"]
    zero_cfg: dict = {"stage": stage, "reduce_bucket_size": "auto"}
    gas, steps, ckpt = 2, 1, False
    if stage == 3:  # steps=2: DeepSpeed replays a recorded module trace from the second step on
        zero_cfg |= {"stage3_param_persistence_threshold": "auto", "stage3_prefetch_bucket_size": 0,
                     "stage3_max_reuse_distance": 0}
        gas, steps, ckpt = 1, 2, True
    ds = apply_hf_auto_values({
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": gas, "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.0}},
        "bf16": {"enabled": True}, "zero_optimization": zero_cfg,
        "comms_logger": {"enabled": True, "verbose": False, "prof_all": True},
    }, hidden)
    ranks = measure(DEFAULT_MODEL_CONFIG, ds, frozen_prefixes=["model.embed_tokens"], steps=steps,
                    grad_ckpt=ckpt)

    model = _spec(("llm", "decoder", DEFAULT_MODEL_CONFIG))
    options = TrainingOptions(zero=ZeroStage(stage), freeze=("llm.embed_tokens",), grad_ckpt=ckpt)
    zero = dataclasses.replace(ZeroSettings.hf_auto(hidden), prefetch_bucket_size=0)
    ours: dict[str, float] = {}
    for c in collectives(model, trainable_inventory(model, options), options, Workload(seq_len=8, grad_accum=gas),
                         zero, 2, max_reuse_distance=0):
        ours[c.op] = ours.get(c.op, 0) + c.nbytes
    for rank in ranks:
        assert _logged(rank, "all_reduce") == ours.get("all_reduce", 0)
        # all-gather logs the local partition (half the gathered buffer), reduce-scatter the full input
        assert 2 * _logged(rank, "all_gather_into_tensor") == ours["all_gather"]
        assert _logged(rank, "reduce_scatter_tensor") == ours.get("reduce_scatter", 0)


# --------------------------------------------------------------------------------------------
# Behaviour of the terms
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minicpm(catalog):
    from planner.workload.reference import REFERENCE_GROUPS

    model = build_model(catalog.model("minicpm-o-2.6"))
    options = TrainingOptions(zero=ZeroStage.PARAMETERS, offload_optimizer=Offload.CPU, offload_param=Offload.CPU,
                              precision=Precision.AMP_BF16, grad_ckpt=True, **REFERENCE_GROUPS)
    workload = Workload(images=1, max_slice_nums=1, seq_len=1024, micro_batch=1)
    return model, options, workload, ZeroSettings.hf_auto(model.hidden_size)


def _cluster(catalog, gpu: str, count: int = 2) -> Cluster:
    spec = catalog.gpu(gpu)
    return Cluster(spec, 1, count, spec.memory_bytes, 256 * 2**30)


def _time(model, options, cluster, workload, zero, **kw):
    return step_time(model, trainable_inventory(model, options), cluster, options, workload, zero, **kw)


def test_reference_case_terms(catalog, minicpm) -> None:
    model, options, workload, zero = minicpm
    step = _time(model, options, _cluster(catalog, "rtx3090"), workload, zero)
    assert set(step.terms) == set(TERMS) and all(v > 0 for v in step.terms.values())
    assert step.tokens_per_step == 2 * 1024
    assert math.isclose(step.tokens_per_s, step.tokens_per_step / step.total_s)
    assert [name for name, _, _ in describe(step)] == list(TERMS)


def test_offload_adds_its_terms(catalog, minicpm) -> None:
    """Same setup without offloads: no host traffic, no CPU optimizer, the GPU optimizer in
    compute; with them, the CPU Adam term is the partition over the rank's share of the host's
    memory bandwidth (a desktop's 8 cores out-run its memory)."""
    model, options, workload, zero = minicpm
    cluster = _cluster(catalog, "rtx3090")
    off = _time(model, options, cluster, workload, zero)
    on_gpu = _time(model, options.model_copy(update={"offload_optimizer": Offload.NONE, "offload_param": Offload.NONE}),
                   cluster, workload, zero)
    assert on_gpu.terms["offload"] == on_gpu.terms["cpu_optimizer"] == 0
    assert off.terms["offload"] > 0 and off.terms["cpu_optimizer"] > 0
    assert on_gpu.terms["compute"] > off.terms["compute"]  # the GPU optimizer step
    assert on_gpu.terms["zero_comm"] == off.terms["zero_comm"]  # offloading moves no collective
    trained = sum(p.numel for p in trainable_inventory(model, options) if p.trainable)
    rate = HOST_MEMORY_BYTES_PER_S / 2 / CPU_ADAM_BYTES_PER_ELEMENT
    assert math.isclose(off.terms["cpu_optimizer"], -(-trained // 2) / rate)


@pytest.mark.parametrize("gpu", ["rtx3090", "rtxa6000"])
def test_nvlink_scales_communication_by_the_link_ratio(catalog, minicpm, gpu: str) -> None:
    """A bridged pair talks over NVLink; without the bridge (the default for PCIe cards) over
    PCIe, staged through host memory on GeForce cards."""
    model, options, workload, zero = minicpm
    cluster = _cluster(catalog, gpu)
    pcie = _time(model, options, cluster, workload, zero)
    nvlink = _time(model, options, cluster, workload, zero, nvlink=True)
    (bw_pcie, name_pcie), (bw_nv, name_nv) = peer_link(cluster), peer_link(cluster, nvlink=True)
    assert name_nv == "NVLink" and name_pcie.startswith("PCIe")
    assert ("no P2P" in name_pcie) == (gpu == "rtx3090")
    assert math.isclose(pcie.terms["zero_comm"] / nvlink.terms["zero_comm"], bw_nv / bw_pcie)
    assert {k: v for k, v in pcie.terms.items() if k != "zero_comm"} == \
           {k: v for k, v in nvlink.terms.items() if k != "zero_comm"}
    four = _cluster(catalog, gpu, 4)  # bridges join pairs: a ring of four crosses PCIe anyway
    assert peer_link(four, nvlink=True)[0] == peer_link(four)[0]
    assert peer_link(_cluster(catalog, "h100-sxm", 8))[1] == "NVLink"  # SXM: always


def test_checkpointing_adds_a_forward_of_the_layers(catalog) -> None:
    """Under 1/3 of compute: one more forward of the layers, but not of lm_head and not of each
    layer's down_proj (early stop); Qwen2.5-7B at 1k tokens: about 22 % of the FLOPs."""
    model = build_model(catalog.model("qwen2.5-7b"))
    cluster = _cluster(catalog, "a100-80gb", 1)
    workload, zero = Workload(seq_len=1024), ZeroSettings()
    plain = _time(model, TrainingOptions(engine=Engine.TORCH), cluster, workload, zero)
    ckpt = _time(model, TrainingOptions(engine=Engine.TORCH, grad_ckpt=True), cluster, workload, zero)
    assert plain.terms["recompute"] == 0
    assert ckpt.terms["compute"] == plain.terms["compute"] and plain.flops_per_step == ckpt.flops_per_step
    flops = sample_flops(model, trainable_inventory(model, TrainingOptions()), workload, True)
    assert 0.2 < flops.recompute / (flops.forward + flops.backward) < 1 / 3
    rate = peak_flops(cluster.gpu, Precision.AMP_BF16) * MODEL_FLOPS_UTILIZATION
    assert math.isclose(ckpt.terms["recompute"], flops.recompute / rate)


def test_ddp_reduces_fp32_gradients_once_per_step(catalog) -> None:
    """HF Trainer's DDP under AMP keeps fp32 weights: one all-reduce of 4-byte gradients per
    optimizer step, whatever the accumulation."""
    model = _spec(("llm", "decoder", TINY))
    options = TrainingOptions(engine=Engine.TORCH)
    params = trainable_inventory(model, options)
    for gas in (1, 4):
        (c,) = collectives(model, params, options, Workload(grad_accum=gas), ZeroSettings(), 2)
        assert (c.op, c.nbytes) == ("all_reduce", 4 * model.params)
        assert c.sent_bytes(2) == c.nbytes  # 2 (n-1)/n = 1 at two ranks
    assert collectives(model, params, options, Workload(), ZeroSettings(), 1) == []


def test_no_bf16_units_is_infinitely_slow(catalog) -> None:
    model = _spec(("llm", "decoder", TINY))
    options = TrainingOptions(engine=Engine.TORCH)
    step = _time(model, options, _cluster(catalog, "v100-32gb", 1), Workload(), ZeroSettings())
    assert step.total_s == math.inf and step.tokens_per_s == 0.0
