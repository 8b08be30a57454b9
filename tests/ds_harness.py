"""Measure what a real DeepSpeed engine holds per rank, on the CPU, over gloo.

This module is the ground truth the planner's arithmetic is checked against. It starts
``world_size`` worker processes (each ``python -m tests.ds_harness --worker ...``), and in
each worker builds a tiny ``transformers`` causal LM, freezes the requested parameters,
runs ``deepspeed.initialize`` with the given DeepSpeed config, runs real training steps
(forward with labels, ``engine.backward``, ``engine.step``) on random token ids and takes a
census of every tensor DeepSpeed's optimizer wrapper and the model hold. The census is
written as JSON by every rank and returned by :func:`measure`, one dict per rank.

Categories (each a :class:`dict` with ``numel``, ``bytes``, ``storage_bytes``,
``by_home``, ``by_dtype`` and ``structures``):

* ``weights``: 16-bit (fp32 when neither bf16 nor fp16 is enabled) parameter storage:
  flat bit16 groups (stage 0/1/2), frozen parameters, ZeRO-3 ``ds_tensor`` partitions and
  the buffers they live in, and fully gathered parameters that are materialized at census
  time (ZeRO-3 persistent parameters).
* ``master_weights``: fp32 master partitions.
* ``optimizer_states``: tensors in the base optimizer's ``state``.
* ``gradients``: every gradient structure (``param.grad``, ``param.grad_accum``, IPG
  buckets, partition buffers, fp32 gradient buffers, CPU-offload gradient buffers ...).
* ``other``: any other tensor found on the optimizer wrapper (e.g. the 16-bit staging
  buffer of ZeRO-1/2 CPU offload, the 1-element grad-norm tensor), so that nothing goes
  unreported.

Each structure is named after the attribute that holds it (``bit16_groups_flat[0]``,
``grad_partitions_flat_buffer``, ``param.ds_tensor(frozen,non-persistent)``, ...).
``numel``/``bytes`` count the elements the tensors reference (the union of their byte
ranges, so a view is never counted twice); ``storage_bytes`` counts the whole storages they
keep alive, which is what has to be budgeted (a gradient view into a larger buffer keeps
all of that buffer alive). Category totals are de-duplicated the same way across the
category's structures.

The census is taken at several points of the last optimizer step (``phases``):
``after_init``; for every micro-step ``m``: ``end_of_backward[m]`` (autograd done, before
the engine's gradient reduction), ``before_epilogue[m]`` (just before the ZeRO epilogue that
reduces the last bucket and frees the IPG buffers), ``after_backward[m]`` (``engine.backward``
returned), ``during_step[m]`` (right before the base optimizer's ``step``, only on the
accumulation boundary) and ``after_step[m]``.

On the CPU accelerator every device is ``cpu`` and ``get_accelerator().pin_memory`` is a
no-op (``deepspeed/accelerator/cpu_accelerator.py:L283``), so where a buffer *would* live
on a GPU machine is reported from DeepSpeed's own flags and structure names, not from the
tensor's device.

Example:
    >>> from tests.ds_harness import DEFAULT_MODEL_CONFIG, apply_hf_auto_values, measure
    >>> ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
    ...       "bf16": {"enabled": True}, "zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"},
    ...       "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
    >>> ds = apply_hf_auto_values(ds, DEFAULT_MODEL_CONFIG["hidden_size"])  # reduce_bucket_size = 65 * 65
    >>> ranks = measure(DEFAULT_MODEL_CONFIG, ds, frozen_prefixes=["model.embed_tokens"])
    >>> ranks[0]["master_weights"]["numel"]  # fp32 partition: (157426 + 2 padding) / 2
    78714

Command line (prints the per-rank category totals, writes the full JSON with ``--out``)::

    python -m tests.ds_harness --ds-config '{"zero_optimization": {"stage": 2}, ...}' \
        --frozen model.embed_tokens --out /tmp/z2.json

The first run on a machine JIT-compiles DeepSpeed's CPU ``fused_adam`` op (used for
``"AdamW"`` without offload) and ``cpu_adam`` op (used with ``offload_optimizer``), about
45 s each on 2 cores; they are cached under ``~/.cache/torch_extensions``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_MODEL_CONFIG",
    "HarnessError",
    "apply_hf_auto_values",
    "measure",
]

#: A tiny Qwen2 (27 parameters, 222,621 elements) whose sizes make DeepSpeed's padding visible at world
#: size 2: ``hidden_size`` 65 with an explicit ``head_dim`` 16 makes the norm weights (65),
#: the MLP matrices (65*171) and the vocab 1003 x 65 embedding/lm_head odd-sized (ZeRO-3
#: pads each of them by 1 element), and the trainable total is not a multiple of
#: 2*world_size (ZeRO-1/2 pad the flat group). Biases and norms (<= 65 elements) fall under
#: HF's auto ``stage3_param_persistence_threshold`` of 10*hidden = 650.
DEFAULT_MODEL_CONFIG: dict[str, Any] = {
    "model_type": "qwen2",
    "vocab_size": 1003,
    "hidden_size": 65,
    "head_dim": 16,
    "intermediate_size": 171,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
}

_CATEGORIES = ("weights", "master_weights", "optimizer_states", "gradients", "other")
_STDERR_TAIL_CHARS = 6000


class HarnessError(RuntimeError):
    """A worker process failed or timed out; the message carries its stderr tail."""


# ---------------------------------------------------------------------------------------
# Parent side
# ---------------------------------------------------------------------------------------


def _free_port() -> int:
    """Returns a TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tail(path: Path, limit: int = _STDERR_TAIL_CHARS) -> str:
    """Returns the last ``limit`` characters of a text file (empty if missing)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return text[-limit:]


def apply_hf_auto_values(ds_config: Mapping[str, Any], hidden_size: int) -> dict[str, Any]:
    """Fills the hidden-size based ``"auto"`` values the way HF Trainer does.

    Mirrors ``HfTrainerDeepSpeedConfig.trainer_config_finalize`` in
    ``transformers/integrations/deepspeed.py:L202-L243`` (transformers 5.24):
    ``reduce_bucket_size = hidden*hidden``; for stage 3 only,
    ``stage3_prefetch_bucket_size = int(0.9*hidden*hidden)`` and
    ``stage3_param_persistence_threshold = 10*hidden``. Only keys whose value is the
    string ``"auto"`` are replaced; batch-size/optimizer ``"auto"`` keys are not handled.

    Args:
        ds_config: A DeepSpeed config dict (not modified).
        hidden_size: The model's ``config.hidden_size``.

    Returns:
        A deep copy of ``ds_config`` with the three keys filled where they were ``"auto"``.
    """
    cfg = copy.deepcopy(dict(ds_config))
    zero = cfg.get("zero_optimization", {})
    if zero.get("reduce_bucket_size") == "auto":
        zero["reduce_bucket_size"] = hidden_size * hidden_size
    if zero.get("stage") == 3:
        if zero.get("stage3_prefetch_bucket_size") == "auto":
            zero["stage3_prefetch_bucket_size"] = int(0.9 * hidden_size * hidden_size)
        if zero.get("stage3_param_persistence_threshold") == "auto":
            zero["stage3_param_persistence_threshold"] = 10 * hidden_size
    return cfg


def _find_auto(obj: Any, path: str = "") -> list[str]:
    """Lists the dotted paths of every ``"auto"`` value left in a config."""
    found: list[str] = []
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            found += _find_auto(value, f"{path}.{key}" if path else str(key))
    elif obj == "auto":
        found.append(path)
    return found


def measure(
    model_config: dict,
    ds_config: dict,
    frozen_prefixes: Sequence[str] = (),
    world_size: int = 2,
    steps: int = 1,
    timeout_s: float = 600,
    *,
    seq_len: int = 8,
    seed: int = 1234,
    zero_init: bool | None = None,
    param_groups: str = "single",
    threads_per_rank: int = 1,
    allow_fp16_on_cpu: bool = False,
    client_optimizer: str | None = None,
    grad_ckpt: bool = False,
) -> list[dict]:
    """Runs a real DeepSpeed engine on ``world_size`` CPU ranks and takes a tensor census.

    Builds a tiny ``transformers`` model from ``model_config`` (passed to
    ``transformers.AutoConfig.for_model(**model_config)``), freezes every parameter whose
    name starts with one of ``frozen_prefixes``, runs ``deepspeed.initialize`` with
    ``ds_config`` on ``world_size`` CPU ranks (gloo), runs ``steps`` optimizer steps
    (each ``gradient_accumulation_steps`` micro-batches of forward with labels,
    ``engine.backward``, ``engine.step``) on random token ids and returns one dict per rank
    describing the tensors DeepSpeed holds on that rank.

    Args:
        model_config: Keyword arguments for ``AutoConfig.for_model``; must include
            ``model_type``. See :data:`DEFAULT_MODEL_CONFIG`.
        ds_config: A complete DeepSpeed config (no ``"auto"`` values; see
            :func:`apply_hf_auto_values`). ``train_batch_size`` is derived by DeepSpeed
            when absent.
        frozen_prefixes: Parameter-name prefixes (as in ``model.named_parameters()``) to
            set ``requires_grad=False`` before ``deepspeed.initialize``. Every prefix must
            match at least one parameter.
        world_size: Number of ranks (processes).
        steps: Number of optimizer steps. The census phases are taken during the last one.
        timeout_s: Wall-clock limit for the whole run.
        seq_len: Tokens per sample.
        seed: Seed for model initialization and the random token ids.
        zero_init: Build the model inside ``deepspeed.zero.Init(config_dict_or_path=ds_config)``
            as HF ``from_pretrained``/``from_config`` does under ZeRO-3. ``None`` means
            "only for stage 3".
        param_groups: ``"single"``: one group of all trainable parameters (what HF Trainer
            passes when the DeepSpeed config has an ``optimizer`` section,
            ``transformers/integrations/deepspeed.py:L576-L577,L669``). ``"decay_split"``:
            two groups (weight decay / no weight decay for biases and norm weights), the
            grouping of ``Trainer.create_optimizer``; each group is flattened and padded
            separately.
        threads_per_rank: ``torch.set_num_threads`` in each worker.
        allow_fp16_on_cpu: DeepSpeed refuses ``fp16.enabled`` on a CPU without AVX512-FP16/AMX
            (``engine.py:L2004``, ``cpu_accelerator.py:L228`` asks
            ``torch.ops.mkldnn._is_mkldnn_fp16_supported()``). When True, the worker
            overrides ``get_accelerator().is_fp16_supported`` to return True so the fp16
            code paths (FP16_Optimizer, ZeRO with loss scaling) run; torch computes fp16 on
            the CPU without that hardware, just slowly. Only that one check is bypassed.
        client_optimizer: ``None``: the optimizer comes from ``ds_config["optimizer"]`` (HF
            Trainer passes a ``DummyOptim`` then). ``"torch_adamw"``: build
            ``torch.optim.AdamW(model_parameters, lr=1e-3)`` and pass it as
            ``deepspeed.initialize(optimizer=...)``, the path HF Trainer takes when the
            config has no ``optimizer`` section (``transformers/integrations/deepspeed.py:L587-L589``,
            which also sets ``zero_allow_untested_optimizer``; do that in ``ds_config``).
        grad_ckpt: ``model.gradient_checkpointing_enable({"use_reentrant": False})`` before
            ``deepspeed.initialize``, as HF Trainer's ``gradient_checkpointing`` does.

    With ``"comms_logger": {"enabled": true, "prof_all": true}`` in ``ds_config`` each rank also
    reports ``comms``: DeepSpeed's comms logger over the last optimizer step only,
    ``{op name: {message bytes: calls}}`` (the message is the op's input tensor: the local
    partition for all-gather, the full buffer for reduce-scatter and all-reduce).

    Returns:
        One dict per rank, ordered by rank, with keys:

        * ``rank``, ``wall_s`` (the whole call, identical on every rank), ``timings``
          (import / build / ``deepspeed.initialize`` / training seconds inside the worker);
        * ``flags``: stage, dtype, world size, offload devices and pin flags, the optimizer
          wrapper and base optimizer classes actually used, communication and gradient
          accumulation dtypes, bucket sizes, ``global_steps``/``skipped_steps``, and the
          wrapper's own attributes (``wrapper.cpu_offload``, ``wrapper.partition_count``, ...);
        * ``params``: per parameter ``name``, ``numel``, ``trainable``, ``dtype`` and for
          ZeRO-3 ``partition_numel``, ``padding_size``, ``persistent``;
        * ``padding``: DeepSpeed's own padding bookkeeping and the rule behind it;
        * ``phases``: ``{phase: {category: ...}}`` (see the module docstring);
        * ``weights``, ``master_weights``, ``optimizer_states``, ``other``: the categories
          at ``after_step`` of the last micro-step; ``total``: ``{"storage_bytes"}`` of all
          categories together at that point (storages shared between categories once);
        * ``gradients``: ``{"end_of_backward", "before_epilogue", "after_backward",
          "during_step", "after_step"}`` of the last micro-step, plus
          ``persist_after_step`` (names of gradient structures still holding memory after
          the step).

    Raises:
        HarnessError: A worker exited non-zero or the run timed out. The message contains
            the stderr tail of the failing worker(s).
        ValueError: ``ds_config`` still contains ``"auto"`` values, or an argument is out of range.
    """
    autos = _find_auto(ds_config)
    if autos:
        raise ValueError(f"ds_config still has 'auto' values at {autos}; fill them first (see apply_hf_auto_values).")
    if steps < 1 or world_size < 1:
        raise ValueError(f"steps and world_size must be >= 1, got steps={steps}, world_size={world_size}")
    if client_optimizer not in (None, "torch_adamw"):
        raise ValueError(f"client_optimizer must be None or 'torch_adamw', got {client_optimizer!r}")
    if param_groups not in ("single", "decay_split"):
        raise ValueError(f"param_groups must be 'single' or 'decay_split', got {param_groups!r}")

    started = time.monotonic()
    repo_root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory(prefix="ds_harness_") as tmp:
        tmpdir = Path(tmp)
        spec = {
            "model_config": model_config,
            "ds_config": ds_config,
            "frozen_prefixes": list(frozen_prefixes),
            "steps": int(steps),
            "seq_len": int(seq_len),
            "seed": int(seed),
            "zero_init": zero_init,
            "param_groups": param_groups,
            "threads_per_rank": int(threads_per_rank),
            "allow_fp16_on_cpu": bool(allow_fp16_on_cpu),
            "client_optimizer": client_optimizer,
            "grad_ckpt": bool(grad_ckpt),
        }
        spec_path = tmpdir / "spec.json"
        spec_path.write_text(json.dumps(spec))
        port = _free_port()

        procs: list[tuple[subprocess.Popen, Path, Any]] = []
        try:
            for rank in range(world_size):
                env = dict(os.environ)
                env.update(
                    {
                        "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(port),
                        "RANK": str(rank),
                        "LOCAL_RANK": str(rank),
                        "WORLD_SIZE": str(world_size),
                        "LOCAL_SIZE": str(world_size),
                        "LOCAL_WORLD_SIZE": str(world_size),
                        "DS_ACCELERATOR": "cpu",
                        "OMP_NUM_THREADS": str(threads_per_rank),
                        "TOKENIZERS_PARALLELISM": "false",
                        "TRANSFORMERS_VERBOSITY": "error",
                        "PYTHONPATH": os.pathsep.join([str(repo_root), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
                    }
                )
                err_path = tmpdir / f"rank{rank}.stderr"
                err_file = open(err_path, "w")
                cmd = [
                    sys.executable,
                    "-m",
                    "tests.ds_harness",
                    "--worker",
                    "--spec",
                    str(spec_path),
                    "--out-dir",
                    str(tmpdir),
                ]
                proc = subprocess.Popen(cmd, cwd=str(repo_root), env=env, stdout=err_file, stderr=subprocess.STDOUT)
                procs.append((proc, err_path, err_file))

            deadline = started + timeout_s
            failed: list[int] = []
            pending = set(range(world_size))
            while pending:
                for rank in sorted(pending):
                    rc = procs[rank][0].poll()
                    if rc is not None:
                        pending.discard(rank)
                        if rc != 0:
                            failed.append(rank)
                if failed:
                    break
                if time.monotonic() > deadline:
                    raise HarnessError(_failure_message(procs, sorted(pending), f"timed out after {timeout_s:.0f}s"))
                time.sleep(0.1)
            if failed:
                # Give the others a moment to fail on their own (their stderr is often useful).
                time.sleep(1.0)
                failed = [r for r in range(world_size) if procs[r][0].poll() not in (None, 0)]
                raise HarnessError(_failure_message(procs, failed, "worker exited non-zero"))
        finally:
            for proc, _, err_file in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                err_file.close()
            _remove_shm_segments(port)

        results = []
        for rank in range(world_size):
            out_path = tmpdir / f"rank{rank}.json"
            if not out_path.exists():
                raise HarnessError(f"rank {rank} exited 0 but wrote no result\n{_tail(procs[rank][1])}")
            results.append(json.loads(out_path.read_text()))

    wall = time.monotonic() - started
    for result in results:
        result["wall_s"] = round(wall, 2)
    return results


def _remove_shm_segments(port: int) -> None:
    """Unlinks the shared-memory allreduce buffers DeepSpeed's CPU comm op leaves behind.

    On the CPU accelerator every rank's ``TorchBackend`` loads ``deepspeed_shm_comm``
    (``deepspeed/comm/torch.py:L47-L53,L207,L219-L220``), which creates a ~64 MiB POSIX
    shared-memory segment ``deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>``
    (``deepspeed/ops/csrc/cpu/comm/shm.cpp:L94,L340-L368``) and never unlinks it. Without this
    cleanup every :func:`measure` call leaks ``world_size`` such segments in ``/dev/shm``.
    Only segments named with this call's port on 127.0.0.1 are removed.
    """
    for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_127.0.0.1_{port}_*"):
        try:
            path.unlink()
        except OSError:
            pass


def _failure_message(procs: Sequence[tuple[subprocess.Popen, Path, Any]], ranks: Iterable[int], what: str) -> str:
    """Builds a :class:`HarnessError` message with the stderr tails of ``ranks``."""
    parts = [f"DeepSpeed harness: {what} (ranks {list(ranks)})"]
    for rank in ranks:
        proc, err_path, err_file = procs[rank]
        err_file.flush()
        parts.append(f"----- rank {rank} (returncode {proc.poll()}) stderr tail -----\n{_tail(err_path)}")
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------
# Worker side: census helpers
# ---------------------------------------------------------------------------------------


class _Census:
    """Collects tensors into categories/structures and totals them without double counting.

    A tensor is identified by its storage (``untyped_storage().data_ptr()``) and the byte
    range it covers; totals are unions of such ranges.
    """

    def __init__(self) -> None:
        # category -> structure -> list of
        # (storage_key, start_byte, end_byte, dtype, elem_size, device, storage_nbytes)
        self.items: dict[str, dict[str, list[tuple]]] = {c: defaultdict(list) for c in _CATEGORIES}

    def add(self, category: str, structure: str, tensor: Any) -> None:
        """Records ``tensor`` under ``category``/``structure`` (ignored if empty/None)."""
        import torch

        if tensor is None or not isinstance(tensor, torch.Tensor) or tensor.numel() == 0:
            return
        if tensor.is_sparse or tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        esize = tensor.element_size()
        start = tensor.storage_offset() * esize
        # Only contiguous views are expected here; for a strided view count its extent.
        extent = sum((s - 1) * st for s, st in zip(tensor.shape, tensor.stride(), strict=True)) + 1
        end = start + extent * esize
        self.items[category][structure].append(
            (
                storage.data_ptr(),
                start,
                end,
                str(tensor.dtype).replace("torch.", ""),
                esize,
                str(tensor.device),
                storage.nbytes(),
            )
        )

    @staticmethod
    def _union(entries: Iterable[tuple]) -> tuple[dict[str, int], dict[str, int]]:
        """Unique referenced bytes per dtype, and the element size of each dtype."""
        by_storage: dict[tuple, list[tuple[int, int]]] = defaultdict(list)
        esizes: dict[str, int] = {}
        for key, start, end, dtype, esize, *_ in entries:
            by_storage[(key, dtype)].append((start, end))
            esizes[dtype] = esize
        out: dict[str, int] = defaultdict(int)
        for (_key, dtype), ranges in by_storage.items():
            ranges.sort()
            cur_s, cur_e = ranges[0]
            for s, e in ranges[1:]:
                if s <= cur_e:
                    cur_e = max(cur_e, e)
                else:
                    out[dtype] += cur_e - cur_s
                    cur_s, cur_e = s, e
            out[dtype] += cur_e - cur_s
        return {dtype: nbytes for dtype, nbytes in out.items()}, esizes

    def summary(self, home_of: Any = None) -> dict[str, Any]:
        """Returns ``{category: {numel, bytes, storage_bytes, by_dtype, structures}, "total": ...}``.

        ``numel``/``bytes`` count the elements the tensors reference (union of ranges);
        ``storage_bytes`` counts the whole storages they keep alive (a view into a larger
        buffer keeps all of it alive), which is what a memory planner must budget.
        ``home_of(category, structure)``, if given, labels each structure with where it
        would live on a GPU machine; ``by_home`` then splits ``storage_bytes`` by that label
        (each storage counted once, under the first structure that references it).
        """
        result: dict[str, Any] = {}
        for category in _CATEGORIES:
            structures: dict[str, Any] = {}
            all_entries: list[tuple] = []
            by_home: dict[str, int] = defaultdict(int)
            counted: set[int] = set()
            for name, entries in sorted(self.items[category].items()):
                all_entries += entries
                home = home_of(category, name) if home_of is not None else "unknown"
                for key, nbytes in {e[0]: e[6] for e in entries}.items():
                    if key not in counted:
                        counted.add(key)
                        by_home[home] += nbytes
                per_dtype, esizes = self._union(entries)
                nbytes = sum(per_dtype.values())
                numel = sum(b // esizes[d] for d, b in per_dtype.items())
                info = {
                    "numel": numel,
                    "bytes": nbytes,
                    "storage_bytes": sum({e[0]: e[6] for e in entries}.values()),
                    "dtype": ",".join(sorted(per_dtype)),
                    "tensors": len(entries),
                    "device": ",".join(sorted({e[5] for e in entries})),
                }
                info["home"] = home
                structures[name] = info
            per_dtype, esizes = self._union(all_entries) if all_entries else ({}, {})
            result[category] = {
                "numel": sum(b // esizes[d] for d, b in per_dtype.items()),
                "bytes": sum(per_dtype.values()),
                "storage_bytes": sum({e[0]: e[6] for e in all_entries}.values()),
                "by_home": dict(sorted(by_home.items())),
                "by_dtype": {d: {"numel": b // esizes[d], "bytes": b} for d, b in sorted(per_dtype.items())},
                "structures": structures,
            }
        # Everything at once: a storage referenced by two categories (e.g. the ZeRO-3 fp32
        # master that aliases the 16-bit partition buffer when training in fp32) counts once.
        everything = {e[0]: e[6] for cat in _CATEGORIES for entries in self.items[cat].values() for e in entries}
        result["total"] = {"storage_bytes": sum(everything.values())}
        return result


# Attribute names on the ZeRO / BF16 / FP16 optimizer wrappers, by category. Anything not
# listed that holds tensors lands in "other" under its attribute path.
_WEIGHT_ATTRS = {
    "bit16_groups_flat",  # stage_1_and_2.py: flat 16-bit trainable params (+alignment padding)
    "parallel_partitioned_bit16_groups",  # views of bit16_groups_flat
    "bf16_groups_flat",  # bf16_optimizer.py
    "bf16_partitioned_groups",  # views of bf16_groups_flat
    "fp16_groups_flat",  # fp16/fused_optimizer.py (also used for bf16 in stage 0)
    "lp_param_buffer",  # stage3.py: defragmented trainable ds_tensor partitions
    "fp16_partitioned_groups_flat",  # stage3.py: per-sub-group views
    "fp16_partitioned_groups",  # stage3.py: ds_tensors
    "param_groups_fp16_flat_cpu_memory",  # stage3.py with offload_param
}
_MASTER_ATTRS = {
    "single_partition_of_fp32_groups",  # stage_1_and_2.py
    "fp32_partitioned_groups_flat",  # stage3.py
    "fp32_groups_flat_partition",  # bf16_optimizer.py
    "fp32_groups_flat",  # fp16/fused_optimizer.py
    "fp32_groups",  # fp16/unfused_optimizer.py
}
_OTHER_ATTRS = {"_global_grad_norm", "inf_or_nan_tracker", "norm_for_param_grads"}
_SKIP_ATTRS = {
    "module",
    "optimizer",
    "basic_optimizer",
    "backup_optimizer",
    "parameter_offload",
    "param_names",
    "timers",
    "loss_scaler",
    "mpu",
    "param_dict",
    "param_id",
    "deepspeed",
    "overflow_checker",
    "round_robin_bit16_meta",
    "_param_slice_mappings",
    "torch_autocast_gradscaler",
}


def _is_grad_attr(name: str) -> bool:
    """Whether an optimizer attribute name denotes a gradient structure."""
    lowered = name.lower()
    return "grad" in lowered or lowered.startswith("ipg")


def _walk(obj: Any, path: str, depth: int, seen: set[int], skip: set[int]) -> Iterator[tuple[str, Any]]:
    """Yields ``(path, tensor)`` for tensors reachable through containers from ``obj``.

    Descends into lists/tuples/dicts (values only), dataclass-like IPG buckets and
    ``GradPartitionBufferGroup`` (a list subclass); also yields ``tensor.grad``. Tensors
    whose ``id`` is in ``skip`` (model parameters) are not yielded, nor their ``.grad``.
    """
    import torch

    if depth > 5 or id(obj) in seen:
        return
    if isinstance(obj, torch.Tensor):
        if id(obj) in skip:
            return  # a model parameter: counted (with its .grad) from the module
        seen.add(id(obj))
        yield path, obj
        grad = obj.grad if obj.is_leaf else None
        if grad is not None:
            yield path + ".grad", grad
        flat = getattr(obj, "flat_partition", None)
        if isinstance(flat, torch.Tensor):
            yield path + ".flat_partition", flat
        return
    if isinstance(obj, (list, tuple, set)):
        seen.add(id(obj))
        for i, item in enumerate(obj):
            yield from _walk(item, f"{path}[{i}]", depth + 1, seen, skip)
        flat = getattr(obj, "flat_partition", None)
        if isinstance(flat, torch.Tensor):
            yield from _walk(flat, path + ".flat_partition", depth + 1, seen, skip)
        return
    if isinstance(obj, dict):
        seen.add(id(obj))
        for key, item in obj.items():
            # Parameter ids / tensors as keys are collapsed; names and dtypes are kept.
            label = f"[{key}]" if isinstance(key, (str, torch.dtype)) else "{*}"
            yield from _walk(item, f"{path}{label}", depth + 1, seen, skip)
        return
    cls = type(obj).__name__
    if cls in ("IPGBucket", "IPGBucketZ3"):
        seen.add(id(obj))
        for key, item in vars(obj).items():
            yield from _walk(item, f"{path}.{key}", depth + 1, seen, skip)


def _structure_name(path: str) -> str:
    """Collapses a walk path to a structure name.

    The first list index right after the attribute name (the param-group index) is kept,
    later numeric indices become ``[*]``, non-numeric keys (dtypes, state names) are kept:
    ``averaged_gradients{*}[13]`` -> ``averaged_gradients{*}[*]``,
    ``bit16_groups_flat[0]`` -> ``bit16_groups_flat[0]``.
    """
    import re

    out: list[str] = []
    first_index_done = False
    for token in re.findall(r"\[[^\]]*\]|\{\*\}|\.?[^.\[{]+", path):
        if token.startswith("["):
            inner = token[1:-1]
            if inner.isdigit():
                token = token if not first_index_done else "[*]"
            first_index_done = True
        elif token == "{*}":
            first_index_done = True
        out.append(token)
    return "".join(out)


def _take_census(engine: Any, module_param_ids: set[int], frozen_names: set[str]) -> dict[str, Any]:
    """Census of the engine's optimizer wrapper, base optimizer state and model params."""
    import torch

    census = _Census()
    opt = engine.optimizer
    zero3 = engine.zero_optimization_stage() == 3

    # 1. Model parameters (weights) and their gradients.
    for name, param in engine.module.named_parameters():
        frozen = name in frozen_names or not param.requires_grad
        kind = "frozen" if frozen else "trainable"
        if zero3 and hasattr(param, "ds_tensor"):
            persist = "persistent" if getattr(param, "ds_persist", False) else "non-persistent"
            census.add("weights", f"param.ds_tensor({kind},{persist})", param.ds_tensor)
            if param.data.numel() > 0:
                census.add("weights", f"param.data gathered({kind},{persist})", param.data)
        else:
            census.add("weights", f"param.data({kind})", param.data)
        census.add("gradients", f"param.grad({kind})", param.grad)
        census.add("gradients", f"param.grad_accum({kind})", getattr(param, "grad_accum", None))

    # 2. Tensors held by the optimizer wrapper.
    if opt is not None:
        seen: set[int] = set()
        plain = isinstance(opt, torch.optim.Optimizer)  # no wrapper (fp32 at stage 0)
        for attr, value in vars(opt).items():
            if attr in _SKIP_ATTRS or (plain and attr in ("state", "param_groups", "defaults")):
                continue
            display = attr.replace(f"_{type(opt).__name__}__", "__")  # undo name mangling
            for path, tensor in _walk(value, display, 0, seen, module_param_ids):
                top = attr
                if top in _OTHER_ATTRS:
                    category = "other"
                elif path.endswith(".grad") or _is_grad_attr(top):
                    category = "gradients"
                elif top in _WEIGHT_ATTRS:
                    category = "weights"
                elif top in _MASTER_ATTRS:
                    category = "master_weights"
                else:
                    category = "other"
                census.add(category, _structure_name(path), tensor)

    # 3. Base optimizer state.
    base = getattr(opt, "optimizer", None) if opt is not None else None
    if base is None or not hasattr(base, "state"):
        base = opt
    if base is not None and hasattr(base, "state"):
        for state in base.state.values():
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    census.add("optimizer_states", f"state[{key}]", value)
    return census.summary(lambda category, name: _home(engine, category, name))


