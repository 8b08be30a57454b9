"""The built-in training target: run a plan folder with HF Trainer, training exactly what the plan counted.

Last stage of the flow (plan -> writers -> launch -> **train**). ``launch.sh`` runs::

    torchrun --nproc_per_node N -m planner.train PLAN_DIR --data DATA [TrainingArguments flags]

It reads ``plan.json``, ``training_args.json`` and ``ds_config.json``, loads the model in the
plan's dtype, freezes (or LoRA-wraps) it from the plan's parameter inventory and stops if the
model holds a tensor the plan did not count (`planner.train.params`), trains on MiniCPM-style
conversations (`planner.train.data`), and ends with one machine-readable line from rank 0::

    memplan-train: peak_gpu_bytes=... peak_host_rss_bytes=... steps=... final_loss=... seconds=...

Precision: under DeepSpeed the weights load in the 16-bit dtype (DeepSpeed casts the module
anyway and keeps its own fp32 master copy; MiniCPM's finetune.py loads bf16 too); plain PyTorch
``amp-*`` keeps fp32 weights and HF Trainer autocasts; ``pure-bf16`` without DeepSpeed loads bf16
weights and turns HF's ``bf16`` flag off (no autocast, LLaMA-Factory's ``pure_bf16``). With ZeRO-3
the ``TrainingArguments`` are built before ``from_pretrained`` so the model is created under
``deepspeed.zero.Init`` (HF docs, "ZeRO-3 and from_pretrained"); they are built first always.

CPU (no CUDA; how the tests run it): accelerate picks no process group for DeepSpeed without a
GPU (``PartialState._prepare_backend`` returns backend None, so every rank believes it is the
only one and nothing is sharded). The target therefore creates accelerate's ``PartialState``
itself with the gloo backend before the ``TrainingArguments``, and tells them to use it
(``accelerator_config.use_configured_state``); DeepSpeed then runs as on a GPU, with
``DS_ACCELERATOR=cpu``. Plain PyTorch on the CPU sets ``use_cpu`` (DDP over gloo).

MiniCPM-V / MiniCPM-o (a ``vpm`` group): text-only samples go through the model's
``forward(data=...)`` with no images (its own no-image branch runs a dummy image so the vision
tower still takes part); written from modeling_minicpmo.py but not run here (no weights or remote
code offline). Samples with images need MiniCPM's own finetune.py (the ``minicpm`` target), which
slices images and places their tokens; this target stops on the first such sample.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from planner.plan import Plan
from planner.profile.hf_config import find_config
from planner.train.args import UsageError, args_dict, hf_overrides, set_nested, training_arguments
from planner.train.data import Collator, DataError, encode_all, load_samples
from planner.train.params import PlanMismatch, check, freeze, load_inventory, lora_settings
from planner.workload.options import Precision

PROG = "memplan train"

EPILOG = """\
Any other flag is a TrainingArguments field and overrides training_args.json, e.g.
--learning_rate 2e-5 --logging_steps 10 --save_strategy no.

examples:
  torchrun --nproc_per_node 2 -m planner.train plan/ --data train.jsonl
  python -m planner.train plan/ --data train.jsonl --max-steps 10 --output-dir /tmp/try
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse prints usage and exits; we want one line
        raise UsageError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m planner.train", description=__doc__.splitlines()[0], epilog=EPILOG,
                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("plan_dir", metavar="PLAN_DIR", type=Path, help="folder written by `memplan tune`")
    p.add_argument("--data", help="JSON or JSONL conversations (default: the plan's data_path)")
    p.add_argument("--model", help="weights to load (default: the plan's model path)")
    p.add_argument("--output-dir", help="where checkpoints go (default: training_args.json's)")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    return p


def _load_dtype(plan: Plan) -> Any:
    import torch

    p = plan.options.precision
    if plan.deepspeed:
        return {Precision.FP32: torch.float32, Precision.AMP_FP16: torch.float16}.get(p, torch.bfloat16)
    return torch.bfloat16 if p is Precision.PURE_BF16 else torch.float32


def _load_model(plan: Plan, model_path: str, multimodal: bool) -> Any:
    import transformers

    kwargs: dict[str, Any] = {"dtype": _load_dtype(plan), "trust_remote_code": True,
                              "attn_implementation": plan.options.attn.value}
    if multimodal:
        built = {g.name for g in plan.groups}
        if "apm" in built or "tts" in built or "apm" in plan.options.without or "tts" in plan.options.without:
            kwargs.update(init_audio="apm" in built, init_tts="tts" in built)  # MiniCPM-o's config switches
        return transformers.AutoModel.from_pretrained(model_path, **kwargs)
    return transformers.AutoModelForCausalLM.from_pretrained(model_path, **kwargs)


def _wrap(model: Any, plan: Plan, inv: Any, grad_ckpt: bool) -> Any:
    """Freeze from the inventory, or wrap in peft LoRA; then check against the inventory."""
    check(model, inv, "base")
    lora = plan.options.lora
    if lora is None:
        freeze(model, inv)
    else:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise UsageError("the plan trains LoRA adapters: install peft (pip install peft)") from None

        fields = lora_settings(model, inv)
        if grad_ckpt:
            model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
        config = LoraConfig(r=lora.rank, lora_alpha=plan.trainer.lora_alpha or lora.rank,
                            lora_dropout=lora.dropout, bias="none",
                            task_type=None if inv.multimodal else "CAUSAL_LM",
                            target_modules=fields["target_modules"], modules_to_save=fields["modules_to_save"] or None)
        model = get_peft_model(model, config)
    check(model, inv, "trained")
    return model


