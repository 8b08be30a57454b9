"""Profiles: GPU and model specs as data (TOML), validated on load, and the catalog that finds them.

First stage of the flow (profile -> workload -> estimate -> ...). A model is a list of named
layer groups; each group's tensors come from `architectures` (shipped and user profiles) or from
the real transformers class on the meta device (`hf_config`, for a local config.json).
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from planner.architectures import Part, ProfileError, TensorSpec, build_tensors
from planner.units import MIB

PROFILES_ENV = "MEMPLAN_PROFILES"
"""Environment variable: extra profile folders, separated like PATH (``os.pathsep``)."""

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


def _check_name(value: str) -> str:
    if not _NAME_RE.match(value):
        raise ValueError(f"{value!r} is not a valid name (lowercase letters, digits, '.', '_' and '-')")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class GpuSpec(_Strict):
    """One GPU model. Throughputs are dense tensor-core figures at boost clock."""

    name: str
    aliases: tuple[str, ...] = ()
    full_name: str
    architecture: str
    compute_capability: str
    memory_mib: int = Field(gt=0, description="total memory as the driver reports it, MiB")
    bf16: bool
    bf16_tflops: float = Field(ge=0)
    fp16_tflops: float = Field(gt=0)
    fp32_tflops: float = Field(gt=0)
    memory_bandwidth_gbps: float = Field(gt=0)
    pcie_gen: int = Field(ge=1)
    pcie_lanes: int = Field(ge=1)
    nvlink_gbps: float = Field(ge=0, description="total NVLink bandwidth per GPU, GB/s; 0 = none")
    form_factor: Literal["pcie", "sxm"] = Field(
        default="pcie",
        description="sxm: NVLink runs through the baseboard and is always there; pcie: a card in a slot, "
        "whose NVLink (if any) needs a bridge, which many rigs lack",
    )
    pcie_p2p: bool = Field(
        default=True,
        description="GPU-to-GPU copies go straight over PCIe; False on GeForce cards, whose stock drivers stage "
        "peer traffic through host memory",
    )
    source: str

    _name = field_validator("name")(_check_name)

    @property
    def memory_bytes(self) -> int:
        """Total device memory, bytes."""
        return self.memory_mib * MIB


class GroupProfile(_Strict):
    """A layer group as written in a profile: a kind, its Hugging Face config fields and the
    parameter count it must add up to."""

    name: str
    kind: str
    expected_params: int | None = Field(default=None, ge=0)
    config: dict[str, Any]

    _name = field_validator("name")(_check_name)


class ModelProfile(_Strict):
    """A model as written in a profile file."""

    name: str
    aliases: tuple[str, ...] = ()
    hf_id: str | None = None
    source: str
    expected_params: int | None = Field(default=None, ge=0)
    groups: tuple[GroupProfile, ...] = Field(min_length=1)

    _name = field_validator("name")(_check_name)

    @model_validator(mode="after")
    def _unique_groups(self) -> ModelProfile:
        names = [g.name for g in self.groups]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate group names: {', '.join(dupes)}")
        return self


@dataclass(frozen=True)
class Group:
    """A layer group with its parameter tensors.

    Attributes:
        name: the group's name (``llm``, ``vpm``...), the module attribute where there is one.
        kind: the builder that produced it (``decoder``...), or ``module`` for a traced model.
        tensors: its parameter tensors, tied duplicates left out.
        config: the Hugging Face config fields it was built from (empty when traced).
    """

    name: str
    kind: str
    tensors: tuple[TensorSpec, ...]
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def params(self) -> int:
        """Number of parameters."""
        return sum(t.numel for t in self.tensors)

    @property
    def parts(self) -> tuple[Part, ...]:
        """The parts present, in order of first appearance."""
        return tuple(dict.fromkeys(t.part for t in self.tensors))

    @property
    def tied_lm_head(self) -> bool:
        """Whether this is a decoder whose lm_head shares embed_tokens' tensor."""
        return self.kind == "decoder" and Part.EMBED_TOKENS in self.parts and Part.LM_HEAD not in self.parts


@dataclass(frozen=True)
class ModelSpec:
    """A model ready for the estimator: named groups of tensors."""

    name: str
    source: str
    groups: tuple[Group, ...]
    hf_id: str | None = None

    @property
    def params(self) -> int:
        """Total parameters."""
        return sum(g.params for g in self.groups)

    def group(self, name: str) -> Group:
        """The group called ``name``."""
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(name)

    @property
    def hidden_size(self) -> int | None:
        """The LLM's hidden size (HF Trainer derives DeepSpeed's "auto" buckets from it)."""
        for g in self.groups:
            if g.kind == "decoder":
                return g.config.get("hidden_size")
        return None


def build_model(profile: ModelProfile, check_counts: bool = True) -> ModelSpec:
    """Turn a profile into a ModelSpec, building every group's tensors.

    Raises:
        ProfileError: a group's config is incomplete, or (with ``check_counts``) a group or the
            model does not add up to its ``expected_params``.
    """
    groups = []
    for gp in profile.groups:
        try:
            tensors = tuple(build_tensors(gp.kind, gp.config))
        except ProfileError as exc:
            raise ProfileError(f"model {profile.name!r}, group {gp.name!r}: {exc}") from None
        group = Group(gp.name, gp.kind, tensors, dict(gp.config))
        if check_counts and gp.expected_params is not None and group.params != gp.expected_params:
            raise ProfileError(
                f"model {profile.name!r}, group {gp.name!r}: its config gives {group.params:,} parameters"
                f" but expected_params says {gp.expected_params:,}"
            )
        groups.append(group)
    spec = ModelSpec(profile.name, profile.source, tuple(groups), profile.hf_id)
    if check_counts and profile.expected_params is not None and spec.params != profile.expected_params:
        raise ProfileError(
            f"model {profile.name!r}: its groups add up to {spec.params:,} parameters"
            f" but expected_params says {profile.expected_params:,}"
        )
    return spec


