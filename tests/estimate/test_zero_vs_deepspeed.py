"""The ZeRO ledger against a real DeepSpeed engine: two CPU ranks over gloo, real steps.

`tests/ds_harness.py` builds a tiny Qwen2 whose sizes make every padding rule visible (odd
numels, a trained total that is not a multiple of 2 x world), runs `deepspeed.initialize` and real
optimizer steps, and reports every tensor DeepSpeed holds on each rank. The ledger's figures must
equal those bytes exactly, per rank, for the rank the ledger calls the most loaded.

DeepSpeed compiles its CPU Adam ops on first use (about 45 s each, cached in
~/.cache/torch_extensions); each configuration then takes about 10 s.
"""

from __future__ import annotations

import dataclasses

import pytest

pytest.importorskip("deepspeed")

from planner.estimate.result import Category, Place  # noqa: E402
from planner.estimate.states import ZeroSettings, model_state_items  # noqa: E402
from planner.profile.architectures import build_tensors  # noqa: E402
from planner.profile.catalog import Group, ModelSpec  # noqa: E402
from planner.workload.inventory import trainable_inventory  # noqa: E402
from planner.workload.options import Engine, Offload, Precision, TrainingOptions, ZeroStage  # noqa: E402
from tests.ds_harness import DEFAULT_MODEL_CONFIG, apply_hf_auto_values, measure  # noqa: E402

pytestmark = pytest.mark.judge

HIDDEN = DEFAULT_MODEL_CONFIG["hidden_size"]
FROZEN = "model.embed_tokens"


def _ds_config(stage: int, offload_optimizer: bool, offload_param: bool, overlap_comm: bool | None,
               precision: Precision) -> dict:
    zero: dict = {"stage": stage, "reduce_bucket_size": "auto"}
    if stage == 3:
        zero |= {"stage3_param_persistence_threshold": "auto", "stage3_prefetch_bucket_size": "auto"}
    if overlap_comm is not None:
        zero["overlap_comm"] = overlap_comm
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    cfg = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.0}},
        "gradient_clipping": 1.0,
        "bf16": {"enabled": True},
        "zero_optimization": zero,
    }
    if precision is Precision.PURE_BF16:
        cfg["bf16"] |= {"bf16_master_weights_and_grads": True, "bf16_optimizer_states": True}
    return apply_hf_auto_values(cfg, HIDDEN)


def _ledger(stage: int, offload_optimizer: bool, offload_param: bool, frozen: bool, overlap_comm: bool,
            precision: Precision):
    """The ledger's items for the same model and settings, by (category, place)."""
    group = Group("llm", "decoder", tuple(build_tensors("decoder", DEFAULT_MODEL_CONFIG)), DEFAULT_MODEL_CONFIG)
    model = ModelSpec("harness-qwen2", "tests/ds_harness.py", (group,))
    options = TrainingOptions(
        engine=Engine.DEEPSPEED,
        zero=ZeroStage(stage),
        offload_optimizer=Offload.CPU if offload_optimizer else Offload.NONE,
        offload_param=Offload.CPU if offload_param else Offload.NONE,
        freeze=("llm.embed_tokens",) if frozen else (),
        precision=precision,
    )
    zero = ZeroSettings.hf_auto(HIDDEN)
    zero = dataclasses.replace(zero, overlap_comm=overlap_comm)
    out: dict[tuple[Category, Place], int] = {}
    for item in model_state_items(trainable_inventory(model, options), options, 2, zero):
        key = (item.category, item.place)
        out[key] = out.get(key, 0) + item.nbytes
    return out


def _sum(ledger: dict, category: Category, places=tuple(Place)) -> int:
    return sum(v for (c, p), v in ledger.items() if c is category and p in places)


def _storage(census: dict | None) -> int:
    return 0 if census is None else census["storage_bytes"]


def _other(rank: dict) -> int:
    """The wrapper's other tensors, without 1-element scalars (grad norm, overflow flag)."""
    return sum(s["storage_bytes"] for s in rank["other"]["structures"].values() if s["numel"] > 1)


AMP, PURE = Precision.AMP_BF16, Precision.PURE_BF16
CASES = [
    # (stage, offload_optimizer, offload_param, frozen, overlap_comm, precision)
    (1, False, False, True, False, AMP),
    (2, False, False, True, False, AMP),
    (2, False, False, False, True, AMP),
    (2, True, False, True, False, AMP),
    (1, True, False, True, False, AMP),
    (3, False, False, True, None, AMP),
    (3, True, False, True, None, AMP),
    (3, True, True, True, None, AMP),
    (2, False, False, True, False, PURE),
    (3, False, False, True, None, PURE),
]


def _case_id(c) -> str:
    flags = ["-offopt" * c[1], "-offparam" * c[2], "-frozen" * c[3], "-overlap" * bool(c[4]), f"-{c[5].value}"]
    return f"z{c[0]}" + "".join(flags)


@pytest.mark.parametrize(("stage", "off_opt", "off_param", "frozen", "overlap", "precision"), CASES,
                         ids=[_case_id(c) for c in CASES])
