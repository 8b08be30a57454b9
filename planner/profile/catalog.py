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

from planner.errors import ProfileError
from planner.profile.architectures import Part, TensorSpec, build_tensors
from planner.units import MIB

PROFILES_ENV = "MEMPLAN_PROFILES"
"""Environment variable: extra profile folders, separated like PATH (``os.pathsep``)."""

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")

MAX_PROFILE_FILE_BYTES = 4 * MIB
"""A profile file larger than this is not one (the shipped nvidia.toml is 20 KiB)."""
MAX_PROFILE_FILES = 1000
"""``.toml`` files read from one profiles folder; more means the folder is not a profiles folder."""
MAX_PROFILE_WALK = 20_000
"""Folder entries looked at under one profiles folder (``--profiles-dir /`` would walk the disk)."""

MAX_GPU_MEMORY_MIB = 1024 * 1024
"""1 TiB per GPU. The largest released: AMD MI355X 288 GB, NVIDIA B300 288 GB."""
MAX_TFLOPS = 100_000.0
"""Dense TFLOP/s. A B200 reaches 2,250 dense bf16 and 9,000 sparse fp4."""
MAX_BANDWIDTH_GBPS = 100_000.0
"""Memory or NVLink bandwidth, GB/s. B200: 8,000 HBM, 1,800 NVLink."""
MAX_PCIE_GEN = 7
"""PCIe 7.0 is the newest specification (2025)."""
MAX_PCIE_LANES = 32
"""x32 is the widest link the PCIe specification defines."""


def _check_name(value: str) -> str:
    if not _NAME_RE.match(value):
        raise ValueError(f"{value!r} is not a valid name (lowercase letters, digits, '.', '_' and '-')")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


_REPLACES_DOC = (
    "the name of a profile (shipped, or from an earlier profiles folder) that this entry deliberately "
    "replaces; without it an entry whose name or alias is already taken is refused"
)


class GpuSpec(_Strict):
    """One GPU model. Throughputs are dense tensor-core figures at boost clock."""

    name: str
    aliases: tuple[str, ...] = ()
    full_name: str
    architecture: str
    compute_capability: str = Field(pattern=r"^[1-9][0-9]?\.[0-9]$", description="CUDA sm version, e.g. 8.6")
    memory_mib: int = Field(gt=0, le=MAX_GPU_MEMORY_MIB, description="total memory as the driver reports it, MiB")
    bf16: bool
    bf16_tflops: float = Field(ge=0, le=MAX_TFLOPS)
    fp16_tflops: float = Field(gt=0, le=MAX_TFLOPS)
    fp32_tflops: float = Field(gt=0, le=MAX_TFLOPS)
    memory_bandwidth_gbps: float = Field(gt=0, le=MAX_BANDWIDTH_GBPS)
    pcie_gen: int = Field(ge=1, le=MAX_PCIE_GEN)
    pcie_lanes: int = Field(ge=1, le=MAX_PCIE_LANES)
    nvlink_gbps: float = Field(ge=0, le=MAX_BANDWIDTH_GBPS,
                               description="total NVLink bandwidth per GPU, GB/s; 0 = none")
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
    replaces: str | None = Field(default=None, exclude=True, description=_REPLACES_DOC)

    _name = field_validator("name")(_check_name)

    @property
    def compute_capability_tuple(self) -> tuple[int, int]:
        """``(8, 6)`` for ``"8.6"``: comparable with a kernel's minimum."""
        major, minor = self.compute_capability.split(".")
        return int(major), int(minor)

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
    replaces: str | None = Field(default=None, exclude=True, description=_REPLACES_DOC)

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
        with open(path, "rb") as fh:
            raw = fh.read(MAX_PROFILE_FILE_BYTES + 1)
    except OSError as exc:
        raise ProfileError(f"{path}: cannot read: {exc.strerror}") from None
    except ValueError:  # open() refuses a NUL byte in the name
        raise ProfileError(f"{str(path)!r}: a path cannot contain a NUL byte") from None
    if len(raw) > MAX_PROFILE_FILE_BYTES:
        raise ProfileError(f"{path}: larger than {MAX_PROFILE_FILE_BYTES // MIB} MiB: not a profile file")
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ProfileError(f"{path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
                           "TOML files are UTF-8") from None
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
    package = Path(__file__).resolve().parents[1]  # planner/
    installed = package / "profiles"
    return installed if installed.is_dir() else package.parent / "profiles"


