"""memplan calibrate's run and fit (planner.judge.calibrate) on a fake device with known numbers,
the refusal of the real device without a GPU, and the real training steps on the CPU (judge)."""

from __future__ import annotations

import sys
from datetime import date

import pytest

from planner.judge.calibrate import (
    MATRIX,
    WARMUP,
    DeviceInfo,
    StepResult,
    StepSpec,
    deepspeed_config,
    fit_profile,
    measure_step,
    predict,
    run_calibration,
)
from planner.workload.options import Attention, Precision
from tests.fake_gpu import (
    CONTEXT_BASE,
    LINK,
    MIB,
    TFLOPS,
    WORKSPACE,
    FakeDevice,
    fragmentation,
    step_tensor_bytes,
)

DAY = date(2026, 12, 5)


def _run(device: FakeDevice, gpu, steps=MATRIX):
    return run_calibration(device, device.init(), gpu, steps, today=DAY)


def test_fit_on_fake_measurements(catalog):
    """The fake numbers its steps n = 0 (the warm-up, not in the fit), 1..16 (the matrix; 16 is
    the ZeRO-3 step). Known answers:
    context = the largest NVML-beyond-reserved of the plain steps = 400 MiB + 15 MiB (step 16's
    NCCL buffers are left out); workspace = the first matmul's allocated 32 MiB (not the 40 MiB it
    reserved); fragmentation over steps
    1..16 = 2 % x (n mod 5): sorted 0,0,0, 2 x4, 4 x3, 6 x3, 8 x3 -> median 4 %, high 8 %."""
    gpu = catalog.gpu("rtx3090")
    run = _run(FakeDevice(), gpu)
    p = run.profile
    assert len(MATRIX) == 16 and all(s.measured is not None for s in run.steps)
    assert p.gpu == "rtx3090" and p.measured == "2026-12-05"
    assert p.cuda_context_bytes == CONTEXT_BASE + 15 * MIB
    assert p.cublas_workspace_bytes == WORKSPACE
    assert p.fragmentation_expected == pytest.approx(0.04, abs=1e-6)
    assert p.fragmentation_high == pytest.approx(0.08, abs=1e-6)
    assert p.fragmentation_expected == pytest.approx(sorted(fragmentation(n) for n in range(1, 17))[7], abs=1e-6)
    assert p.achieved_bf16_tflops == TFLOPS and p.link_gbytes_per_s is None  # one GPU: no link
    assert p.torch_version == "2.13.0+cu128" and p.cuda_version == "12.8"
    assert p.source.startswith("memplan calibrate: 16 of 16 steps on 1x NVIDIA GeForce RTX 3090")
    first = run.steps[0]  # n = 1: (1 + 1) x 100 MiB of step tensors above the 32 MiB workspace
    assert first.measured.step_tensor_bytes == step_tensor_bytes(1)
    assert first.measured.allocated_base_bytes == WORKSPACE
    assert first.error == pytest.approx((first.predicted_tensor_bytes - step_tensor_bytes(1)) / step_tensor_bytes(1))
    assert (first.predicted_tensor_bytes, first.predicted_s) == predict(MATRIX[0], gpu, 24 * 2**30)[::2]


def test_link_measured_with_two_gpus(catalog):
    run = _run(FakeDevice(count=2), catalog.gpu("rtx3090"), MATRIX[:2])
    assert run.profile.link_gbytes_per_s == LINK and run.link_gbytes_per_s == LINK


def test_warmup_runs_first_and_every_step_between_fresh_peaks(catalog):
    device = FakeDevice()
    _run(device, catalog.gpu("rtx3090"), MATRIX[:2])
    assert device.calls[:2] == ["init", "first_matmul"]
    assert device.steps_run[0] == WARMUP
    runs = [i for i, c in enumerate(device.calls) if c.startswith("run_step")]
    for i in runs:
        assert device.calls[i - 2:i] == ["release", "reset_peaks"] and device.calls[i + 1] == "release"
    assert device.calls[-1] == "matmul_tflops"


def test_failed_and_oversized_steps_are_skipped_and_left_out_of_the_fit(catalog):
    """A step that runs out of memory is skipped with its reason; with 6 GiB free the 0.5B steps
    (estimated 5.6-9.9 GiB) are over 80 % of it and are not run at all."""
    gpu = catalog.gpu("rtx3090")
    oom = MATRIX[1].label
    device = FakeDevice(free_bytes=6 * 2**30, fail=frozenset({oom}))
    run = _run(device, gpu)
    by_label = {s.spec.label: s for s in run.steps}
    assert by_label[oom].skipped == "out of memory" and by_label[oom].measured is None
    big = [s for s in run.steps if s.spec.model == "qwen2.5-0.5b"]
    assert big and all(s.skipped and "over 80% of the free memory" in s.skipped for s in big)
    assert all(s.model != "qwen2.5-0.5b" for s in device.steps_run)
    measured = [s for s in run.steps if s.measured is not None]
    assert run.profile.source.startswith(f"memplan calibrate: {len(measured)} of 16 steps")


def test_gpu_without_bf16_skips_bf16_steps(catalog):
    gpu = catalog.gpu("t4")
    device = FakeDevice(name="Tesla T4")
    run = _run(device, gpu)
    assert device.steps_run[0].precision is Precision.FP32  # the warm-up in fp32
    for s in run.steps:
        if s.spec.precision is Precision.FP32:
            assert s.measured is not None
        else:
            assert s.measured is None and "has no bf16" in s.skipped
    assert run.profile.achieved_bf16_tflops is None and "matmul_tflops" not in device.calls