def test_ledger_equals_deepspeed(stage, off_opt, off_param, frozen, overlap, precision):
    ranks = measure(DEFAULT_MODEL_CONFIG, _ds_config(stage, off_opt, off_param, overlap, precision),
                    frozen_prefixes=[FROZEN] if frozen else [], world_size=2, steps=1)
    ledger = _ledger(stage, off_opt, off_param, frozen, overlap if overlap is not None else stage == 3, precision)

    # Weights, master and optimizer states: every rank holds the same, after the step.
    for cat, key in ((Category.WEIGHTS, "weights"), (Category.MASTER_WEIGHTS, "master_weights"),
                     (Category.OPTIMIZER_STATES, "optimizer_states")):
        assert {_storage(r[key]) for r in ranks} == {_sum(ledger, cat)}, key

    # Gradients and engine buffers where both are alive, on the most loaded rank:
    #   ZeRO-1: the end of backward (every full .grad + the IPG bucket(s));
    #   ZeRO-2: after backward (the partition; the bucket is released in the epilogue);
    #   ZeRO-3: after backward (partition buffer + persistent IPG bucket);
    #   offload: the host fp32 .grad, temp buffers and 16-bit staging ("other").
    grads = _sum(ledger, Category.GRADIENTS)
    buffers = _sum(ledger, Category.BUFFERS)
    if off_opt and stage < 3:
        measured = max(_storage(r["gradients"]["after_backward"]) + _other(r) for r in ranks)
        assert measured == grads + buffers
    elif stage == 1:
        measured = max(_storage(r["gradients"]["end_of_backward"]) for r in ranks)
        assert measured == grads + buffers
    elif stage == 2:
        measured = max(_storage(r["gradients"]["after_backward"]) for r in ranks)
        assert measured == grads
    else:
        measured = max(_storage(r["gradients"]["after_backward"]) for r in ranks)
        assert measured == grads + buffers

    # The optimizer step's temporary: the partition's gradient in the master dtype.
    temps = _sum(ledger, Category.TEMPORARIES)
    if not off_opt:
        during = max(_storage(r["gradients"]["during_step"]) for r in ranks)
        persistent = grads + buffers if stage == 3 else 0
        assert during == persistent + temps

    # Where it lives: offloaded states are on the host side of the ledger.
    if off_opt:
        assert _sum(ledger, Category.OPTIMIZER_STATES, (Place.GPU,)) == 0
    if off_param:
        trained_gpu = _sum(ledger, Category.WEIGHTS, (Place.GPU,))
        assert trained_gpu < _sum(ledger, Category.WEIGHTS, (Place.HOST,))


def test_zero3_nvme_optimizer_keeps_gradient_partitions_on_the_host():
    """ZeRO-3 with the optimizer on NVMe keeps the gradient partitions where CPU offload does, in
    host memory; only the master partition's fp32 gradients go to the drive. NVMe cannot run here,
    so the rule is read from the installed DeepSpeed (0.19.8 runtime/zero/stage3.py): any optimizer
    offload, NVMe included, sets ``offload_optimizer`` (L823-L826), which makes ``self.device``
    "cpu" (L333), where ``grad_partitions_flat_buffer`` lives (L791-L795); the fp32 gradients of
    swappable sub-groups are swapped out (L1448-L1464). The harness's placement rule
    (``ds_harness._home``, checked against real engines) says the same."""
    import inspect
    from types import SimpleNamespace

    from deepspeed.runtime.zero import stage3

    from tests.ds_harness import _home

    src = " ".join(inspect.getsource(stage3.DeepSpeedZeroOptimizer_Stage3).split())
    assert ("if offload_optimizer_config is not None and offload_optimizer_config.device != OffloadDeviceEnum.none: "
            "self.offload_optimizer = True") in src
    assert ("self.device = get_accelerator().current_device_name() if not self.offload_optimizer "
            "else OffloadDeviceEnum.cpu") in src
    assert "dtype=self.gradient_accumulation_dtype, device=self.device)" in src
    assert "self.optimizer_swapper.swap_out_gradients(" in src

    nvme = SimpleNamespace(device="nvme", pin_memory=True)
    engine = SimpleNamespace(optimizer=None, zero_optimization_stage=lambda: 3,
                             _config=SimpleNamespace(zero_config=SimpleNamespace(offload_optimizer=nvme,
                                                                                 offload_param=None)))
    assert _home(engine, "gradients", "grad_partitions_flat_buffer") == "host(pinned)"

    def grads(device: Offload) -> dict[Place, int]:
        group = Group("llm", "decoder", tuple(build_tensors("decoder", DEFAULT_MODEL_CONFIG)), DEFAULT_MODEL_CONFIG)
        options = TrainingOptions(engine=Engine.DEEPSPEED, zero=ZeroStage.PARAMETERS, offload_optimizer=device)
        params = trainable_inventory(ModelSpec("harness-qwen2", "tests/ds_harness.py", (group,)), options)
        out = dict.fromkeys(Place, 0)
        for item in model_state_items(params, options, 2, ZeroSettings.hf_auto(HIDDEN)):
            if item.category is Category.GRADIENTS:
                out[item.place] += item.nbytes
        return out

    on_nvme, on_cpu = grads(Offload.NVME), grads(Offload.CPU)
    assert on_nvme[Place.GPU] == 0 and on_nvme[Place.HOST] > 0
    # the bf16 partition buffer (2 B an element) on the host, the fp32 master .grad (4 B) on the drive
    assert on_nvme[Place.NVME] == 2 * on_nvme[Place.HOST]
    assert on_nvme[Place.HOST] + on_nvme[Place.NVME] == on_cpu[Place.HOST]