def _offload_device(offload_config: Any) -> str | None:
    """``"cpu"``/``"nvme"`` for an offload config section, None when absent or ``"none"``."""
    if offload_config is None:
        return None
    device = getattr(offload_config.device, "value", offload_config.device)
    return None if str(device) == "none" else str(device)


def _home(engine: Any, category: str, structure: str) -> str:
    """Where ``structure`` lives on a GPU machine: ``accelerator``, ``host`` or ``host(pinned)``.

    On the CPU accelerator every tensor is on ``cpu`` and pinning is a no-op, so this is
    derived from DeepSpeed's own flags and the code path that allocates each structure
    (file:line references in docs/zero-internals.md, section "Where buffers live").
    """
    opt = engine.optimizer
    zc = engine._config.zero_config
    stage = engine.zero_optimization_stage()
    off_opt = _offload_device(zc.offload_optimizer) is not None
    off_pin = bool(zc.offload_optimizer.pin_memory) if off_opt else False
    off_param = _offload_device(zc.offload_param) is not None
    param_pin = bool(zc.offload_param.pin_memory) if off_param else False

    def host(pinned: bool) -> str:
        return "host(pinned)" if pinned else "host"

    if stage in (1, 2) and getattr(opt, "cpu_offload", False):
        if structure.startswith(
            (
                "single_partition_of_fp32_groups",
                "offload_gradient_dict",
                "accumulated_grads_in_cpu",
                "param_buffer_of_bit16_for_cpu_offload_groups",
                "temp_grad_buffer_for_cpu_offload",
            )
        ):
            return host(off_pin)
        if category == "optimizer_states":
            return host(False)
        return "accelerator"
    if stage == 3:
        if structure.startswith("param_groups_fp16_flat_cpu_memory"):
            return host(True)
        if structure.startswith("fp16_partitioned_groups") or structure.startswith("param.ds_tensor(trainable"):
            return host(True) if off_param else "accelerator"
        if structure.startswith("param.ds_tensor(frozen,non-persistent"):
            return host(param_pin) if off_param else "accelerator"
        if off_opt:
            if structure.startswith("fp32_partitioned_groups_flat"):
                return host(off_pin) if structure.endswith(".grad") else host(False)
            if structure.startswith(("grad_partitions_flat_buffer", "__param_id_to_grad_partition")):
                return host(off_pin)
            if category == "optimizer_states":
                return host(False)
        return "accelerator"
    return "accelerator"


