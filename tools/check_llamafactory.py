#!/usr/bin/env python
"""Validate a LLaMA-Factory training YAML with LLaMA-Factory's own argument parser.

No GPU, no model download and no dataset load are needed. Run it with the python of
a virtual environment that has ``llamafactory`` installed (plus ``deepspeed`` when
the YAML names a DeepSpeed config; LLaMA-Factory's requirements/deepspeed.txt says
``deepspeed>=0.10.0,<=0.18.4``), for example::

    python -m venv /tmp/lfvenv
    /tmp/lfvenv/bin/pip install torch==2.13.0
    /tmp/lfvenv/bin/pip install llamafactory==0.9.5          # upgrades torch to 2.14.1 (for torchvision 0.29)
    /tmp/lfvenv/bin/pip install "deepspeed>=0.10.0,<=0.18.4"
    /tmp/lfvenv/bin/python tools/check_llamafactory.py train.yaml [key=value ...] [--world-size N]

(docs/trainer-keys.md, section 4.4, has the sizes, times and a smaller CPU-torch variant.)

The script prints ``ok`` and exits 0, or prints ``error: <message>`` and exits 1.
Extra ``key=value`` words override YAML keys, exactly as ``llamafactory-cli train
train.yaml key=value`` does (LLaMA-Factory's ``read_args`` merges them with OmegaConf).

What it runs: ``llamafactory.hparams.parser.get_train_args(dict)``. That function
parses ``ModelArguments``, ``DataArguments``, ``TrainingArguments`` (a
``Seq2SeqTrainingArguments`` subclass), ``FinetuningArguments`` and
``GeneratingArguments`` with ``HfArgumentParser.parse_dict`` (unknown keys are
rejected unless ``ALLOW_EXTRA_ARGS=1``) and then applies every cross-argument
check of LLaMA-Factory (for example ``pure_bf16`` with ZeRO-3). It loads no
model, no tokenizer and no dataset.

Three facts of a CPU-only process would make that function fail for reasons that
do not hold on the real multi-GPU launch, so they are patched (in this process
only):

1. ``transformers.training_args.is_torch_bf16_gpu_available`` and
   ``llamafactory.hparams.parser.is_torch_bf16_gpu_available`` return True.
   Otherwise ``bf16: true`` fails in ``TrainingArguments._validate_args`` with
   "Your setup doesn't support bf16/gpu ..." and ``pure_bf16: true`` fails with
   "This device does not support `pure_bf16`." before the ZeRO-3 check is reached.
2. ``TrainingArguments.parallel_mode`` returns ``ParallelMode.DISTRIBUTED``.
   Otherwise any DeepSpeed YAML fails with "Please use `FORCE_TORCHRUN=1` to
   launch DeepSpeed training." (a process started by torchrun would be
   DISTRIBUTED).
3. ``TrainingArguments.world_size`` returns ``--world-size`` (default 1), so that
   Hugging Face's DeepSpeed ``"auto"`` filling (``train_batch_size`` =
   world_size * per_device_train_batch_size * gradient_accumulation_steps)
   uses the planned number of GPUs. Distributed environment variables (RANK,
   WORLD_SIZE, LOCAL_RANK, ...) are removed from the environment so that no
   process group is started.

After LLaMA-Factory's parse succeeds, further checks run:

* every field typed ``Literal[...]`` or as an ``Enum`` in the four LLaMA-Factory
  dataclasses (for example ``stage``, ``flash_attn``, ``quantization_method``,
  ``infer_dtype``, ``mix_strategy``) must hold one of its allowed values.
  ``HfArgumentParser.parse_dict`` passes dict values straight to the dataclass
  constructor, so LLaMA-Factory itself accepts ``flash_attn: fa4`` at parse
  time and only fails (or silently ignores it) when the model is loaded. This
  check is this script's own, and its message says so;
* two rules LLaMA-Factory applies only while loading the model, but which depend
  on the arguments alone: bitsandbytes ``quantization_bit`` must be 4 or 8, and
  only 4 under ZeRO-3 (``model/model_utils/quantization.py``); ``flash_attn: fa3``
  raises ``Unknown attention type: fa3`` for every model type but gpt_oss
  (``model/model_utils/attention.py``);
* the ``template`` must be registered in ``llamafactory.data.template.TEMPLATES``
  (the same test, and message, as ``get_template_and_fix_tokenizer``);
* when ``deepspeed`` is set (skip with ``--no-ds-check``): the DeepSpeed config
  that Hugging Face built is finalised with
  ``HfTrainerDeepSpeedConfig.trainer_config_finalize`` against a stand-in model
  whose ``config.hidden_size`` is ``--hidden-size`` (default 3584, the Qwen2.5-7B
  language model of MiniCPM-o 2.6), which fills the hidden-size based "auto"
  keys and raises on DeepSpeed values that contradict the training arguments;
  the result is then parsed by ``deepspeed.runtime.config.DeepSpeedConfig``
  with DeepSpeed's world size patched to ``--world-size``. The DeepSpeed
  version is the one installed in this venv.

``--check-dataset`` also resolves ``dataset``/``eval_dataset`` names against
``<dataset_dir>/dataset_info.json`` with ``llamafactory.data.parser.get_dataset_list``
(this imports ``llamafactory.data``, which needs a loadable torchaudio).

Paths in the YAML (``deepspeed``, ``dataset_dir``, ``output_dir``) are read
relative to the current directory, as LLaMA-Factory does; use ``--chdir`` to
change it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import sys
import types
import warnings

_DIST_ENV = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "ACCELERATE_USE_DEEPSPEED",
    "FORCE_TORCHRUN",
    "USE_MCA",
)


def _parse_cli(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    ap = argparse.ArgumentParser(
        description="Validate a LLaMA-Factory train YAML with LLaMA-Factory's own parser (no GPU, model or data)."
    )
    ap.add_argument("yaml", help="path of the LLaMA-Factory YAML (or .json) file")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, as llamafactory-cli accepts them")
    ap.add_argument("--world-size", type=int, default=1, help="number of GPUs the run will use (default 1)")
    ap.add_argument(
        "--hidden-size",
        type=int,
        default=3584,
        help="model hidden size used to fill DeepSpeed hidden-size 'auto' keys (default 3584)",
    )
    ap.add_argument(
        "--num-training-steps",
        type=int,
        default=None,
        help="steps used to finalise the DeepSpeed scheduler 'auto' keys (default: max_steps, else 1000)",
    )
    ap.add_argument("--no-ds-check", action="store_true", help="skip the DeepSpeed finalise/parse step")
    ap.add_argument("--check-dataset", action="store_true", help="also resolve dataset names in dataset_info.json")
    ap.add_argument("--chdir", default=None, help="directory that relative paths in the YAML are read from")
    ap.add_argument("-v", "--verbose", action="store_true", help="print a summary of the parsed arguments after ok")
    return ap.parse_intermixed_args(argv)


def _quiet_logging() -> None:
    os.environ.setdefault("LLAMAFACTORY_VERBOSITY", "WARN")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    warnings.filterwarnings("ignore")
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)


def _patch(world_size: int) -> None:
    import llamafactory.hparams.parser as lf_parser
    import transformers.training_args as hf_ta
    from llamafactory.hparams.training_args import TrainingArguments as LFTrainingArguments
    from transformers.training_args import ParallelMode

    def _true(*_args, **_kwargs) -> bool:
        return True

    hf_ta.is_torch_bf16_gpu_available = _true
    lf_parser.is_torch_bf16_gpu_available = _true
    LFTrainingArguments.parallel_mode = property(lambda self: ParallelMode.DISTRIBUTED)
    LFTrainingArguments.world_size = property(lambda self: world_size)


def _check_choices(*parsed) -> None:
    """Reject values outside a Literal[...] or Enum field type (parse_dict does not check them)."""
    import dataclasses
    import enum
    import typing

    for obj in parsed:
        hints = typing.get_type_hints(type(obj))
        for field in dataclasses.fields(obj):
            if not field.init:
                continue
            value = getattr(obj, field.name)
            if value is None:
                continue
            allowed: list = []
            for tp in (hints.get(field.name),) + typing.get_args(hints.get(field.name)):
                if typing.get_origin(tp) is typing.Literal:
                    allowed.extend(typing.get_args(tp))
                elif isinstance(tp, type) and issubclass(tp, enum.Enum):
                    allowed.extend(member.value for member in tp)
            if not allowed or not all(isinstance(a, (str, int, float, bool)) for a in allowed):
                continue
            raw = value.value if isinstance(value, enum.Enum) else value
            if raw not in allowed:
                raise ValueError(
                    f"`{field.name}` must be one of {allowed}, got {raw!r} "
                    "(check_llamafactory.py check: LLaMA-Factory's parser does not test this value)."
                )


def _check_load_rules(model_args) -> None:
    """Rules LLaMA-Factory applies only when it loads the model, but that depend on arguments alone.

    Assumes the model is not already quantized (e.g. openbmb/MiniCPM-o-2_6), in which case
    on-the-fly bitsandbytes quantization applies.
    """
    from transformers.integrations import is_deepspeed_zero3_enabled

    bit = model_args.quantization_bit
    method = getattr(model_args.quantization_method, "value", model_args.quantization_method)
    if bit is not None and method == "bnb":
        # llamafactory/model/model_utils/quantization.py (configure_quantization, bitsandbytes branch)
        if bit not in (4, 8):
            raise ValueError("Bitsandbytes only accepts 4-bit or 8-bit quantization.")
        if is_deepspeed_zero3_enabled() and bit != 4:
            raise ValueError("Only 4-bit quantized model can use fsdp+qlora or auto device map.")
    flash_attn = getattr(model_args.flash_attn, "value", model_args.flash_attn)
    name = (model_args.model_name_or_path or "").lower()
    if flash_attn == "fa3" and "gpt-oss" not in name and "gpt_oss" not in name:
        # llamafactory/model/model_utils/attention.py configure_attn_implementation: only gpt_oss handles fa3
        raise NotImplementedError("Unknown attention type: fa3")


def _template_names() -> set[str]:
    """Names registered in llamafactory.data.template.TEMPLATES.

    Importing llamafactory.data needs a loadable torchaudio (mm_plugin.py imports it at
    module level). In a venv where it cannot load (e.g. CPU-only torch with a CUDA
    torchaudio wheel) the names are read from the register_template(name=...) calls
    of the same template.py instead.
    """
    try:
        from llamafactory.data.template import TEMPLATES

        return set(TEMPLATES)
    except (ImportError, OSError, RuntimeError):
        import ast
        import importlib.util

        spec = importlib.util.find_spec("llamafactory")
        path = os.path.join(list(spec.submodule_search_locations)[0], "data", "template.py")
        with open(path, encoding="utf-8") as handle:
            tree = ast.parse(handle.read())
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "register_template":
                for kw in node.keywords:
                    if kw.arg == "name" and isinstance(kw.value, ast.Constant):
                        names.add(kw.value.value)
        return names


def _read_args(yaml_path: str, overrides: list[str]):
    from llamafactory.hparams.parser import read_args

    saved = sys.argv
    sys.argv = [saved[0], yaml_path, *overrides]
    try:
        return read_args(None)
    except AttributeError as err:
        if yaml_path.endswith(".json"):
            # llamafactory 0.9.5 read_args does json.load(Path(...)), which cannot read a path.
            raise ValueError(
                f"LLaMA-Factory's read_args cannot read a .json config ({err}); "
                "`llamafactory-cli train x.json` fails the same way. Write the config as YAML."
            ) from err
        raise
    finally:
        sys.argv = saved


def _check_deepspeed(training_args, world_size: int, hidden_size: int, num_training_steps: int | None) -> str:
    hf_ds = getattr(training_args, "hf_deepspeed_config", None)
    if hf_ds is None:
        return "no hf_deepspeed_config"
    steps = num_training_steps
    if steps is None:
        steps = training_args.max_steps if training_args.max_steps and training_args.max_steps > 0 else 1000
    model = types.SimpleNamespace(config=types.SimpleNamespace(hidden_size=hidden_size))
    hf_ds.trainer_config_finalize(training_args, model, steps)

    from unittest import mock

    import deepspeed.runtime.config as ds_config

    with (
        mock.patch.object(ds_config.dist, "get_rank", lambda *a, **k: 0),
        mock.patch.object(ds_config.dist, "get_world_size", lambda *a, **k: world_size),
    ):
        cfg = ds_config.DeepSpeedConfig(hf_ds.config)
    return (
        f"deepspeed: zero stage {cfg.zero_optimization_stage}, train_batch_size {cfg.train_batch_size} = "
        f"{cfg.train_micro_batch_size_per_gpu} x {cfg.gradient_accumulation_steps} x {cfg.world_size}, "
        f"bf16 {cfg.bfloat16_config.enabled}, fp16 {cfg.float16_config.enabled}"
    )


def main(argv: list[str] | None = None) -> int:
    opts = _parse_cli(sys.argv[1:] if argv is None else argv)
    yaml_path = os.path.abspath(opts.yaml)
    if not os.path.isfile(yaml_path):
        print(f"error: {opts.yaml} is not a file")
        return 1
    if opts.chdir:
        os.chdir(opts.chdir)
    for name in _DIST_ENV:
        os.environ.pop(name, None)
    _quiet_logging()

    # LLaMA-Factory and transformers print to stdout/stderr while importing and parsing;
    # keep that out of the one-line answer unless --verbose.
    sink = io.StringIO()
    redirect = contextlib.ExitStack()
    if not opts.verbose:
        redirect.enter_context(contextlib.redirect_stdout(sink))
        redirect.enter_context(contextlib.redirect_stderr(sink))
    summary: list[str] = []
    try:
        with redirect:
            _patch(opts.world_size)
            from llamafactory.hparams.parser import get_train_args

            args = _read_args(yaml_path, opts.overrides)
            model_args, data_args, training_args, finetuning_args, _ = get_train_args(args)
            _check_choices(model_args, data_args, finetuning_args)

            _check_load_rules(model_args)
            if data_args.template is not None and data_args.template not in _template_names():
                raise ValueError(f"Template {data_args.template} does not exist.")

            if opts.check_dataset:
                from llamafactory.data.parser import get_dataset_list

                get_dataset_list(data_args.dataset, data_args.dataset_dir)
                get_dataset_list(data_args.eval_dataset, data_args.dataset_dir)

            summary.append(
                f"stage {finetuning_args.stage}, finetuning_type {finetuning_args.finetuning_type}, "
                f"template {data_args.template}, compute_dtype {model_args.compute_dtype}, "
                f"pure_bf16 {finetuning_args.pure_bf16}, cutoff_len {data_args.cutoff_len}"
            )
            if training_args.deepspeed and not opts.no_ds_check:
                summary.append(
                    _check_deepspeed(training_args, opts.world_size, opts.hidden_size, opts.num_training_steps)
                )
    except Exception as err:  # every LLaMA-Factory / HF / DeepSpeed validation error lands here
        message = str(err).strip() or type(err).__name__
        print(f"error: {message}")
        if opts.verbose:
            print(f"({type(err).__name__})")
        return 1

    print("ok")
    if opts.verbose:
        for line in summary:
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
