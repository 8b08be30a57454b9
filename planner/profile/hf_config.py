"""A model from a local Hugging Face ``config.json``: counted exactly by building the real
transformers class on the meta device (`hf_build`: no weights, no download, no internet), and
remembered in the user's cache (`cache`), so that the same config.json read again needs neither
torch nor transformers.

Part of the profile stage. Checks what can be checked without torch first: the file (bounded,
strict JSON), its sizes, that it is a causal LM (memplan plans causal-LM fine-tuning: an encoder
or an encoder-decoder is refused, never estimated as some other model), its nested configs, and
the files of a model that ships its own code.
"""

from __future__ import annotations

import hashlib
import json
import stat
from importlib import metadata
from pathlib import Path
from typing import Any

from planner.errors import ProfileError
from planner.profile import cache
from planner.profile.architectures import Part, TensorKind, TensorSpec, check_config_bounds
from planner.profile.catalog import Group, ModelSpec
from planner.profile.hf_groups import _part  # noqa: F401  (planner.judge.fit groups LLM tensors with it)
from planner.profile.remote_code import remote_code


def find_config(path: str | Path) -> Path | None:
    """``path`` itself if it is a file, ``path/config.json`` if it is a folder holding one, else None.

    Raises:
        ProfileError: ``path`` cannot name a file at all: a NUL byte in it, ``~user`` for a user
            who does not exist, a name the system refuses (too long), a folder it may not read.
    """
    shown = str(path)[:200]
    if "\0" in str(path):
        raise ProfileError(f"--model {shown!r}: a path cannot contain a NUL byte")
    try:
        p = Path(path).expanduser()
    except RuntimeError:  # "~nosuchuser/...": Path.expanduser cannot find that home folder
        raise ProfileError(f"--model {shown!r}: no such user's home folder for '~'") from None
    try:
        if p.is_file():
            return p
        if p.is_dir() and (p / "config.json").is_file():
            return p / "config.json"
    except OSError as exc:  # ENAMETOOLONG, EACCES...: is_file() re-raises all but 'not there'
        raise ProfileError(f"--model {shown!r}: cannot look there: {exc.strerror}") from None
    return None


MAX_CONFIG_BYTES = 4 * 2**20
"""A model's config.json is a few KiB (MiniCPM-o 2.6's, with its nested configs, 6 KiB); one over
4 MiB is not a config (bytes). The same bound holds for preprocessor_config.json."""

PROCESSOR_FILE = "preprocessor_config.json"
"""The image processor's settings beside config.json (Qwen2-VL's min_pixels and max_pixels...)."""

INVENTORY_VERSION = 2
"""The cached inventory's layout; raise it when `_spec_json` changes or grouping changes."""

ENCODER_ONLY_TYPES = frozenset({
    "albert", "bert", "big_bird", "camembert", "canine", "convbert", "data2vec-text", "deberta", "deberta-v2",
    "distilbert", "electra", "ernie", "esm", "flaubert", "fnet", "funnel", "ibert", "layoutlm", "layoutlmv2",
    "layoutlmv3", "lilt", "longformer", "luke", "markuplm", "megatron-bert", "mobilebert", "modernbert", "mpnet",
    "mra", "nezha", "nystromformer", "rembert", "roberta", "roberta-prelayernorm", "roc_bert", "roformer",
    "splinter", "squeezebert", "tapas", "xlm", "xlm-roberta", "xlm-roberta-xl", "xmod", "yoso",
})
"""Encoder-only model_types (transformers 5.25). Several have a ``*ForCausalLM`` class
(``BertLMHeadModel``), which makes them decoders only when ``is_decoder`` is set."""
ENCODER_DECODER_TYPES = frozenset({
    "bart", "bigbird_pegasus", "blenderbot", "blenderbot-small", "encoder-decoder", "fsmt", "led", "longt5",
    "m2m_100", "marian", "mbart", "mt5", "mvp", "nllb-moe", "pegasus", "pegasus_x", "plbart", "prophetnet",
    "seamless_m4t", "seamless_m4t_v2", "speech-encoder-decoder", "speech_to_text", "speecht5", "switch_transformers",
    "t5", "t5gemma", "umt5", "vision-encoder-decoder", "whisper", "xlm-prophetnet",
})
"""Encoder-decoder model_types (transformers 5.25); any config with ``is_encoder_decoder`` is one too."""
ENCODER_HEADS = ("ForMaskedLM", "ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering",
                 "ForMultipleChoice", "ForPreTraining", "ForNextSentencePrediction", "ForSeq2SeqLM")