def _trainer_class(multimodal: bool) -> type:
    from transformers import Trainer

    if not multimodal:
        return Trainer

    class MiniCPMTextTrainer(Trainer):
        """MiniCPM's ``forward(data, **kwargs)`` with no images (its no-image branch)."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            import torch

            ids = inputs["input_ids"]
            empty = [[] for _ in range(ids.shape[0])]
            positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
            data = {"input_ids": ids, "position_ids": positions, "pixel_values": empty, "tgt_sizes": empty,
                    "image_bound": empty}
            out = model(data=data, attention_mask=inputs["attention_mask"], labels=inputs["labels"], use_cache=False)
            return (out.loss, out) if return_outputs else out.loss

    return MiniCPMTextTrainer


def _peak_line(trainer: Any, result: Any, seconds: float) -> str:
    import torch
    import torch.distributed as dist

    gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    peaks = torch.tensor([gpu, rss], dtype=torch.int64, device=trainer.args.device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(peaks, op=dist.ReduceOp.MAX)  # the largest rank is the one that runs out
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    loss = losses[-1] if losses else result.training_loss
    return (f"memplan-train: peak_gpu_bytes={int(peaks[0])} peak_host_rss_bytes={int(peaks[1])} "
            f"steps={trainer.state.global_step} final_loss={loss:.6g} seconds={seconds:.1f}")


def _say(message: str) -> None:
    if os.environ.get("RANK", "0") == "0":
        print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def _read_plan(plan_dir: Path) -> Plan:
    if not plan_dir.is_dir():
        raise UsageError(f"plan folder {plan_dir} does not exist")
    path = plan_dir / "plan.json"
    try:
        return Plan.read(path)
    except FileNotFoundError:
        raise UsageError(f"{path} does not exist (write the folder with `memplan tune`)") from None
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path}: not valid JSON: {exc.msg} (line {exc.lineno})") from None
    except ValidationError as exc:
        err = exc.errors()[0]
        raise UsageError(f"{path}: {'.'.join(map(str, err['loc']))}: {err['msg']}") from None
    except ValueError as exc:  # another version
        raise UsageError(f"{path}: {' '.join(str(exc).split())}") from None


def run(argv: list[str] | None = None) -> int:
    """Everything `main` does, raising the user errors it reports."""
    opts, extra = _parser().parse_known_args(argv)
    plan_dir = opts.plan_dir.expanduser()
    plan = _read_plan(plan_dir)
    samples = load_samples(opts.data or plan.trainer.data_path)
    overrides = hf_overrides(extra)
    overrides.update({k: v for k, v in (("output_dir", opts.output_dir), ("max_steps", opts.max_steps))
                      if v is not None})
    cfg = args_dict(plan, plan_dir, overrides)
    model_path = opts.model or plan.model.path
    # What the plan was made for (its profile, or its own config.json when that is here), not
    # what --model points at: the check below is then a real comparison.
    planned = plan.model.path if find_config(plan.model.path) is not None else model_path
    inv = load_inventory(plan.model.name, planned, plan.options)  # on the meta device: before zero.Init is on
    for s in samples:
        if s.image is not None:
            need = ("images need MiniCPM's own finetune.py (the minicpm target); this target trains text only"
                    if inv.multimodal else f"the model {plan.model.name!r} has no vision tower (vpm)")
            raise UsageError(f"sample {s.id!r} has an image: {need}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != plan.cluster.world_size:
        _say(f"note: running on {world} rank(s); the plan's memory is for {plan.cluster.world_size}")
        if plan.deepspeed:
            set_nested(cfg["deepspeed"], "train_batch_size", "auto")  # micro x accumulation x ranks
    args = training_arguments(plan, cfg)  # before from_pretrained: ZeRO-3 builds under zero.Init

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=True)
    pad_id = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    dataset, dropped = encode_all(tokenizer, samples, plan.workload.seq_len)
    if dropped:
        _say(f"note: {dropped} sample(s) keep no assistant token within seq_len {plan.workload.seq_len}; skipped")
    model = _load_model(plan, model_path, inv.multimodal)
    if plan.zero3 and plan.options.zero_init and not all(hasattr(p, "ds_id") for p in model.parameters()):
        _say("warning: ZeRO-3, but the model was not built under deepspeed.zero.Init: each rank holds all "
             "of it until DeepSpeed partitions it (more host memory than the plan counts)")
    model.config.use_cache = False
    model = _wrap(model, plan, inv, args.gradient_checkpointing)
    trained = [p for p in inv.params if p.trainable]
    _say(f"training {len(trained)} of {len(inv.params)} tensors, {sum(p.numel for p in trained):,} parameters, "
         "as the plan counts")
    trainer = _trainer_class(inv.multimodal)(model=model, args=args, train_dataset=dataset,
                                             data_collator=Collator(pad_id), processing_class=tokenizer)
    started = time.monotonic()
    result = trainer.train()
    seconds = time.monotonic() - started
    if args.save_strategy != "no":
        trainer.save_model()
    line = _peak_line(trainer, result, seconds)
    if trainer.is_world_process_zero():
        print(line, flush=True)
    _close_process_group()
    return 0


def _close_process_group() -> None:
    """Leave the process group before exit: left to interpreter teardown, a gloo rank
    sometimes aborts ("terminate called without an active exception", seen after ZeRO-3 runs
    on the CPU) and the launcher reports the finished run as failed."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    """``python -m planner.train``: user errors are one line on stderr and exit code 2."""
    from planner.errors import ProfileError

    try:
        return run(argv)
    except (UsageError, DataError, ProfileError, PlanMismatch) as exc:
        if os.environ.get("LOCAL_RANK", "0") == "0":
            print(f"{PROG}: error: {exc}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
