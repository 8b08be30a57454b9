"""Hostile and contradictory inputs: every one refused with one `memplan: error:` line and exit 2,
fast, with nothing written (the harness in tests/hostile.py), by `estimate` and, where it has the
option, `tune`; and the library's own checks behind them (bounds, contradictions, profiles that
take over shipped names).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from planner.errors import ProfileError
from planner.profile.architectures import MAX_LAYERS, check_config_bounds
from planner.profile.catalog import build_model, builtin_profiles_dir, load_catalog, load_file, toml_files
from planner.profile.hardware import MAX_GPUS_PER_NODE, MAX_WORLD_SIZE, Cluster, make_cluster
from planner.profile.hf_config import find_config
from planner.search.search import search
from planner.search.space import Constraints, Request, SearchSpace
from planner.units import GIB
from planner.workload.inventory import MAX_IMAGES_PER_SAMPLE, Workload, parse_selection, trainable_inventory, untrained
from planner.workload.options import Attention, Precision, TrainingOptions
from tests.hostile import assert_refused, run_cli

HOST = ["--host-ram", "64GiB"]
QWEN = ["--model", "qwen2.5-0.5b", "--gpus", "2x3090", *HOST]

RTX3090_TOML = """
[[gpus]]
name = "{name}"
aliases = {aliases}
full_name = "{full_name}"
architecture = "ampere"
compute_capability = "8.6"
memory_mib = {memory_mib}
bf16 = true
bf16_tflops = {bf16_tflops}
fp16_tflops = 71.0
fp32_tflops = 35.6
memory_bandwidth_gbps = 936.0
pcie_gen = 4
pcie_lanes = 16
nvlink_gbps = 0.0
source = "a test"
{extra}
"""


def gpu_toml(name: str = "my3090", aliases: tuple[str, ...] = (), full_name: str = "My Card", memory_mib: int = 48000,
             bf16_tflops: str = "71.0", extra: str = "") -> str:
    return RTX3090_TOML.format(name=name, aliases=json.dumps(list(aliases)), full_name=full_name,
                               memory_mib=memory_mib, bf16_tflops=bf16_tflops, extra=extra)


def qwen_toml(**changes: str) -> str:
    """The shipped qwen2.5-0.5b entry alone, with lines replaced (``{"old line": "new line"}``)."""
    text = (builtin_profiles_dir() / "models" / "qwen2.5.toml").read_text()
    first = text[text.index("[[models]]"): text.index("[[models]]", text.index("[[models]]") + 1)]
    for old, new in changes.items():
        assert old in first, old
        first = first.replace(old, new)
    return first


def write(folder: Path, name: str, content: str | bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def config_json(folder: Path, **changes: object) -> Path:
    """A Qwen2 config.json (qwen2.5-0.5b's sizes) with fields changed."""
    cfg = {"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
           "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2, "tie_word_embeddings": True}
    cfg.update(changes)
    return write(folder, "config.json", json.dumps(cfg))


# --- estimate and tune through the CLI ------------------------------------------------------------
# Each case: (arguments common to both commands, a regex the error line must match). A case that
# needs files gets them from a setup function called with the sandbox folder.

def _non_utf8_profiles(root: Path) -> list[str]:
    write(root / "profs", "latin1.toml", '[[gpus]]\nname = "caf\xe9"\n'.encode("latin-1"))
    return ["--profiles-dir", "profs"]


def _utf16_profiles(root: Path) -> list[str]:
    write(root / "profs", "wide.toml", gpu_toml().encode("utf-16"))
    return ["--profiles-dir", "profs"]


def _deep_config(root: Path) -> list[str]:
    config_json(root / "deep", num_hidden_layers=200_000)
    return ["--model", "deep/config.json", "--gpus", "2x3090"]


def _wide_vocab_config(root: Path) -> list[str]:
    config_json(root / "wide", vocab_size=10**12)
    return ["--model", "wide", "--gpus", "2x3090"]


def _float_layers_config(root: Path) -> list[str]:
    config_json(root / "flt", num_hidden_layers=24.5)
    return ["--model", "flt", "--gpus", "2x3090"]


def _deep_profile(root: Path) -> list[str]:
    write(root / "profs", "deep.toml", qwen_toml(**{
        'name = "qwen2.5-0.5b"': 'name = "deep-qwen"', 'aliases = ["qwen2.5-0.5b-instruct"]': "aliases = []",
        'hf_id = "Qwen/Qwen2.5-0.5B-Instruct"\n': "", "num_hidden_layers = 24": "num_hidden_layers = 200000"}))
    return ["--profiles-dir", "profs", "--model", "deep-qwen", "--gpus", "2x3090"]


def _alias_takeover(root: Path) -> list[str]:
    write(root / "profs", "mine.toml", gpu_toml(aliases=("3090",)))
    return ["--profiles-dir", "profs", "--model", "qwen2.5-0.5b", "--gpus", "2x3090"]


def _name_takeover(root: Path) -> list[str]:
    write(root / "profs", "mine.toml", gpu_toml(name="rtx3090"))
    return ["--profiles-dir", "profs", "--model", "qwen2.5-0.5b", "--gpus", "2x3090"]


def _full_name_takeover(root: Path) -> list[str]:
    write(root / "profs", "mine.toml", gpu_toml(full_name="NVIDIA GeForce RTX 3090"))
    return ["--profiles-dir", "profs", "--model", "qwen2.5-0.5b", "--gpus", "2x3090"]


def _model_hub_id_takeover(root: Path) -> list[str]:
    write(root / "profs", "mine.toml", qwen_toml(**{'name = "qwen2.5-0.5b"': 'name = "my-qwen"',
                                                   'aliases = ["qwen2.5-0.5b-instruct"]': "aliases = []"}))
    return ["--profiles-dir", "profs", "--model", "Qwen/Qwen2.5-0.5B-Instruct", "--gpus", "2x3090"]


def _replaces_nothing(root: Path) -> list[str]:
    write(root / "profs", "mine.toml", gpu_toml(extra='replaces = "rtx9090"'))
    return ["--profiles-dir", "profs", "--model", "qwen2.5-0.5b", "--gpus", "2x3090"]


def _infinite_tflops(root: Path) -> list[str]:
    write(root / "profs", "inf.toml", gpu_toml(bf16_tflops="inf"))
    return ["--profiles-dir", "profs", "--model", "qwen2.5-0.5b", "--gpus", "2xmy3090"]


def _nul_profiles_dir(root: Path) -> list[str]:
    return ["--profiles-dir", "pro\0fs", "--model", "qwen2.5-0.5b", "--gpus", "2x3090"]


BOTH = [
    # (id, args or setup, match[, marks])
    ("host-ram-0", ["--host-ram", "0", "--model", "qwen2.5-0.5b", "--gpus", "2x3090"], r"host-ram"),
    ("model-unknown-user", ["--model", "~nosuchuser_memplan/m", "--gpus", "2x3090"], r"home folder"),
    ("model-nul", ["--model", "mo\0del", "--gpus", "2x3090"], r"NUL"),
    ("model-name-too-long", ["--model", "m" * 5000, "--gpus", "2x3090"], r"cannot look there|unknown model"),
    ("profiles-not-utf8", _non_utf8_profiles, r"not UTF-8 .*byte 0xe9"),
    ("profiles-utf16", _utf16_profiles, r"not UTF-8"),
    ("profiles-dir-nul", _nul_profiles_dir, r"NUL"),
    ("audio-inf", ["--model", "minicpm-o-2.6", "--gpus", "2x3090", "--audio-seconds", "inf"], r"finite"),
    ("audio-nan", ["--model", "minicpm-o-2.6", "--gpus", "2x3090", "--audio-seconds", "nan"], r"finite|number"),
    ("audio-day", ["--model", "minicpm-o-2.6", "--gpus", "2x3090", "--audio-seconds", "86400", "--seq-len",
                   "10000000"], r"--audio-seconds 86400.*3,600"),
    ("images-billion", ["--gpus", "2x3090", "--images", "1000000000"],
     rf"--images 1000000000.*{MAX_IMAGES_PER_SAMPLE:,}"),
    ("image-crops", ["--model", "minicpm-v-2.6", "--gpus", "2x3090", "--images", "1000", "--seq-len", "1000000",
                     "--max-slice-nums", "9"], r"vision crops per micro-step.*4,096"),
    ("config-200k-layers", _deep_config, r"num_hidden_layers = 200000.*1,024 layers"),
    ("config-huge-vocab", _wide_vocab_config, r"vocab_size = 1000000000000"),
    ("config-float-layers", _float_layers_config, r"num_hidden_layers = 24.5: must be a whole number"),
    ("profile-200k-layers", _deep_profile, r"deep-qwen.*num_hidden_layers = 200000"),
    ("gpus-million-per-node", ["--model", "qwen2.5-0.5b", "--gpus", "1000000x3090"],
     rf"1000000 GPUs per node.*1 to {MAX_GPUS_PER_NODE}"),
    ("gpus-1e20", ["--model", "qwen2.5-0.5b", "--gpus", "100000000000000000000x3090"], r"over a billion"),
    ("gpus-5000-digits", ["--model", "qwen2.5-0.5b", "--gpus", "9" * 5000 + "x3090"], r"over a billion"),
    ("gpus-world", ["--model", "qwen2.5-0.5b", "--gpus", "1024x32x3090"], rf"32,768 GPUs in all.*{MAX_WORLD_SIZE:,}"),
    ("nodes-zero", ["--model", "qwen2.5-0.5b", "--gpus", "0x8x3090"], r"at least 1|1 to"),
    ("train-and-freeze", [*QWEN, "--train", "llm", "--freeze", "llm"], r"--train llm and --freeze llm.*both trained"),
    ("train-part-frozen-group", [*QWEN, "--train", "llm.embed_tokens", "--freeze", "llm"],
     r"--train llm.embed_tokens and --freeze llm"),
    ("train-without", [*QWEN, "--train", "llm", "--without", "llm"], r"--without llm.*not built"),
    ("nothing-trained", [*QWEN, "--freeze", "llm"], r"nothing is trained: --freeze llm"),
    ("nothing-built", [*QWEN, "--without", "llm"], r"nothing is trained"),
    ("nothing-trained-parts", [*QWEN, "--freeze", "llm.embed_tokens,llm.layers,llm.norm"], r"nothing is trained"),
    ("bf16-on-turing", ["--model", "qwen2.5-0.5b", "--gpus", "2x2080ti", "--precision", "amp-bf16"],
     r"amp-bf16.*RTX 2080 Ti has no bf16"),
    ("pure-bf16-on-volta", ["--model", "qwen2.5-0.5b", "--gpus", "2xv100-32gb", "--precision", "pure-bf16"],
     r"pure-bf16.*V100.*no bf16"),
    ("images-over-context", ["--gpus", "2x3090", "--images", "20", "--seq-len", "64", "--max-slice-nums", "1"],
     r"--images 20 take 20 x 66 = 1,320 LLM tokens, more than --seq-len 64"),
    ("audio-over-context", ["--model", "minicpm-o-2.6", "--gpus", "2x3090", "--images", "0", "--audio-seconds", "100",
                            "--seq-len", "64"], r"--audio-seconds 100 takes 2,700 LLM tokens, more than --seq-len 64"),
    ("audio-without-encoder", [*QWEN, "--audio-seconds", "30"], r"no audio encoder"),
    ("audio-too-short", ["--model", "minicpm-o-2.6", "--gpus", "2x3090", "--audio-seconds", "0.02"],
     r"--audio-seconds 0.02: too short for MiniCPM-o"),
    ("seq-len-1", [*QWEN, "--seq-len", "1"], r"--seq-len"),  # was an internal error (exit 70)
    ("lora-rank-huge", [*QWEN, "--lora-rank", "1" + "0" * 400], r"--lora-rank 1000.*ranks up to 65,536"),
    ("lora-dropout-one", [*QWEN, "--lora-rank", "8", "--lora-dropout", "1"], r"--lora-dropout.*1.0 is not in.*0<=x<1"),
    ("lora-dropout-negative", [*QWEN, "--lora-rank", "8", "--lora-dropout", "-0.01"], r"--lora-dropout.*0<=x<1"),
    ("gpu-alias-takeover", _alias_takeover, r"'3090' is taken by 'rtx3090'.*replaces = 'rtx3090'"),
    ("gpu-name-takeover", _name_takeover, r"'rtx3090' is taken by 'rtx3090'"),
    ("gpu-full-name-takeover", _full_name_takeover, r"'NVIDIA GeForce RTX 3090' is taken by 'rtx3090'"),
    ("model-hub-id-takeover", _model_hub_id_takeover, r"'Qwen/Qwen2.5-0.5B-Instruct' is taken by 'qwen2.5-0.5b'"),
    ("replaces-nothing", _replaces_nothing, r"replaces = 'rtx9090', but no GPU profile"),
    ("profile-infinite-tflops", _infinite_tflops, r"bf16_tflops.*finite"),
]

ESTIMATE_ONLY = [
    ("fa2-fp32", [*QWEN, "--attn", "flash_attention_2", "--precision", "fp32"], r"flash_attention_2.*fp16 or bf16"),
    ("fa2-turing", ["--model", "qwen2.5-0.5b", "--gpus", "2x2080ti", *HOST, "--attn", "flash_attention_2",
                    "--precision", "amp-fp16"], r"flash_attention_2 needs an Ampere.*7\.5"),
    ("explicit-bf16-on-turing", ["--model", "qwen2.5-0.5b", "--gpus", "2x2080ti", *HOST, "--precision",
                                 "amp-bf16"], r"no bf16"),
    ("micro-batch-crops", ["--model", "minicpm-v-2.6", "--gpus", "2x3090", *HOST, "--micro-batch", "1000",
                           "--max-slice-nums", "9"], r"--micro-batch 1000 x --images 1 x 10 crops"),
]

TUNE_ONLY = [
    ("must-train-vs-lora", [*QWEN, "--must-train", "llm", "--lora-rank", "8"],
     r"--must-train llm and --lora-rank 8: LoRA freezes llm"),
    ("must-train-frozen", ["--model", "minicpm-v-2.6", "--gpus", "2x3090", *HOST, "--freeze", "vpm", "--must-train",
                           "vpm"], r"--must-train vpm: the request does not train it"),
    ("global-batch-huge", [*QWEN, "--global-batch", "1000000"], r"global_batch.*65536"),
]


def _params(cases: list[tuple]) -> list:
    return [pytest.param(c[1], c[2], id=c[0], marks=c[3:]) for c in cases]


def _args(case: object, root: Path) -> list[str]:
    args = case(root) if callable(case) else list(case)
    return args if "--host-ram" in args else [*args, *HOST]


@pytest.mark.parametrize(("case", "match"), _params(BOTH + ESTIMATE_ONLY))
def test_estimate_refuses(tmp_path: Path, case: object, match: str) -> None:
    assert_refused(["estimate", *_args(case, tmp_path)], cwd=tmp_path, match=match, seconds=20)


@pytest.mark.parametrize(("case", "match"), _params(BOTH + TUNE_ONLY))
def test_tune_refuses_and_writes_nothing(tmp_path: Path, case: object, match: str) -> None:
    plan = tmp_path / "plan"
    assert_refused(["tune", *_args(case, tmp_path), "--out", str(plan)], cwd=tmp_path, match=match, plan_dir=plan,
                   seconds=30)
    assert not plan.exists()


def test_profiles_env_takeover_is_refused(tmp_path: Path) -> None:
    _alias_takeover(tmp_path)
    env = {"MEMPLAN_PROFILES": str(tmp_path / "profs")}
    assert_refused(["estimate", *QWEN], cwd=tmp_path, match=r"'3090' is taken by 'rtx3090'", env=env)
    assert_refused(["profiles"], cwd=tmp_path, match=r"'3090' is taken by 'rtx3090'", env=env)


def test_profiles_validate_refuses_bad_files(tmp_path: Path) -> None:
    write(tmp_path, "latin1.toml", b'[[gpus]]\nname = "caf\xe9"\n')
    assert_refused(["profiles", "validate", "latin1.toml"], cwd=tmp_path, match=r"not UTF-8")
    write(tmp_path, "cc.toml", gpu_toml().replace('"8.6"', '"sm86"'))
    assert_refused(["profiles", "validate", "cc.toml"], cwd=tmp_path, match=r"compute_capability")


def test_replacing_a_shipped_gpu_when_asked(tmp_path: Path) -> None:
    """``replaces`` lets a profile take a shipped name over; the estimate then uses it (48000 MiB),
    and the catalog says so for the CLI to show."""
    mine = gpu_toml(name="rtx3090", aliases=("3090",), extra='replaces = "rtx3090"')
    path = write(tmp_path / "profs", "mine.toml", mine)
    out = run_cli(["estimate", *QWEN, "--profiles-dir", "profs", "--json"], cwd=tmp_path)
    assert out.exit_code == 0, out.stderr
    assert json.loads(out.stdout)["per_gpu"]["capacity_bytes"] == 48000 * 2**20
    catalog = load_catalog([tmp_path / "profs"])
    assert catalog.gpu("3090").memory_mib == 48000
    with pytest.raises(ProfileError, match="unknown GPU"):  # the shipped entry's names went with it
        catalog.gpu("NVIDIA GeForce RTX 3090")
    (note,) = catalog.notes
    assert f"GPU profile 'rtx3090' in {path} replaces the shipped 'rtx3090'" in note


# --- the library's own checks -----------------------------------------------------------------------

def test_cluster_refuses_what_no_plan_is_made_for(catalog) -> None:
    gpu = catalog.gpu("3090")
    for kwargs, match in (
        (dict(host_ram_bytes=0), r"--host-ram is 0 bytes"),
        (dict(host_ram_bytes=-GIB), r"--host-ram"),
        (dict(gpu_memory_bytes=0), r"memory of rtx3090"),
        (dict(nodes=0), r"0 nodes"),
        (dict(gpus_per_node=MAX_GPUS_PER_NODE + 1), r"GPUs per node"),
        (dict(nodes=MAX_WORLD_SIZE // 8 + 1, gpus_per_node=8), r"1 to 2,048 nodes"),
        (dict(nodes=1024, gpus_per_node=64), r"65,536 GPUs in all"),
    ):
        base = dict(gpu=gpu, nodes=1, gpus_per_node=2, gpu_memory_bytes=gpu.memory_bytes, host_ram_bytes=64 * GIB)
        with pytest.raises(ProfileError, match=match):
            Cluster(**{**base, **kwargs})
    assert make_cluster("2x8x3090", catalog, 64 * GIB).world_size == 16


def test_config_bounds() -> None:
    check_config_bounds({"num_hidden_layers": MAX_LAYERS, "text_config": {"hidden_size": 4096, "head_dim": None}})
    for cfg, match in (
        ({"num_hidden_layers": MAX_LAYERS + 1}, r"num_hidden_layers = 1025: more than the 1,024 layers"),
        ({"text_config": {"vocab_size": 0}}, r"text_config.vocab_size = 0: must be at least 1"),
        ({"vision_config": {"num_attention_heads": 10**6}}, r"vision_config.num_attention_heads"),
        ({"hidden_size": float("inf")}, r"whole number"),
        ({"num_local_experts": 10**5}, r"experts"),
    ):
        with pytest.raises(ProfileError, match=match):
            check_config_bounds(cfg)


def test_find_config_refuses_paths_that_cannot_exist(tmp_path: Path) -> None:
    for path, match in (("~nosuchuser_memplan/m", "home folder"), ("a\0b", "NUL"), ("x" * 5000, "cannot look")):
        with pytest.raises(ProfileError, match=match):
            find_config(path)
    assert find_config(tmp_path) is None
    assert find_config(config_json(tmp_path)) == tmp_path / "config.json"


def test_profile_files_are_utf8_and_bounded(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match=r"not UTF-8 text \(byte 0xe9 at offset 20\)"):
        load_file(write(tmp_path, "a.toml", b'[[gpus]]\nname = "caf\xe9"\n'))
    with pytest.raises(ProfileError, match="larger than 4 MiB"):
        load_file(write(tmp_path, "big.toml", b"# " + b"x" * (4 * 2**20)))
    with pytest.raises(ProfileError, match="NUL"):
        toml_files(Path("a\0b"))
    (tmp_path / "loop").mkdir()
    (tmp_path / "loop" / "again").symlink_to(tmp_path / "loop")  # a symlink loop is walked once
    assert toml_files(tmp_path / "loop") == []


def test_a_copy_of_a_shipped_file_changes_nothing(tmp_path: Path) -> None:
    """The same entries again (a copied file, a folder named twice) are no takeover and no note."""
    write(tmp_path, "copy.toml", (builtin_profiles_dir() / "models" / "qwen2.5.toml").read_text())
    catalog = load_catalog([tmp_path, tmp_path])
    assert catalog.notes == [] and catalog.has_model("qwen2.5-7b")


def test_replacing_a_shipped_model_drops_its_names(tmp_path: Path) -> None:
    write(tmp_path, "m.toml", qwen_toml(**{'name = "qwen2.5-0.5b"': 'name = "my-qwen"\nreplaces = "qwen2.5-0.5b"'}))
    catalog = load_catalog([tmp_path])
    assert catalog.model("qwen2.5-0.5b-instruct").name == "my-qwen"  # the alias moved with the entry
    assert "qwen2.5-0.5b" not in catalog.models
    assert build_model(catalog.model("my-qwen")).params == 494_032_768
    assert "replaces the shipped 'qwen2.5-0.5b'" in catalog.notes[0]


def test_workload_bounds() -> None:
    Workload(images=1, seq_len=66, max_slice_nums=1)  # exactly its image's 66 tokens: fits
    for kwargs, match in (
        (dict(images=1, seq_len=65, max_slice_nums=1), r"1 x 66 = 66 LLM tokens, more than --seq-len 65"),
        (dict(audio_seconds=float("nan")), r"audio_seconds"),
        (dict(audio_seconds=float("inf")), r"--audio-seconds inf: must be a finite number"),
        (dict(seq_len=2**30), r"--seq-len"),
        (dict(seq_len=1), r"--seq-len 1: a training step needs at least 2 tokens"),  # explain's files, the library
        (dict(audio_seconds=0.02), r"--audio-seconds 0.02: too short"),  # one Whisper position: no pooled output
        (dict(micro_batch=10**6), r"--micro-batch"),
        (dict(image_size=(10**6, 10)), r"--image-size"),
    ):
        with pytest.raises(ValueError, match=match):
            Workload(**kwargs)


def test_options_a_gpu_cannot_run(catalog) -> None:
    turing, ampere = catalog.gpu("2080ti"), catalog.gpu("3090")
    TrainingOptions(precision="amp-fp16").check_runs_on(turing)
    TrainingOptions(attn=Attention.FLASH_ATTENTION_2).check_runs_on(ampere)
    for options, gpu, match in (
        (TrainingOptions(precision=Precision.AMP_BF16), turing, "no bf16"),
        (TrainingOptions(precision="amp-fp16", attn=Attention.FLASH_ATTENTION_2), turing, "Ampere"),
        (TrainingOptions(precision="fp32", attn=Attention.FLASH_ATTENTION_2), ampere, "fp16 or bf16"),
    ):
        with pytest.raises(ProfileError, match=match):
            options.check_runs_on(gpu)


@pytest.fixture(scope="module")
def minicpm(catalog):
    return build_model(catalog.model("minicpm-o-2.6"))


@pytest.mark.parametrize("must", [("llm",), ("vpm",), ("llm.embed_tokens",), ("resampler", "llm.lm_head")])
def test_search_never_breaks_must_train(catalog, minicpm, must) -> None:
    """Tight host RAM makes the search relax (LoRA, frozen encoders): never on a must-train part."""
    cluster = make_cluster("2x3090", catalog, 32 * GIB)
    request = Request(images=1, max_slice_nums=1, without=("apm", "audio_projection_layer", "tts"))
    result = search(minicpm, cluster, request, Constraints(must_train=must), SearchSpace(), top=50)
    selection = parse_selection(must, minicpm, "--must-train")
    for c in result.candidates:
        assert untrained(trainable_inventory(minicpm, c.options), selection) == [], c.name


def test_search_names_its_precision_substitute(catalog) -> None:
    model = build_model(catalog.model("qwen2.5-0.5b"))
    result = search(model, make_cluster("2x2080ti", catalog, 64 * GIB), Request(), top=1)
    assert result.candidates and {c.options.precision for c in result.candidates} == {Precision.AMP_FP16}
    assert any("has no bf16: the search tries amp-fp16 instead of amp-bf16, pure-bf16" in n for n in result.notes)
    fa2 = SearchSpace(attn=(Attention.FLASH_ATTENTION_2,))
    result = search(model, make_cluster("2x2080ti", catalog, 64 * GIB), Request(), space=fa2, top=1)
    assert not result.candidates and any("not tried" in n and "flash_attention_2" in n for n in result.notes)


def test_search_refuses_what_it_cannot_honour(catalog) -> None:
    model = build_model(catalog.model("qwen2.5-0.5b"))
    cluster = make_cluster("2x2080ti", catalog, 64 * GIB)
    with pytest.raises(ProfileError, match="no bf16.*without --precision"):
        search(model, cluster, Request(precision=Precision.AMP_BF16))
    with pytest.raises(ProfileError, match="no vision tower"):
        search(model, cluster, Request(images=1))
    with pytest.raises(ProfileError, match="nothing is trained"):
        search(model, cluster, Request(freeze=("llm",)))


def test_default_precision_on_a_gpu_without_bf16_is_fp16_and_said(tmp_path):
    """The default amp-bf16 cannot run on Turing: estimate plans amp-fp16 and says so (an explicit
    --precision amp-bf16 is refused above)."""
    import json

    from tests.hostile import run_cli

    out = run_cli(["estimate", "--model", "qwen2.5-0.5b", "--gpus", "2x2080ti", *HOST, "--json"], tmp_path)
    assert out.exit_code == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["options"]["precision"] == "amp-fp16"
    assert any("has no bf16: planning amp-fp16" in n for n in doc["notes"])


def test_a_missing_config_path_is_named_as_such(tmp_path):
    from tests.hostile import assert_refused

    assert_refused(["estimate", "--model", str(tmp_path / "missing" / "config.json"), *HOST], tmp_path,
                   match=r"no such file or folder")


def test_memplan_alone_prints_its_help(tmp_path):
    from tests.hostile import run_cli

    out = run_cli([], tmp_path)
    assert out.exit_code == 0 and out.stdout.startswith("Usage: memplan") and "estimate" in out.stdout
    assert out.stderr == ""