"""Class name endings of heads that are not a causal LM's (``Qwen2ForSequenceClassification`` is a
reward model: no lm_head, a score head)."""
VLM_TYPES = frozenset({"llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "gemma3",
                       "idefics2", "idefics3", "smolvlm", "internvl", "paligemma", "mistral3", "aya_vision"})
"""Vision-language model_types whose config nests a ``vision_config`` (transformers fills in a
default tower when it is missing, which would be some other model's)."""
NESTED = ("text_config", "vision_config", "audio_config")


def _no_constant(name: str) -> float:
    raise json.JSONDecodeError(f"{name} is not strict JSON", name, 0)


def read_json(path: Path, what: str = "") -> tuple[bytes, dict[str, Any]]:
    """A JSON object file, bounded: (its bytes, its content).

    Raises:
        ProfileError: not a regular file, unreadable, over `MAX_CONFIG_BYTES`, not UTF-8 strict
            JSON, not an object.
    """
    try:
        if not stat.S_ISREG(path.stat().st_mode):
            raise ProfileError(f"{path}: not a regular file")
        with open(path, "rb") as fh:
            data = fh.read(MAX_CONFIG_BYTES + 1)
        if len(data) > MAX_CONFIG_BYTES:
            raise ProfileError(f"{path}: over {MAX_CONFIG_BYTES // 2**20} MiB, not a model's {what or path.name}")
        raw = json.loads(data.decode("utf-8"), parse_constant=_no_constant)
    except (OSError, UnicodeDecodeError, RecursionError) as exc:
        raise ProfileError(f"{path}: cannot read: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ProfileError(f"{path}: not valid JSON: {exc.msg} (line {exc.lineno})") from None
    if not isinstance(raw, dict):
        raise ProfileError(f"{path}: not a JSON object")
    return data, raw


def check_causal(raw: dict[str, Any], where: str) -> None:
    """Refuse a config that is not a causal LM: an encoder-only or encoder-decoder model_type, or
    ``architectures`` naming only non-causal heads. memplan would otherwise estimate some other
    model than the one the user trains.

    Raises:
        ProfileError: one line naming the model_type and its kind.
    """
    mtype = raw["model_type"]
    arch = [a for a in raw.get("architectures") or () if isinstance(a, str)]
    named = f" ({', '.join(arch)})" if arch else ""
    lead = f"{where}: memplan plans causal-LM fine-tuning; {mtype!r}"
    if raw.get("is_encoder_decoder") is True or mtype in ENCODER_DECODER_TYPES:
        raise ProfileError(f"{lead} is an encoder-decoder model{named}, which memplan does not estimate")
    if mtype in ENCODER_ONLY_TYPES and raw.get("is_decoder") is not True:
        raise ProfileError(f"{lead} is an encoder-only model{named}, which memplan does not estimate (its "
                           "causal-LM class in transformers is the encoder run as a decoder: another model)")
    if arch and all(a.endswith(ENCODER_HEADS) for a in arch):
        raise ProfileError(f"{lead} is saved with {', '.join(arch)}, not a causal-LM head, which memplan does not "
                           "estimate")


def check_nested(raw: dict[str, Any], where: str) -> None:
    """Refuse nested configs that are not objects, and a vision-language config without its
    ``vision_config`` (transformers would build its default tower: another model's).

    Raises:
        ProfileError: one line naming the field.
    """
    for key in NESTED:
        if key in raw and raw[key] is not None and not isinstance(raw[key], dict):
            raise ProfileError(f"{where}: {key} must be an object of config fields, got {type(raw[key]).__name__}")
    if raw["model_type"] in VLM_TYPES and not isinstance(raw.get("vision_config"), dict):
        raise ProfileError(f"{where}: a {raw['model_type']} config needs its vision_config (without it transformers "
                           "builds a default vision tower, not this model's)")


def _transformers_version() -> str:
    """The installed transformers' version, read from its metadata (no import), or ``none``."""
    try:
        return metadata.version("transformers")
    except metadata.PackageNotFoundError:
        return "none"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _spec_json(groups: tuple[Group, ...]) -> dict[str, Any]:
    """The groups as JSON: each tensor as [name, shape, kind, part, requires_grad]."""
    return {"groups": [{"name": g.name, "kind": g.kind, "config": g.config,
                        "tensors": [[t.name, list(t.shape), t.kind.value, t.part.value, t.requires_grad]
                                    for t in g.tensors]} for g in groups]}


def _groups_from_json(data: dict[str, Any]) -> tuple[Group, ...] | None:
    """The groups of a cached inventory, or None when it does not parse (then it is rebuilt)."""
    try:
        groups = []
        for g in data["groups"]:
            tensors = tuple(TensorSpec(str(n), tuple(int(d) for d in shape), TensorKind(kind), Part(part), bool(rg))
                            for n, shape, kind, part, rg in g["tensors"])
            if not isinstance(g["config"], dict) or not isinstance(g["name"], str) or not isinstance(g["kind"], str):
                return None
            groups.append(Group(g["name"], g["kind"], tensors, g["config"]))
        return tuple(groups) if groups else None
    except (KeyError, TypeError, ValueError):
        return None


def _plain(groups: tuple[Group, ...]) -> tuple[Group, ...]:
    """The groups with configs as JSON gives them back (lists, not tuples), so a fresh build and
    a cached one are equal."""
    return tuple(Group(g.name, g.kind, g.tensors, json.loads(json.dumps(g.config, default=str))) for g in groups)


def _groups(cfg_path: Path, data: bytes, raw: dict[str, Any], trust_remote_code: bool) -> tuple[Group, ...]:
    """The model's groups from the cache, or built (`hf_build`) and cached. The key: the bytes of
    config.json, of a vision model's preprocessor_config.json and of the trusted code, and the
    transformers version."""
    folder, where = cfg_path.parent, str(cfg_path)
    # Without the flag the code is never looked at: transformers builds a model_type it ships
    # with its own class (a Phi-3 config copied without its old .py files), and refuses the rest.
    code = remote_code(folder, raw, where) if trust_remote_code else None
    processor_path = folder / PROCESSOR_FILE
    vision = isinstance(raw.get("vision_config"), dict)
    proc_bytes, processor = read_json(processor_path) if vision and processor_path.is_file() else (b"", None)
    key = cache.cache_key("inventory", _transformers_version(), _sha(data), _sha(proc_bytes),
                          code.digest() if code else "")
    cached = cache.read_entry("inventory", key, INVENTORY_VERSION)
    groups = _groups_from_json(cached) if cached is not None else None
    if groups is None:
        from planner.profile.hf_build import build_groups

        groups = _plain(build_groups(cfg_path, raw, code, trust_remote_code, processor, str(processor_path)))
        try:
            cache.write_entry("inventory", key, INVENTORY_VERSION, _spec_json(groups))
        except (TypeError, ValueError):  # a config value JSON cannot hold (NaN): not cached
            pass
    return groups


def model_from_config(path: str | Path, trust_remote_code: bool = False) -> ModelSpec:
    """The model a config.json describes, its parameters grouped (`hf_groups`): from the cache when
    this config (and the processor settings and code beside it) was read before with this
    transformers version, else built on the meta device (`hf_build`) and cached.

    Args:
        path: a config.json or the folder holding one.
        trust_remote_code: run the model's own code when its config names it (``auto_map``).

    Raises:
        ProfileError: one line: the file is missing, not JSON or out of bounds; not a causal LM;
            a nested config broken; remote code without the flag or with a file missing;
            transformers cannot build it (or is not installed).
    """
    cfg_path = find_config(path)
    if cfg_path is None:
        raise ProfileError(f"--model {path}: no config.json there")
    data, raw = read_json(cfg_path, "config.json")
    if "model_type" not in raw:
        raise ProfileError(f'{cfg_path}: not a Hugging Face config (no "model_type" field)')
    if not isinstance(raw["model_type"], str):
        raise ProfileError(f"{cfg_path}: model_type must be a string, got {type(raw['model_type']).__name__}")
    where = str(cfg_path)
    check_config_bounds(raw, f"{cfg_path}: ")  # before transformers builds 200,000 layers
    check_causal(raw, where)
    check_nested(raw, where)
    groups = _groups(cfg_path, data, raw, trust_remote_code)
    name = str(raw.get("_name_or_path") or cfg_path.parent.name)
    return ModelSpec(name, where, groups, None)