def toml_files(root: Path) -> list[Path]:
    """Every .toml file under a folder (or the file itself), symlinked folders followed once.

    Raises:
        ProfileError: the path cannot exist (a NUL byte, too long), does not exist, or is no
            profiles folder (more than `MAX_PROFILE_FILES` files, or `MAX_PROFILE_WALK` entries).
    """
    if "\0" in str(root):
        raise ProfileError(f"profiles folder {str(root)!r}: a path cannot contain a NUL byte")
    try:
        if root.is_file():
            return [root]
        if not root.is_dir():
            raise ProfileError(f"profiles folder {root} does not exist")
    except OSError as exc:
        raise ProfileError(f"profiles folder {str(root)[:200]}: cannot look there: {exc.strerror}") from None
    found: list[Path] = []
    seen_dirs: set[Path] = set()
    entries = 0
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = Path(dirpath).resolve()
        if real in seen_dirs:  # a symlink loop, or a folder reached twice
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        entries += len(dirnames) + len(filenames)
        found += [Path(dirpath) / f for f in filenames if f.endswith(".toml")]
        if entries > MAX_PROFILE_WALK or len(found) > MAX_PROFILE_FILES:
            raise ProfileError(f"profiles folder {root} holds more than {MAX_PROFILE_FILES} .toml files or "
                               f"{MAX_PROFILE_WALK:,} entries: point it at the folder of your profiles")
    return sorted(found)


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
    notes: list[str] = field(default_factory=list)
    """What the user's profiles changed among the profiles loaded before them (an entry that
    ``replaces`` one), one line each, for the CLI to show with its answer."""
    _gpu_alias: dict[str, str] = field(default_factory=dict)
    _model_alias: dict[str, str] = field(default_factory=dict)

    def add(self, pf: ProfileFile) -> None:
        """Add a file's entries.

        A name, alias, full name or hub id already taken (by a shipped profile or an earlier
        folder's) is refused, unless the entry says ``replaces = "<that profile's name>"``: then
        that profile and all its names give way, and `notes` says so. An entry identical to the
        one holding its name is skipped (the same file reached twice, a copy of a shipped file).

        Raises:
            ProfileError: a name is taken and the entry does not say it replaces its holder, or
                ``replaces`` names no profile.
        """
        for g in pf.gpus:
            self._add("gpu", g, pf.path, self.gpus, self._gpu_alias, (g.name, *g.aliases, g.full_name))
        for m in pf.models:
            names = (m.name, *m.aliases, *([m.hf_id] if m.hf_id else []))
            self._add("model", m, pf.path, self.models, self._model_alias, names)

    def _add(self, kind: str, entry: GpuSpec | ModelProfile, path: Path, table: dict, aliases: dict[str, str],
             names: tuple[str, ...]) -> None:
        what = "GPU" if kind == "gpu" else "model"
        holders = {aliases[_norm(n)]: n for n in names if _norm(n) in aliases}
        if entry.replaces is None and any(table[h] == entry for h in holders):
            return  # the very same entry again
        if entry.replaces is not None:
            target = aliases.get(_norm(entry.replaces))
            if target is None:
                raise ProfileError(f"{path}: {what} {entry.name!r} says replaces = {entry.replaces!r}, but no "
                                   f"{what} profile is called that; {close_matches(entry.replaces, table)}")
            old = self.origin.pop(f"{kind}:{target}")
            del table[target]
            for alias in [a for a, holder in aliases.items() if holder == target]:
                del aliases[alias]
            holders.pop(target, None)
            shipped = "the shipped " if builtin_profiles_dir() in old.resolve().parents else ""
            self.notes.append(f"{what} profile {entry.name!r} in {path} replaces {shipped}{target!r} ({old})")
        if holders:
            holder, name = next(iter(holders.items()))
            raise ProfileError(
                f"{path}: {what} {entry.name!r}: the name {name!r} is taken by {holder!r} "
                f"(from {self.origin[f'{kind}:{holder}']}); add replaces = {holder!r} to this entry to "
                "replace that profile, or choose other names"
            )
        table[entry.name] = entry
        self.origin[f"{kind}:{entry.name}"] = path
        for name in names:
            aliases[_norm(name)] = entry.name

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
    """Load every profile file from the shipped folder, $MEMPLAN_PROFILES and ``extra``, in that
    order (see `Catalog.add` for an entry whose name is taken)."""
    catalog = Catalog()
    read: set[Path] = set()
    for root in profile_dirs(extra):
        for path in toml_files(root):
            if path.resolve() not in read:  # a folder named twice ($MEMPLAN_PROFILES and --profiles-dir)
                read.add(path.resolve())
                catalog.add(load_file(path))
    return catalog