def test_out_of_bounds_measurements_are_left_out():
    info = DeviceInfo("NVIDIA GeForce RTX 3090", 1, 24 * 2**30, 23 * 2**30, "2.13.0", None, None)
    profile, notes = fit_profile("rtx3090", info, [], workspace=(0, -5), tflops=float("nan"), link=0.0, today=DAY)
    assert profile.cublas_workspace_bytes is None and profile.achieved_bf16_tflops is None
    assert profile.link_gbytes_per_s is None and profile.cuda_version is None
    assert any("cublas_workspace_bytes" in n for n in notes) and any("no step ran" in n for n in notes)


def test_workspace_falls_back_to_the_reserved_jump():
    """Where the allocator counted nothing as allocated, the reserved jump is the workspace."""
    info = DeviceInfo("NVIDIA GeForce RTX 3090", 1, 24 * 2**30, 23 * 2**30, "2.13.0", "12.8", None)
    assert fit_profile("rtx3090", info, [], (0, 20 * MIB), None, None, DAY)[0].cublas_workspace_bytes == 20 * MIB
    assert fit_profile("rtx3090", info, [], (4 * MIB, 20 * MIB), None, None, DAY)[0].cublas_workspace_bytes == 4 * MIB


def test_matrix_is_small_and_named_once(catalog):
    labels = [s.label for s in MATRIX]
    assert len(set(labels)) == len(labels) and all(len(label) <= 24 for label in labels)
    assert {s.precision for s in MATRIX} == {Precision.FP32, Precision.AMP_BF16, Precision.PURE_BF16}
    assert {s.attn for s in MATRIX} == {Attention.EAGER, Attention.SDPA}
    assert {s.grad_ckpt for s in MATRIX} == {True, False} and sum(s.zero3 for s in MATRIX) == 1
    gpu = catalog.gpu("rtx3090")
    assert max(predict(s, gpu, gpu.memory_bytes)[1] for s in MATRIX) < 12 * 2**30  # runs on a 16 GB card


def test_deepspeed_config_uses_hf_auto_values():
    spec = next(s for s in MATRIX if s.zero3)
    zero = deepspeed_config(spec)["zero_optimization"]
    h = spec.config["hidden_size"]
    assert zero == {"stage": 3, "reduce_bucket_size": h * h, "stage3_prefetch_bucket_size": int(0.9 * h * h),
                    "stage3_param_persistence_threshold": 10 * h}
    assert spec.options().zero_init is False  # built whole on the CPU, partitioned by initialize()


def test_measure_step_releases_even_when_the_step_fails():
    from planner.judge.calibrate import StepFailed

    device = FakeDevice(fail=frozenset({WARMUP.label}))
    device.init()
    with pytest.raises(StepFailed):
        measure_step(device, WARMUP)
    assert device.calls[-1] == "release"


def test_step_result_without_measurement_has_no_error():
    assert StepResult(MATRIX[0], 1, 2, 0.1).error is None


def test_cuda_device_refuses_without_gpu(monkeypatch):
    import torch

    from planner.judge.cuda_device import cuda_problem

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    problem = cuda_problem()
    assert problem and problem.startswith("memplan calibrate measures a real GPU, and there is none here")
    assert "\n" not in problem


def test_cuda_device_refuses_without_nvml(monkeypatch):
    import pynvml
    import torch

    from planner.judge.cuda_device import cuda_problem

    def no_driver() -> None:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(pynvml, "nvmlInit", no_driver)
    assert cuda_problem() == ("memplan calibrate reads GPU memory through NVML, which is not usable here "
                              "(NVMLError_DriverNotLoaded)")


TINY = {"model_type": "qwen2", "vocab_size": 512, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True,
        "max_position_embeddings": 512}


@pytest.mark.judge
@pytest.mark.parametrize("spec", [
    StepSpec("tiny", Precision.FP32, Attention.EAGER, seq_len=32),
    StepSpec("tiny", Precision.AMP_BF16, Attention.SDPA, grad_ckpt=True, seq_len=32, micro_batch=2),
    StepSpec("tiny", Precision.PURE_BF16, Attention.SDPA, seq_len=32),
], ids=lambda s: s.label)
def test_real_training_step_runs_on_the_cpu(monkeypatch, spec):
    """The step the GPU runs (transformers from a config, HF Trainer's loss, clipping, fused
    AdamW), here on the CPU: it trains, and the timing covers every step."""
    import planner.judge.calibrate as calibrate
    from planner.judge.cuda_device import train_steps

    monkeypatch.setitem(calibrate.MODELS, "tiny", TINY)
    times = train_steps(spec, "cpu", steps=2)
    assert len(times) == 2 and all(t > 0 for t in times)


@pytest.mark.judge
@pytest.mark.skipif(sys.platform != "linux", reason="DeepSpeed's CPU accelerator")
def test_real_zero3_step_runs_on_the_cpu(monkeypatch):
    """The ZeRO-3 step: one process, world size 1 (gloo here, NCCL on a GPU)."""
    pytest.importorskip("deepspeed")
    import torch
    import torch.distributed as dist

    import planner.judge.calibrate as calibrate
    from planner.judge.cuda_device import deepspeed_steps

    linear = torch.nn.functional.linear
    monkeypatch.setitem(calibrate.MODELS, "tiny", TINY)
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        monkeypatch.setenv(key, value)  # restored afterwards; the port is found free by the step
    monkeypatch.delenv("MASTER_PORT", raising=False)
    try:
        times = deepspeed_steps(StepSpec("tiny", Precision.AMP_BF16, seq_len=32, zero3=True), "cpu", steps=2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert len(times) == 2
    assert torch.nn.functional.linear is linear  # ZeRO-3's replacement of F.linear undone
