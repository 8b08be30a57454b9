"""The built-in training target (`planner.train`) on a tiny random Qwen2, on the CPU.

Each training test writes a plan folder by hand (plan.json, training_args.json, ds_config.json,
as `memplan tune` writes them), runs ``torchrun --nproc_per_node 2 -m planner.train`` with
``DS_ACCELERATOR=cpu`` over gloo, and checks the exit code, that the logged loss went down and
the ``memplan-train:`` line. The model and its tokenizer are built offline: a byte-level BPE
tokenizer trained on the test's own sentences, a ChatML-like template, and Qwen2 with hidden
size 64.
"""

from __future__ import annotations

import ast
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from planner.workload.inventory import Workload
from planner.workload.options import Engine, LoraOptions, Precision, TrainingOptions, ZeroStage

pytestmark = pytest.mark.judge

REPO = Path(__file__).resolve().parents[2]
COLORS = ["red", "green", "blue", "yellow", "black", "white", "purple", "orange", "pink", "brown"]
THINGS = ["apple", "leaf", "sky", "sun", "night", "snow", "grape", "carrot", "rose", "bear"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB = 400
SEQ_LEN = 64
MICRO_BATCH = 2
WORLD = 2
LEARNING_RATE = 1e-3  # a random model learns the answers' words within 4 steps at this rate
TRAIN_TIMEOUT_S = 300  # the first DeepSpeed run on a machine builds its CPU Adam op (~1 min)


def _samples() -> list[dict]:
    out = []
    for i in range(20):
        thing, color = THINGS[i % 10], COLORS[i % 10]
        turns = [{"role": "user", "content": f"what color is the {thing} ?"},
                 {"role": "assistant", "content": f"the {thing} is {color} ."}]
        if i % 4 == 3:  # ShareGPT-style keys and a second exchange
            turns = [{"from": "human", "value": turns[0]["content"]}, {"from": "gpt", "value": turns[1]["content"]},
                     {"from": "human", "value": "and the sky ?"}, {"from": "gpt", "value": "the sky is blue ."}]
        out.append({"id": f"s{i}", "conversations": turns})
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A folder with a tiny Qwen2 (random weights), its tokenizer and 20 samples in data.jsonl."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    root = tmp_path_factory.mktemp("tiny")
    folder = root / "tiny-qwen2"
    samples = _samples()
    words = [t.get("content", t.get("value")) for s in samples for t in s["conversations"]] + ["user assistant system"]
    # Byte-level BPE, as Qwen2's: transformers 5 loads any tokenizer of a qwen2 model as Qwen2Tokenizer,
    # which keeps the vocabulary and merges but rebuilds the byte-level pipeline around them.
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(words, trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIAL_TOKENS,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=128,
                         tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    Qwen2ForCausalLM(config).save_pretrained(folder)
    (root / "data.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    return folder


def write_plan(folder: Path, model: Path, options: TrainingOptions, legacy_names: bool = False) -> Path:
    """A plan folder for ``model`` as `memplan tune` writes one: explicit values everywhere.

    ``legacy_names``: training_args.json with transformers 4's names (``gradient_checkpointing``,
    ``warmup_ratio``) instead of transformers 5's (``activation_checkpointing``, ``warmup_steps``
    below 1 as a ratio)."""
    from planner.plan import ClusterRef, ModelRef, Plan, TrainerSettings, group_plans, lora_modules
    from planner.profile.hf_config import model_from_config
    from planner.search.space import Constraints, Request

    spec = model_from_config(model)
    gib = 1 << 30
    plan = Plan(
        model=ModelRef(name=model.name, path=str(model), hidden_size=64, model_type="qwen2"),
        cluster=ClusterRef(gpus=f"{WORLD}xcpu", gpu="cpu", nodes=1, gpus_per_node=WORLD, gpu_memory_bytes=gib,
                           host_ram_bytes=gib),
        options=options,
        workload=Workload(micro_batch=MICRO_BATCH, grad_accum=1, seq_len=SEQ_LEN),
        groups=group_plans(spec, options),
        lora_modules=lora_modules(spec, options),
        global_batch=MICRO_BATCH * WORLD,
        zero={},
        trainer=TrainerSettings(data_path=str(model.parent / "data.jsonl"), output_dir=str(folder / "out"),
                                learning_rate=LEARNING_RATE),
        request=Request(seq_len=SEQ_LEN),
        constraints=Constraints(),
        per_gpu_bytes=1,
        host_bytes=1,
        gpu_peak_phase="backward",
        host_peak_phase="load",
        step_seconds={},
        tokens_per_s=1.0,
        candidate="test",
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "plan.json").write_text(json.dumps(plan.to_json(), indent=1))
    ds = options.engine is Engine.DEEPSPEED
    args = {
        "output_dir": str(folder / "out"), "per_device_train_batch_size": MICRO_BATCH,
        "gradient_accumulation_steps": 1, "learning_rate": LEARNING_RATE, "num_train_epochs": 1.0, "max_steps": -1,
        "bf16": False, "fp16": False, "activation_checkpointing": options.grad_ckpt,
        "activation_checkpointing_kwargs": {"use_reentrant": False}, "optim": "adamw_torch",
        "lr_scheduler_type": "constant", "warmup_steps": 0.0, "weight_decay": 0.0, "max_grad_norm": 1.0,
        "logging_steps": 1, "save_strategy": "no", "save_steps": 500, "save_total_limit": 1, "seed": 42,
        "report_to": "none", "remove_unused_columns": False,
    }
    if legacy_names:
        for old, new in (("activation_checkpointing", "gradient_checkpointing"),
                         ("activation_checkpointing_kwargs", "gradient_checkpointing_kwargs"),
                         ("warmup_steps", "warmup_ratio")):
            args[new] = args.pop(old)
        args["warmup_ratio"] = 0.1  # the constant schedule ignores it; HF must accept it
    if ds:
        args["deepspeed"] = "ds_config.json"
        zero = {"stage": int(options.zero), "overlap_comm": False, "contiguous_gradients": True,
                "reduce_bucket_size": 64 * 64}
        if options.zero is ZeroStage.PARAMETERS:
            zero.update(stage3_prefetch_bucket_size=int(0.9 * 64 * 64), stage3_param_persistence_threshold=640,
                        stage3_gather_16bit_weights_on_model_save=True)
        (folder / "ds_config.json").write_text(json.dumps({
            "train_micro_batch_size_per_gpu": MICRO_BATCH, "gradient_accumulation_steps": 1,
            "train_batch_size": MICRO_BATCH * WORLD, "bf16": {"enabled": False}, "fp16": {"enabled": False},
            "zero_optimization": zero, "gradient_clipping": 1.0, "steps_per_print": 10,
            "optimizer": {"type": "AdamW", "params": {"lr": LEARNING_RATE, "betas": [0.9, 0.999], "eps": 1e-8,
                                                      "weight_decay": 0.0}},
        }, indent=1))
    (folder / "training_args.json").write_text(json.dumps(args, indent=1))
    return folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def torchrun(plan_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node 2 -m planner.train PLAN_DIR ...`` on the CPU; once more on a
    new port if another process took the free port first."""
    for _ in range(2):
        port = _free_port()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--master_addr",
               "127.0.0.1", "--master_port", str(port), "-m", "planner.train", str(plan_dir), *extra]
        try:
            run = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=TRAIN_TIMEOUT_S)
        finally:
            # DeepSpeed's CPU shared-memory allreduce can leave segments named after the port (tests/ds_harness.py)
            for seg in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_127.0.0.1_{port}_*"):
                seg.unlink(missing_ok=True)
        if run.returncode == 0 or "EADDRINUSE" not in run.stderr and "address already in use" not in run.stderr:
            return run
    return run


def _losses(stdout: str) -> list[float]:
    """The ``loss`` of every step HF Trainer logged (its ``{'loss': ...}`` lines)."""
    out = []
    for line in stdout.splitlines():
        start = line.find("{'loss'")
        if start >= 0:
            out.append(float(ast.literal_eval(line[start:line.rindex("}") + 1])["loss"]))
    return out


def _report(stdout: str) -> dict[str, float]:
    lines = [ln for ln in stdout.splitlines() if ln.startswith("memplan-train: ")]
    assert len(lines) == 1, stdout[-3000:]
    return {k: float(v) for k, v in re.findall(r"(\w+)=(\S+)", lines[0])}


def _trains(plan_dir: Path, tiny: Path, steps: int = 4) -> dict[str, float]:
    from planner.plan import Plan
    from planner.train.params import load_inventory

    run = torchrun(plan_dir, "--data", str(tiny.parent / "data.jsonl"), "--max-steps", str(steps))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    inv = load_inventory(tiny.name, str(tiny), Plan.read(plan_dir / "plan.json").options)
    trained = [p for p in inv.params if p.trainable]
    # the run's tensors were checked against the inventory, and it trains what the plan counts
    assert f"training {len(trained)} of {len(inv.params)} tensors, {sum(p.numel for p in trained):,} " \
           "parameters, as the plan counts" in run.stderr
    losses = _losses(run.stdout)
    assert len(losses) == steps, run.stdout[-3000:]
    assert losses[-1] < losses[0], losses
    report = _report(run.stdout)
    assert report["steps"] == steps
    assert report["final_loss"] == pytest.approx(losses[-1], rel=1e-3)
    assert report["peak_gpu_bytes"] == 0  # no CUDA
    assert report["peak_host_rss_bytes"] > 100 * 2**20  # torch + transformers alone are more
    assert "memplan train: warning" not in run.stderr  # e.g. ZeRO-3 without zero.Init
    return report


@pytest.mark.slow
def test_deepspeed_zero2_full(tmp_path, tiny):
    """HF Trainer + DeepSpeed ZeRO-2 on two CPU ranks, everything trained."""
    plan = write_plan(tmp_path / "plan", tiny, TrainingOptions(engine=Engine.DEEPSPEED, zero=ZeroStage.GRADIENTS,
                                                               precision=Precision.FP32))
    _trains(plan, tiny)


@pytest.mark.slow
def test_deepspeed_zero3_zero_init_frozen_embeddings(tmp_path, tiny):
    """ZeRO-3: the model is built under zero.Init (partitioned names and shapes still match the
    plan), a frozen part, gradient checkpointing; transformers 4's key names in training_args.json."""
    options = TrainingOptions(engine=Engine.DEEPSPEED, zero=ZeroStage.PARAMETERS, precision=Precision.FP32,
                              freeze=("llm.embed_tokens",), grad_ckpt=True)
    plan = write_plan(tmp_path / "plan", tiny, options, legacy_names=True)
    _trains(plan, tiny)


@pytest.mark.slow
def test_torch_ddp_partial(tmp_path, tiny):
    """Plain PyTorch (DDP over gloo): only the decoder layers train."""
    options = TrainingOptions(engine=Engine.TORCH, precision=Precision.FP32, train=("llm.layers",))
    plan = write_plan(tmp_path / "plan", tiny, options)
    _trains(plan, tiny)


@pytest.mark.slow
def test_lora_with_trained_copy(tmp_path, tiny):
    """LoRA under DeepSpeed ZeRO-2 with checkpointing; the embeddings train as peft's copy."""
    options = TrainingOptions(engine=Engine.DEEPSPEED, zero=ZeroStage.GRADIENTS, precision=Precision.FP32,
                              lora=LoraOptions(rank=4, targets=("q_proj", "v_proj")), train=("llm.embed_tokens",),
                              grad_ckpt=True)
    plan = write_plan(tmp_path / "plan", tiny, options)
    _trains(plan, tiny)


# ---- no training: data, names, user errors -------------------------------------------------


def test_labels_only_on_assistant_turns(tiny):
    from transformers import AutoTokenizer

    from planner.train.data import IGNORE_INDEX, Sample, encode

    tok = AutoTokenizer.from_pretrained(tiny)
    turns = ({"role": "user", "content": "what color is the sky ?"},
             {"role": "assistant", "content": "the sky is blue ."},
             {"role": "user", "content": "and the sun ?"},
             {"role": "assistant", "content": "the sun is yellow ."})
    enc = encode(tok, Sample("x", turns), max_len=100)
    assert enc["input_ids"] == tok.apply_chat_template(list(turns), tokenize=True)["input_ids"]
    trained = tok.decode([t if lab != IGNORE_INDEX else tok.pad_token_id
                          for t, lab in zip(enc["input_ids"], enc["labels"], strict=True)], skip_special_tokens=False)
    # each answer with its end-of-turn token and newline; no prompt, no "<|im_start|>assistant" header
    assert trained.replace("<|endoftext|>", "") == "the sky is blue .<|im_end|>\nthe sun is yellow .<|im_end|>\n"
    short = encode(tok, Sample("x", turns), max_len=7)
    assert len(short["input_ids"]) == len(short["labels"]) == 7


def test_plain_format_without_template(tiny):
    from transformers import AutoTokenizer

    from planner.train.data import IGNORE_INDEX, Sample, encode

    tok = AutoTokenizer.from_pretrained(tiny)
    tok.chat_template = None
    enc = encode(tok, Sample("x", ({"role": "user", "content": "sky ?"}, {"role": "assistant", "content": "blue"})), 50)
    assert tok.decode(enc["input_ids"]) == "user: sky ?\nassistant: blue<|im_end|>\n"
    trained = [t for t, lab in zip(enc["input_ids"], enc["labels"], strict=True) if lab != IGNORE_INDEX]
    assert tok.decode(trained) == "blue<|im_end|>\n"


@pytest.mark.parametrize("text, error", [
    (None, "does not exist"),
    ("", "no samples"),
    ('{"id": 1, "conversations": []}\n', "has no \"conversations\" list"),
    ('{"conversations": [{"role": "user", "content": "hi"}]}\n{"x": 1', "line 2 is not valid JSON"),
    ('[{"id": "a", "conversations": [{"role": "user", "content": "hi"}]}]', "'a' has no assistant turn"),
    ('[{"conversations": [{"role": "robot", "content": "hi"}]}]', "each turn needs a role"),
])
def test_data_errors(tmp_path, text, error):
    from planner.train.data import DataError, load_samples

    path = tmp_path / "d.jsonl"
    if text is not None:
        path.write_text(text)
    with pytest.raises(DataError, match=re.escape(error)):
        load_samples(path)


def _config(folder: Path, **changes):
    """The folder's config with some fields changed (``layer_types`` derived again)."""
    from transformers import AutoConfig

    raw = {k: v for k, v in json.loads((folder / "config.json").read_text()).items() if k != "layer_types"}
    return AutoConfig.for_model(**{**raw, **changes})


def _meta_model(folder: Path, **changes):
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(_config(folder, **changes))


def test_model_with_a_tensor_the_plan_lacks_is_refused(tiny):
    from planner.train.params import PlanMismatch, check, load_inventory

    inv = load_inventory("tiny-qwen2", str(tiny), TrainingOptions())
    check(_meta_model(tiny), inv, "base")
    with pytest.raises(PlanMismatch, match=r"tensor\(s\) the plan does not count: model\.layers\.2\."):
        check(_meta_model(tiny, num_hidden_layers=3), inv, "base")
    with pytest.raises(PlanMismatch, match=r"shape\(s\), e\.g\. lm_head\.weight: model \[500, 64\]"):
        check(_meta_model(tiny, vocab_size=500), inv, "base")


def test_freezing_follows_the_inventory(tiny):
    from planner.train.params import PlanMismatch, check, freeze, load_inventory

    inv = load_inventory("tiny-qwen2", str(tiny), TrainingOptions(train=("llm.layers",)))
    model = _meta_model(tiny)
    with pytest.raises(PlanMismatch, match=r"would train \d+ tensor\(s\) the plan freezes"):
        check(model, inv, "trained")  # nothing frozen yet: embeddings and the final norm still train
    freeze(model, inv)
    check(model, inv, "trained")
    assert all(p.requires_grad == (".layers." in n) for n, p in model.named_parameters())


def test_lora_fields(tiny):
    from planner.train.params import PlanMismatch, load_inventory, lora_settings

    lora = LoraOptions(rank=4, targets=("q_proj",))
    model = _meta_model(tiny)
    inv = load_inventory("tiny-qwen2", str(tiny), TrainingOptions(lora=lora, train=("llm.norm", "llm.embed_tokens")))
    assert lora_settings(model, inv) == {
        "target_modules": ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"],
        "modules_to_save": ["model.embed_tokens", "model.norm"],
    }
    inv = load_inventory("tiny-qwen2", str(tiny), TrainingOptions(lora=lora, train=("llm.layers",)))
    with pytest.raises(PlanMismatch, match="also gets LoRA adapters"):
        lora_settings(model, inv)


def test_lora_dropout_reaches_peft(tmp_path, tiny):
    """The built-in target gives peft the dropout the plan was estimated with."""
    from planner.plan import Plan
    from planner.train.params import load_inventory
    from planner.train.run import _wrap

    options = TrainingOptions(lora=LoraOptions(rank=4, targets=("q_proj",), dropout=0.1))
    plan = Plan.read(write_plan(tmp_path / "plan", tiny, options) / "plan.json")
    inv = load_inventory("tiny-qwen2", str(tiny), options)
    wrapped = _wrap(_meta_model(tiny), plan, inv, grad_ckpt=False)
    assert wrapped.peft_config["default"].lora_dropout == 0.1
    assert wrapped.base_model.model.model.layers[0].self_attn.q_proj.lora_dropout["default"].p == 0.1


def test_multi_group_profile_names_are_module_attributes():
    from planner.train.params import load_inventory

    inv = load_inventory("minicpm-o-2.6", "unused", TrainingOptions(without=("apm", "tts", "audio_projection_layer")))
    names = {inv.name(p) for p in inv.params}
    assert "llm.model.embed_tokens.weight" in names and "vpm.embeddings.patch_embedding.weight" in names
    assert "resampler.query" in names and inv.multimodal


def _main(*argv: str) -> tuple[int, str]:
    import contextlib
    import io

    from planner.train.run import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, err.getvalue()


def test_user_errors_are_one_line(tmp_path, tiny):
    plan = write_plan(tmp_path / "plan", tiny, TrainingOptions(engine=Engine.TORCH, precision=Precision.FP32))
    data = str(tiny.parent / "data.jsonl")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "plan.json").write_text("{")
    images = tmp_path / "images.json"
    images.write_text(json.dumps([{"id": "pic", "image": "a.jpg", "conversations": _samples()[0]["conversations"]}]))
    cases = [
        ((str(tmp_path / "nowhere"),), "plan folder"),
        ((str(broken),), "plan.json: not valid JSON"),
        ((str(tmp_path),), "plan.json does not exist"),
        ((str(plan), "--data", str(tmp_path / "none.jsonl")), "none.jsonl does not exist"),
        ((str(plan), "--data", data, "--learning_rat", "1"), "unrecognized arguments: --learning_rat 1"),
        ((str(plan), "--data", data, "--learning_rate", "fast"), "invalid float value"),
        ((str(plan), "--data", str(images)), "sample 'pic' has an image: the model 'tiny-qwen2' has no vision tower"),
    ]
    for argv, message in cases:
        code, err = _main(*argv)
        assert code == 2, (argv, err)
        assert err.startswith("memplan train: error: ") and err.count("\n") == 1, err
        assert message in err, err


def test_wrong_model_stops_before_training(tmp_path, tiny):
    """The plan was made for the 2-layer model; --model points at a 3-layer one."""
    from transformers import AutoModelForCausalLM

    other = tmp_path / "other"
    AutoModelForCausalLM.from_config(_config(tiny, num_hidden_layers=3)).save_pretrained(other)
    for f in tiny.glob("tokenizer*"):
        (other / f.name).write_bytes(f.read_bytes())
    plan = write_plan(tmp_path / "plan", tiny, TrainingOptions(engine=Engine.TORCH, precision=Precision.FP32))
    run = subprocess.run([sys.executable, "-m", "planner.train", str(plan), "--model", str(other), "--data",
                          str(tiny.parent / "data.jsonl")], cwd=REPO, env=_env(), capture_output=True, text=True,
                         timeout=TRAIN_TIMEOUT_S)
    assert run.returncode == 2, run.stderr[-3000:]
    assert "memplan train: error: the model and the plan disagree: 12 tensor(s) the plan does not count: " \
           "model.layers.2." in run.stderr