def _format_validation(path: Path, section: str, exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in (section, *err["loc"]))
    more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return f"{path}: {loc}: {err['msg']}{more}"


@dataclass
class ProfileFile:
    """The GPUs and models one TOML file defines."""

    path: Path
    gpus: list[GpuSpec]
    models: list[ModelProfile]


def load_file(path: Path) -> ProfileFile:
    """Read and validate one profile file.

    Raises:
        ProfileError: unreadable TOML, unknown sections or fields, wrong types; the message names
            the file and the field.
    """
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ProfileError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{path}: not valid TOML: {exc}") from None
    unknown = sorted(set(data) - {"gpus", "models"})
    if unknown:
        raise ProfileError(f"{path}: unknown section(s) {', '.join(unknown)} (expected [[gpus]] or [[models]])")
    gpus, models = [], []
    for section, cls, out in (("gpus", GpuSpec, gpus), ("models", ModelProfile, models)):
        entries = data.get(section, [])
        if not isinstance(entries, list):
            raise ProfileError(f"{path}: {section} must be an array of tables ([[{section}]])")
        for i, entry in enumerate(entries):
            try:
                out.append(cls.model_validate(entry))
            except ValidationError as exc:
                raise ProfileError(_format_validation(path, f"{section}[{i}]", exc)) from None
    return ProfileFile(path, gpus, models)


def builtin_profiles_dir() -> Path:
    """The profiles shipped with memplan (installed as ``planner/profiles``, or ``profiles/`` in a
    source checkout)."""
    here = Path(__file__).resolve().parent
    installed = here / "profiles"
    return installed if installed.is_dir() else here.parent / "profiles"


def toml_files(root: Path) -> list[Path]:
    """Every .toml file under a folder (or the file itself)."""
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise ProfileError(f"profiles folder {root} does not exist")
    return sorted(root.rglob("*.toml"))


def close_matches(word: str, choices: Iterable[str]) -> str:
    """A ``did you mean`` suffix for error messages, or a list of what exists."""
    choices = sorted(set(choices))
    near = difflib.get_close_matches(word.lower(), choices, n=4, cutoff=0.5)
    if near:
        return f"did you mean {', '.join(near)}?"
    return f"known: {', '.join(choices)}"


@dataclass
class Catalog:
    """Every GPU and model profile found, by canonical name, with where each came from."""

    gpus: dict[str, GpuSpec] = field(default_factory=dict)
    models: dict[str, ModelProfile] = field(default_factory=dict)
    origin: dict[str, Path] = field(default_factory=dict)
    _gpu_alias: dict[str, str] = field(default_factory=dict)
    _model_alias: dict[str, str] = field(default_factory=dict)

    def add(self, pf: ProfileFile) -> None:
        """Add a file's entries; a later folder's entry replaces an earlier one of the same name."""
        for g in pf.gpus:
            self.gpus[g.name] = g
            self.origin[f"gpu:{g.name}"] = pf.path
            for a in (g.name, *g.aliases, g.full_name):
                self._gpu_alias[_norm(a)] = g.name
        for m in pf.models:
            self.models[m.name] = m
            self.origin[f"model:{m.name}"] = pf.path
            for a in (m.name, *m.aliases, *([m.hf_id] if m.hf_id else [])):
                self._model_alias[_norm(a)] = m.name

    def gpu(self, name: str) -> GpuSpec:
        """The GPU called ``name`` (canonical name, alias or full name; case-insensitive)."""
        key = self._gpu_alias.get(_norm(name))
        if key is None:
            raise ProfileError(f"unknown GPU {name!r}; {close_matches(_norm(name), self._gpu_alias)}")
        return self.gpus[key]

    def model(self, name: str) -> ModelProfile:
        """The model called ``name`` (canonical name, alias or hub id; case-insensitive)."""
        key = self._model_alias.get(_norm(name))
        if key is None:
            raise ProfileError(f"unknown model {name!r}; {close_matches(_norm(name), self.models)}")
        return self.models[key]

    def has_model(self, name: str) -> bool:
        """Whether ``name`` names a model profile."""
        return _norm(name) in self._model_alias


def _norm(name: str) -> str:
    return name.strip().lower().replace(" ", "-")


def profile_dirs(extra: Sequence[Path | str] = ()) -> list[Path]:
    """The folders searched, in order: shipped, then $MEMPLAN_PROFILES, then ``extra``."""
    dirs = [builtin_profiles_dir()]
    env = os.environ.get(PROFILES_ENV, "")
    dirs += [Path(p) for p in env.split(os.pathsep) if p]
    dirs += [Path(p) for p in extra]
    return dirs


def load_catalog(extra: Sequence[Path | str] = ()) -> Catalog:
    """Load every profile file from the shipped folder, $MEMPLAN_PROFILES and ``extra``."""
    catalog = Catalog()
    for root in profile_dirs(extra):
        for path in toml_files(root):
            catalog.add(load_file(path))
    return catalog