def _param_facts(engine: Any, frozen_names: set[str]) -> list[dict[str, Any]]:
    """Per-parameter facts: numel, dtype, trainable, ZeRO-3 partition/persist/padding."""
    out = []
    for name, param in engine.module.named_parameters():
        fact: dict[str, Any] = {
            "name": name,
            "trainable": bool(param.requires_grad),
            "frozen_by_harness": name in frozen_names,
            "dtype": str(param.dtype).replace("torch.", ""),
        }
        if hasattr(param, "ds_tensor"):
            fact.update(
                {
                    "numel": int(param.ds_numel),
                    "partition_numel": int(param.ds_tensor.ds_numel),
                    "padding_size": int(param.padding_size()),
                    "persistent": bool(getattr(param, "ds_persist", False)),
                    "ds_tensor_dtype": str(param.ds_tensor.dtype).replace("torch.", ""),
                    "final_location": str(getattr(param.ds_tensor, "final_location", None)),
                }
            )
        else:
            fact["numel"] = int(param.numel())
        out.append(fact)
    return out


def _padding_report(engine: Any) -> dict[str, Any]:
    """The alignment/padding DeepSpeed added, read from its own bookkeeping."""
    opt = engine.optimizer
    rep: dict[str, Any] = {"wrapper": type(opt).__name__ if opt is not None else None}
    if opt is None:
        return rep
    name = type(opt).__name__
    if hasattr(opt, "bit16_groups_flat"):  # ZeRO-1/2
        groups = []
        for i, flat in enumerate(opt.bit16_groups_flat):
            trainable = sum(p.numel() for p in opt.bit16_groups[i])
            groups.append(
                {
                    "trainable_numel": int(trainable),
                    "flat_numel": int(flat.numel()),
                    "flat_padding": int(flat.numel() - trainable),
                    "alignment": int(opt.nccl_start_alignment_factor * opt.partition_count[i]),
                    "partition_size": int(opt.partition_size[i]),
                    "this_rank_partition_padding(groups_padding)": int(opt.groups_padding[i]),
                    "param_alignment_paddings": [int(x) for x in opt.round_robin_bit16_padding[i] if x],
                }
            )
        rep["groups"] = groups
        rep["rule"] = (
            "flat = sum(trainable numel) (+ per-param padding if parameter_alignment) rounded up to "
            "a multiple of nccl_start_alignment_factor(2) * dp_world_size; partition = flat / dp"
        )
    elif hasattr(opt, "bf16_groups_flat"):  # BF16_Optimizer
        groups = []
        for i, flat in enumerate(opt.bf16_groups_flat):
            trainable = sum(p.numel() for p in opt.bf16_groups[i])
            groups.append(
                {
                    "trainable_numel": int(trainable),
                    "flat_numel": int(flat.numel()),
                    "flat_padding": int(flat.numel() - trainable),
                    "alignment": int(opt.nccl_start_alignment_factor * opt.partition_count[i]),
                    "partition_size": int(flat.numel() // opt.partition_count[i]),
                    "this_rank_padding(group_paddings)": int(opt.group_paddings[i]),
                }
            )
        rep["groups"] = groups
        rep["rule"] = "flat = sum(trainable numel) rounded up to a multiple of 2 * dp_world_size"
    elif hasattr(opt, "fp16_partitioned_groups_flat"):  # ZeRO-3
        sub_groups = []
        for i, group in enumerate(opt.fp16_groups):
            sub_groups.append(
                {
                    "params": len(group),
                    "numel": int(sum(p.ds_numel for p in group)),
                    "partition_numel": int(opt.fp16_partitioned_groups_flat_numel[i]),
                    "padding_this_rank(groups_padding)": int(sum(opt.groups_padding[i])),
                    "padding_per_param_total": int(sum(p.padding_size() for p in group)),
                }
            )
        rep["sub_groups"] = sub_groups
        frozen = [p for p in engine.module.parameters() if not p.requires_grad and hasattr(p, "ds_tensor")]
        rep["frozen_padding_total"] = int(sum(p.padding_size() for p in frozen))
        rep["rule"] = (
            "per parameter: ds_numel padded up to a multiple of dp_world_size; "
            "partition = aligned/dp; no group-level padding"
        )
    elif hasattr(opt, "fp16_groups_flat"):  # FP16_Optimizer (fp16 or bf16 at stage 0)
        rep["groups"] = [
            {"trainable_numel": int(sum(p.numel() for p in opt.fp16_groups[i])), "flat_numel": int(flat.numel())}
            for i, flat in enumerate(opt.fp16_groups_flat)
        ]
        rep["rule"] = "no padding: _flatten_dense_tensors of the trainable params per group"
    else:
        rep["rule"] = f"{name}: no flat buffers"
    return rep


#: Attributes of the optimizer wrapper copied into ``flags`` as ``wrapper.<name>`` when present.
_WRAPPER_FLAG_ATTRS = (
    "cpu_offload",
    "partition_gradients",
    "contiguous_gradients",
    "overlap_comm",
    "use_grad_accum_attribute",
    "offload_optimizer",
    "offload_param",
    "offload_optimizer_pin_memory",
    "offload_param_pin_memory",
    "partition_count",
    "sub_group_size",
    "round_robin_gradients",
    "gradient_accumulation_dtype",
    "master_weights_and_grads_dtype",
    "immediate_grad_update",
    "grad_acc_dtype",
    "reduce_bucket_size",
)


def _flags(engine: Any, world_size: int) -> dict[str, Any]:
    """DeepSpeed's own view of the configuration it ran with."""
    import torch

    opt = engine.optimizer
    zc = engine._config.zero_config
    dtype = "bf16" if engine.bfloat16_enabled() else "fp16" if engine.fp16_enabled() else "fp32"
    flags: dict[str, Any] = {
        "stage": int(engine.zero_optimization_stage()),
        "dtype": dtype,
        "world_size": world_size,
        "gradient_accumulation_steps": int(engine.gradient_accumulation_steps()),
        "train_micro_batch_size_per_gpu": int(engine.train_micro_batch_size_per_gpu()),
        "offload_optimizer": _offload_device(zc.offload_optimizer),
        "offload_optimizer_pin_memory": bool(zc.offload_optimizer.pin_memory) if zc.offload_optimizer else None,
        "offload_param": _offload_device(zc.offload_param),
        "offload_param_pin_memory": bool(zc.offload_param.pin_memory) if zc.offload_param else None,
        "optimizer_wrapper": type(opt).__name__ if opt is not None else None,
        "base_optimizer": type(engine.basic_optimizer).__name__ if engine.basic_optimizer is not None else None,
        "communication_data_type": str(engine.communication_data_type).replace("torch.", ""),
        "grad_accum_dtype": str(engine.get_data_types()[1]).replace("torch.", ""),
        "contiguous_gradients": bool(zc.contiguous_gradients),
        "overlap_comm": bool(zc.overlap_comm) if zc.overlap_comm is not None else None,
        "reduce_bucket_size": int(zc.reduce_bucket_size),
        "zero_force_ds_cpu_optimizer": bool(engine.zero_force_ds_cpu_optimizer()),
        "global_steps": int(engine.global_steps),
        "skipped_steps": int(engine.skipped_steps),
        "torch": torch.__version__,
    }
    import deepspeed

    flags["deepspeed"] = deepspeed.__version__
    for attr in _WRAPPER_FLAG_ATTRS:
        if opt is not None and hasattr(opt, attr):
            value = getattr(opt, attr)
            if isinstance(value, torch.dtype):
                value = str(value).replace("torch.", "")
            elif not isinstance(value, (bool, int, float, str, list, type(None))):
                value = str(value)
            flags[f"wrapper.{attr}"] = value
    if zc.stage == 3:
        flags["stage3_param_persistence_threshold"] = int(zc.param_persistence_threshold)
        flags["stage3_prefetch_bucket_size"] = int(zc.prefetch_bucket_size)
        flags["stage3_max_live_parameters"] = int(zc.max_live_parameters)
        flags["sub_group_size"] = int(zc.sub_group_size)
    return flags


def _decay_split(model: Any, params: list[Any]) -> list[dict[str, Any]]:
    """Two param groups like ``Trainer.create_optimizer``: no decay for biases and norms."""
    import torch
    from transformers.trainer_pt_utils import get_parameter_names

    try:
        from transformers.pytorch_utils import ALL_LAYERNORM_LAYERS
    except ImportError:  # pragma: no cover - depends on transformers version
        ALL_LAYERNORM_LAYERS = [torch.nn.LayerNorm]
    forbidden = list(ALL_LAYERNORM_LAYERS)
    decay_names = set(get_parameter_names(model, forbidden, ["bias", "layernorm", "rmsnorm", "norm"]))
    wanted = {id(p) for p in params}
    decay = [p for n, p in model.named_parameters() if n in decay_names and id(p) in wanted]
    no_decay = [p for n, p in model.named_parameters() if n not in decay_names and id(p) in wanted]
    return [g for g in ({"params": decay}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]]


def _wrap_method(obj: Any, name: str, callback: Any) -> None:
    """Makes ``obj.name(...)`` call ``callback()`` first (no-op if ``obj`` lacks ``name``).

    Used for two census points inside ``engine.backward``:

    * ``DeepSpeedEngine._backward_epilogue`` (``engine.py:L3153``) runs after autograd has
      produced every gradient and before the engine's own reduction
      (``allreduce_gradients``, ``engine.py:L3165``): the end-of-backward state, e.g. ZeRO-1
      and stage 0 still hold every full 16-bit gradient here.
    * ``independent_gradient_partition_epilogue`` of ZeRO-1/2 (``stage_1_and_2.py:L1016``)
      and ZeRO-3 (``stage3.py:L1407``) reduces the last IPG bucket and then releases the
      transient gradient buffers (IPG buckets, ZeRO-2 ``grads_in_partition``), so a census
      just before it sees those buffers at their backward-time size.
    """
    original = getattr(obj, name, None) if obj is not None else None
    if original is None:
        return

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        callback()
        return original(*args, **kwargs)

    setattr(obj, name, wrapped)


def _wrap_base_step(engine: Any, callback: Any) -> None:
    """Calls ``callback()`` right before the base optimizer's ``step`` (once per label).

    By then the wrapper has built the gradient the base optimizer consumes (e.g. the fp32
    partition gradient ``single_partition_of_fp32_groups[i].grad`` of ZeRO-1/2,
    ``stage_1_and_2.py:L3116-L3134``, or ``fp32_partitioned_groups_flat[i].grad`` of ZeRO-3,
    ``stage3.py:L2683-L2695``), which is freed again right after the step.
    """
    opt = engine.optimizer
    base = getattr(opt, "optimizer", None)
    if base is None or not hasattr(base, "step"):
        base = opt
    if base is None:
        return
    original = base.step

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        callback()
        return original(*args, **kwargs)

    base.step = wrapped


def _worker(spec_path: str, out_dir: str) -> None:
    """Entry point of one rank: build, initialize, train, census, write ``rank{r}.json``."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    spec = json.loads(Path(spec_path).read_text())
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    timings: dict[str, float] = {}
    t0 = time.monotonic()

    import torch

    torch.set_num_threads(spec["threads_per_rank"])
    import deepspeed
    import transformers
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    transformers.logging.set_verbosity_error()
    timings["import_s"] = time.monotonic() - t0

    if spec.get("allow_fp16_on_cpu"):
        from deepspeed.accelerator import get_accelerator

        accelerator = get_accelerator()
        accelerator.is_fp16_supported = lambda: True  # see measure(allow_fp16_on_cpu=...)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    ds_config = spec["ds_config"]
    stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
    zero_init = spec["zero_init"] if spec["zero_init"] is not None else stage == 3

    torch.manual_seed(spec["seed"])
    config = transformers.AutoConfig.for_model(**spec["model_config"])
    # Resolve (import) the model class before zero.Init: zero.Init patches tensor
    # constructors, and a first import of torch._dynamo inside it fails.
    transformers.AutoModelForCausalLM._model_mapping[type(config)]
    import torch._dynamo  # noqa: F401

    t1 = time.monotonic()
    if zero_init:
        # What PreTrainedModel._from_config does under ZeRO-3 (transformers/modeling_utils.py:L1435-L1449);
        # HfDeepSpeedConfig itself cannot be used without `accelerate`.
        from contextlib import ExitStack

        with ExitStack() as stack:
            try:
                from transformers.integrations.deepspeed import prevent_arange_dtype_change

                stack.enter_context(prevent_arange_dtype_change())
            except ImportError:  # pragma: no cover - older transformers
                pass
            stack.enter_context(deepspeed.zero.Init(config_dict_or_path=ds_config))
            model = transformers.AutoModelForCausalLM.from_config(config)
    else:
        model = transformers.AutoModelForCausalLM.from_config(config)
    timings["build_model_s"] = time.monotonic() - t1

    frozen_names: set[str] = set()
    for prefix in spec["frozen_prefixes"]:
        matched = [n for n, _ in model.named_parameters() if n.startswith(prefix)]
        if not matched:
            raise ValueError(
                f"frozen prefix {prefix!r} matches no parameter; names are "
                f"{[n for n, _ in model.named_parameters()][:8]}..."
            )
        frozen_names.update(matched)
    for name, param in model.named_parameters():
        if name in frozen_names:
            param.requires_grad_(False)

    if spec.get("grad_ckpt"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainable = [p for p in model.parameters() if p.requires_grad]
    model_parameters: Any = trainable if spec["param_groups"] == "single" else _decay_split(model, trainable)

    t2 = time.monotonic()
    if spec.get("client_optimizer") == "torch_adamw":
        client = torch.optim.AdamW(model_parameters, lr=1e-3)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=client, config=ds_config)
    else:
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model_parameters, config=ds_config)
    timings["initialize_s"] = time.monotonic() - t2

    module_param_ids = {id(p) for p in engine.module.parameters()}
    phases: dict[str, Any] = {"after_init": _take_census(engine, module_param_ids, frozen_names)}
    capture: dict[str, str | None] = {"backward_end": None, "epilogue": None, "step": None}

    def snapshot(key: str) -> None:
        label = capture[key]
        if label is not None and label not in phases:
            phases[label] = _take_census(engine, module_param_ids, frozen_names)

    _wrap_method(engine, "_backward_epilogue", lambda: snapshot("backward_end"))
    _wrap_method(engine.optimizer, "independent_gradient_partition_epilogue", lambda: snapshot("epilogue"))
    _wrap_base_step(engine, lambda: snapshot("step"))

    gas = int(engine.gradient_accumulation_steps())
    micro = int(engine.train_micro_batch_size_per_gpu())
    gen = torch.Generator().manual_seed(spec["seed"] + 1000 * rank)
    vocab = int(config.vocab_size)
    t3 = time.monotonic()
    for step in range(spec["steps"]):
        last = step == spec["steps"] - 1
        if last:
            deepspeed.comm.reset_log()  # the comms logger (if enabled) records the last step only
        for m in range(gas):
            ids = torch.randint(0, vocab, (micro, spec["seq_len"]), generator=gen)
            out = engine(input_ids=ids, labels=ids)
            capture["epilogue"] = f"before_epilogue[{m}]" if last else None
            capture["backward_end"] = f"end_of_backward[{m}]" if last else None
            engine.backward(out.loss)
            capture["epilogue"] = capture["backward_end"] = None
            if last:
                phases[f"after_backward[{m}]"] = _take_census(engine, module_param_ids, frozen_names)
            capture["step"] = f"during_step[{m}]" if last else None
            engine.step()
            capture["step"] = None
            if last:
                phases[f"after_step[{m}]"] = _take_census(engine, module_param_ids, frozen_names)
    timings["train_s"] = time.monotonic() - t3

    last_m = gas - 1
    final = phases[f"after_step[{last_m}]"]
    grads_bwd = phases[f"after_backward[{last_m}]"]["gradients"]
    result = {
        "rank": rank,
        "flags": _flags(engine, world_size),
        "params": _param_facts(engine, frozen_names),
        "padding": _padding_report(engine),
        "weights": final["weights"],
        "master_weights": final["master_weights"],
        "optimizer_states": final["optimizer_states"],
        "gradients": {
            "end_of_backward": phases.get(f"end_of_backward[{last_m}]", {}).get("gradients"),
            "before_epilogue": phases.get(f"before_epilogue[{last_m}]", {}).get("gradients"),
            "after_backward": grads_bwd,
            "during_step": phases.get(f"during_step[{last_m}]", {}).get("gradients"),
            "after_step": final["gradients"],
            "persist_after_step": sorted(k for k, v in final["gradients"]["structures"].items() if v["bytes"] > 0),
        },
        "other": final["other"],
        "total": final["total"],
        "phases": phases,
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "comms": {name: {str(size): rec[0] for size, rec in sizes.items()}
                  for name, sizes in deepspeed.comm.comms_logger.comms_dict.items()},
    }
    tmp_path = Path(out_dir) / f"rank{rank}.json.tmp"
    tmp_path.write_text(json.dumps(result, indent=1))
    tmp_path.rename(Path(out_dir) / f"rank{rank}.json")
    deepspeed.comm.barrier()


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------


def _summarize(results: Sequence[dict]) -> str:
    """One block per rank: flags and per-category totals/structures."""
    lines = []
    for res in results:
        f = res["flags"]
        lines.append(
            f"rank {res['rank']}: stage={f['stage']} dtype={f['dtype']} wrapper={f['optimizer_wrapper']} "
            f"base={f['base_optimizer']} offload_opt={f['offload_optimizer']} "
            f"offload_param={f['offload_param']}"
        )
        for cat, blob in (
            ("weights", res["weights"]),
            ("master_weights", res["master_weights"]),
            ("optimizer_states", res["optimizer_states"]),
            ("gradients(end_of_backward)", res["gradients"]["end_of_backward"]),
            ("gradients(before_epilogue)", res["gradients"]["before_epilogue"]),
            ("gradients(after_backward)", res["gradients"]["after_backward"]),
            ("gradients(during_step)", res["gradients"]["during_step"]),
            ("gradients(after_step)", res["gradients"]["after_step"]),
            ("other", res["other"]),
        ):
            if blob is None:
                continue
            lines.append(
                f"  {cat}: numel={blob['numel']} bytes={blob['bytes']} storage_bytes={blob['storage_bytes']} "
                f"by_home={blob['by_home']}"
            )
            for name, s in blob["structures"].items():
                lines.append(
                    f"      {name}: numel={s['numel']} bytes={s['bytes']} storage_bytes={s['storage_bytes']} "
                    f"dtype={s['dtype']} n={s['tensors']} home={s.get('home')}"
                )
    lines.append(f"wall_s={results[0]['wall_s']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (also the worker entry point with ``--worker``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", help=argparse.SUPPRESS)
    parser.add_argument("--model-config", default=None, help="JSON dict for AutoConfig.for_model")
    parser.add_argument("--ds-config", default=None, help="JSON dict or path to a JSON file")
    parser.add_argument("--frozen", nargs="*", default=[], help="parameter-name prefixes to freeze")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--param-groups", default="single", choices=["single", "decay_split"])
    parser.add_argument("--allow-fp16-on-cpu", action="store_true", help="bypass DeepSpeed's CPU fp16 check")
    parser.add_argument("--client-optimizer", default=None, choices=["torch_adamw"])
    parser.add_argument(
        "--zero-init",
        default=None,
        choices=["yes", "no"],
        help="build the model under zero.Init (default: only for stage 3)",
    )
    parser.add_argument("--out", default=None, help="write the full per-rank JSON here")
    args = parser.parse_args(argv)

    if args.worker:
        _worker(args.spec, args.out_dir)
        return 0
    if args.ds_config is None:
        parser.error("--ds-config is required")
    ds_text = Path(args.ds_config).read_text() if os.path.exists(args.ds_config) else args.ds_config
    model_config = json.loads(args.model_config) if args.model_config else DEFAULT_MODEL_CONFIG
    results = measure(
        model_config,
        json.loads(ds_text),
        frozen_prefixes=args.frozen,
        world_size=args.world_size,
        steps=args.steps,
        param_groups=args.param_groups,
        allow_fp16_on_cpu=args.allow_fp16_on_cpu,
        client_optimizer=args.client_optimizer,
        zero_init=None if args.zero_init is None else args.zero_init == "yes",
    )
    print(_summarize(results))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
