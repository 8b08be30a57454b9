"""Plan: the chosen setup, its estimate and speed, what it gives up, and how to train with it.

Fifth stage of the flow (search -> **plan** -> writers -> launch). A plan is plain data: it
round-trips through ``plan.json``, so `memplan launch` and `memplan train` can read back exactly
what `memplan tune` chose, and a retry after an out-of-memory error can search again from the same
request.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from planner.errors import ProfileError
from planner.estimate.states import ZeroSettings
from planner.profile.catalog import GpuSpec, GroupProfile, ModelProfile, ModelSpec, build_model
from planner.profile.hardware import Cluster
from planner.search.space import Candidate, Constraints, GiveUp, Request, SearchSpace
from planner.workload.inventory import Origin, Workload, trainable_inventory
from planner.workload.options import Engine, TrainingOptions, ZeroStage

PLAN_VERSION = 1

FULL_LEARNING_RATE = 1e-5
"""Full fine-tuning learning rate: LLaMA-Factory's full-SFT examples (1e-5); MiniCPM-o's
finetune_ds.sh uses 1e-6 for its 8-GPU batch."""

LORA_LEARNING_RATE = 1e-4
"""LoRA learning rate: LLaMA-Factory's LoRA-SFT examples (1e-4)."""

MAX_PLAN_BYTES = 16 * 2**20
"""A plan.json memplan writes is tens of KiB (the model's profile included); a file larger than
16 MiB is not a plan, and is not read whole to find that out (bytes)."""


class ModelRef(BaseModel):
    """Which model: the profile (or config) it was planned from and where the weights come from."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    """Profile name, or the config's folder for a local model."""
    path: str
    """``model_name_or_path`` for the trainers: a hub id or a local folder."""
    hidden_size: int | None = None
    model_type: str | None = None
    """The LLM's model_type (``qwen2``...): picks the chat template of the trainers."""
    profile: ModelProfile | None = None
    """The model's profile as planned (shipped or from ``--profiles-dir``), so that a re-plan after
    an out-of-memory failure rebuilds exactly this model, on any machine, with no profile folder;
    None for a model read from a config.json (see `config`) and in plans of older memplans."""
    config: str | None = None
    """The config.json a model without a profile was read from, absolute (its folder holds the
    weights the trainers load, so a re-plan reads it there)."""


class ClusterRef(BaseModel):
    """The cluster, as ``--gpus`` names it, and the host RAM per node it was planned for."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    gpus: str
    gpu: str
    nodes: int = Field(gt=0)
    gpus_per_node: int = Field(gt=0)
    gpu_memory_bytes: int = Field(gt=0)
    host_ram_bytes: int = Field(gt=0)
    gpu_spec: GpuSpec | None = None
    """The GPU's profile as planned, so that a re-plan needs no profile folder (a user GPU from
    ``--profiles-dir``, a plan folder moved to another machine); None in plans of older memplans."""

    @property
    def world_size(self) -> int:
        """Ranks in all."""
        return self.nodes * self.gpus_per_node

    @classmethod
    def of(cls, cluster: Cluster) -> ClusterRef:
        """From a `Cluster`."""
        return cls(gpus=cluster.label, gpu=cluster.gpu.name, nodes=cluster.nodes, gpus_per_node=cluster.gpus_per_node,
                   gpu_memory_bytes=cluster.gpu_memory_bytes, host_ram_bytes=cluster.host_ram_bytes,
                   gpu_spec=cluster.gpu if _strict_json(cluster.gpu) else None)

    def to_cluster(self) -> Cluster:
        """The `Cluster` planned for, from the recorded GPU profile.

        Raises:
            ProfileError: the plan records no GPU profile (a plan of an older memplan).
        """
        if self.gpu_spec is None:
            raise ProfileError(f"the plan records no profile of its GPU {self.gpu!r} (written by an older memplan)")
        return Cluster(self.gpu_spec, self.nodes, self.gpus_per_node, self.gpu_memory_bytes, self.host_ram_bytes)


class GroupPlan(BaseModel):
    """How one built layer group trains in the plan."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    kind: str
    params: int
    trainable_params: int
    training: str
    """``full`` (every tensor trains), ``partial`` (some parts do), ``lora`` (adapters, the base
    frozen), ``frozen``."""


def profile_of(model: ModelSpec) -> ModelProfile | None:
    """The profile that builds exactly ``model`` (each group from its kind and config, tensor for
    tensor), or None when its tensors came from elsewhere (a config.json traced on the meta device)."""
    try:
        profile = ModelProfile(name=model.name, hf_id=model.hf_id, source=model.source,
                               groups=tuple(GroupProfile(name=g.name, kind=g.kind, config=g.config)
                                            for g in model.groups))
        rebuilt = build_model(profile, check_counts=False)
    except (ValueError, TypeError, KeyError, ArithmeticError):  # ProfileError, ValidationError...: not a profile's
        return None
    return profile if rebuilt.groups == model.groups and _strict_json(profile) else None


def _strict_json(spec: BaseModel) -> bool:
    """Whether ``spec`` goes into plan.json, which is strict JSON: a user profile may hold an
    infinite or NaN float (TOML has ``inf`` and ``nan``), which JSON cannot say."""
    try:
        json.dumps(spec.model_dump(mode="json"), allow_nan=False)
    except ValueError:
        return False
    return True


def _config_path(model: ModelSpec) -> str | None:
    """The config.json a traced model was read from (its ``source``), absolute; None otherwise."""
    path = Path(model.source)
    return str(path.resolve()) if path.name.endswith(".json") and path.is_file() else None


def group_plans(model: ModelSpec, options: TrainingOptions) -> tuple[GroupPlan, ...]:
    """Each built group's training mode, from the run's parameter inventory."""
    params = trainable_inventory(model, options)
    out = []
    for g in model.groups:
        mine = [p for p in params if p.group == g.name]
        if not mine:
            continue  # not built (--without)
        base = [p for p in mine if p.origin == Origin.BASE]
        trained_base = {p.tensor.name for p in mine if p.trainable and p.origin != Origin.LORA}
        adapters = any(p.origin == Origin.LORA for p in mine)
        trainable = {p.tensor.name for p in base if p.tensor.requires_grad}
        if adapters:
            training = "lora"
        elif not trained_base:
            training = "frozen"
        elif trained_base >= trainable:
            training = "full"
        else:
            training = "partial"
        out.append(GroupPlan(name=g.name, kind=g.kind, params=sum(p.numel for p in base),
                             trainable_params=sum(p.numel for p in mine if p.trainable), training=training))
    return tuple(out)


def lora_modules(model: ModelSpec, options: TrainingOptions) -> tuple[str, ...]:
    """Leaf names of the linears LoRA adapts (``q_proj``...), in model order; empty without LoRA."""
    if options.lora is None:
        return ()
    seen: dict[str, None] = {}
    for p in trainable_inventory(model, options):
        if p.origin == Origin.LORA:
            seen[p.tensor.name.split(".")[-3]] = None
    return tuple(seen)


class TrainerSettings(BaseModel):
    """What the trainers need beyond memory: data, output, schedule. Not searched; the user may
    pass them to `memplan tune` and edit them in the written files."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)  # JSON has no inf/NaN

    data_path: str = "data/train.json"
    """The training data (MiniCPM-style JSON/JSONL conversations)."""
    output_dir: str = "output"
    """Where the trainer writes checkpoints; relative paths are relative to where it runs."""
    learning_rate: float = Field(default=FULL_LEARNING_RATE, gt=0)
    num_train_epochs: float = Field(default=1.0, gt=0)
    max_steps: int = -1
    """Stop after this many optimizer steps; -1: run the epochs."""
    warmup_ratio: float = Field(default=0.03, ge=0, le=1)
    weight_decay: float = Field(default=0.0, ge=0)
    max_grad_norm: float = Field(default=1.0, ge=0)
    """Gradient clipping (HF Trainer's default 1.0; the estimate counts its temporaries)."""
    lr_scheduler_type: str = "cosine"
    logging_steps: int = Field(default=1, gt=0)
    save_steps: int = Field(default=500, gt=0)
    save_total_limit: int = Field(default=3, gt=0)
    seed: int = 42
    lora_alpha: int | None = None
    """LoRA alpha; None: equal to the rank (MiniCPM-o's finetune_lora.sh uses r 64, alpha 64). The
    dropout is not here: it costs memory, so it is ``options.lora.dropout``, estimated and written."""
    nvme_path: str = "/local_nvme"
    """A folder on the NVMe drive for ZeRO-Infinity offload (DeepSpeed's docs use /local_nvme)."""


class Plan(BaseModel):
    """Everything `memplan tune` decided, and why. ``plan.json`` is this model as JSON."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: int = PLAN_VERSION
    model: ModelRef
    cluster: ClusterRef
    options: TrainingOptions
    workload: Workload
    groups: tuple[GroupPlan, ...]
    lora_modules: tuple[str, ...] = ()
    global_batch: int = Field(gt=0)
    zero: dict[str, Any]
    """The DeepSpeed values the estimate used (`ZeroSettings` fields)."""
    trainer: TrainerSettings = TrainerSettings()
    request: Request
    constraints: Constraints
    gives_up: tuple[GiveUp, ...] = ()
    per_gpu_bytes: int
    host_bytes: int
    nvme_bytes: int = 0
    gpu_peak_phase: str
    host_peak_phase: str
    step_seconds: dict[str, float]
    tokens_per_s: float
    candidate: str
    """The candidate's canonical name."""
    notes: tuple[str, ...] = ()
    space: SearchSpace | None = None
    """The search space the plan was chosen from (``--engine`` narrows it), searched again on a
    retry; None: the default space."""
    files: tuple[str, ...] = ()
    """The files written with it (set by the folder writer)."""
    file_sha256: dict[str, str] = Field(default_factory=dict)
    """SHA-256 of each file as written (set by the folder writer): ``--force`` replaces only a file
    that still has it, never one the user wrote or edited."""
    skipped: dict[str, str] = Field(default_factory=dict)
    """Files this plan has none of, and why (a trainer that cannot express it)."""

    @model_validator(mode="before")
    @classmethod
    def _dropout_into_options(cls, doc: Any) -> Any:  # noqa: ANN401
        """A ``plan.json`` written before the dropout was estimated kept it as
        ``trainer.lora_dropout``; it moves to ``options.lora.dropout``, the value its files wrote."""
        trainer = doc.get("trainer") if isinstance(doc, dict) else None
        if not isinstance(trainer, dict) or "lora_dropout" not in trainer:
            return doc
        trainer = dict(trainer)
        dropout = trainer.pop("lora_dropout")
        doc = dict(doc, trainer=trainer)
        options = doc.get("options")
        if isinstance(options, dict) and isinstance(options.get("lora"), dict):
            doc["options"] = dict(options, lora={"dropout": dropout, **options["lora"]})
        return doc

    @property
    def deepspeed(self) -> bool:
        """Whether the run goes through DeepSpeed."""
        return self.options.engine is Engine.DEEPSPEED

    @property
    def zero_settings(self) -> ZeroSettings:
        """The `ZeroSettings` of the estimate."""
        return ZeroSettings(**self.zero)

    @property
    def zero3(self) -> bool:
        """Whether ZeRO-3 partitions the parameters."""
        return self.deepspeed and self.options.zero is ZeroStage.PARAMETERS

    def to_json(self) -> dict[str, Any]:
        """``plan.json``'s content."""
        return self.model_dump(mode="json")

    @classmethod
    def read(cls, path: Path) -> Plan:
        """Read a ``plan.json``.

        Raises:
            ValueError: the file is not a plan of this version (pydantic's ValidationError is one).
        """
        import json

        doc = json.loads(Path(path).read_text())
        if not isinstance(doc, dict) or doc.get("version") != PLAN_VERSION:
            raise ValueError(f"{path}: not a memplan plan (version {PLAN_VERSION})")
        return cls.model_validate(doc)


def make_plan(
    model: ModelSpec,
    model_path: str | None,
    cluster: Cluster,
    candidate: Candidate,
    global_batch: int,
    request: Request,
    constraints: Constraints,
    trainer: TrainerSettings | None = None,
    notes: tuple[str, ...] = (),
    space: SearchSpace | None = None,
) -> Plan:
    """The plan of one candidate.

    Args:
        model: the model planned for.
        model_path: where the trainers load it from; None: the profile's hub id.
        cluster: the cluster planned for.
        candidate: the chosen setup.
        global_batch: samples per optimizer step.
        request, constraints: what the search honoured (kept to search again on a retry).
        trainer: data, output and schedule; None: defaults, with the LoRA learning rate for LoRA.
        notes: what the user should read with the plan.
        space: the search space the candidate was chosen from (kept to search again on a retry);
            None: the default space.
    """
    llm = next((g for g in model.groups if g.kind == "decoder"), None)
    path = model_path or model.hf_id or model.name
    if trainer is None:
        trainer = TrainerSettings(learning_rate=LORA_LEARNING_RATE if candidate.options.lora else FULL_LEARNING_RATE)
    est = candidate.estimate
    zero = ZeroSettings.hf_auto(model.hidden_size)
    profile = profile_of(model)
    return Plan(
        model=ModelRef(name=model.name, path=path, hidden_size=model.hidden_size,
                       model_type=llm.config.get("model_type") if llm else None,
                       profile=profile, config=None if profile else _config_path(model)),
        cluster=ClusterRef.of(cluster),
        options=candidate.options,
        workload=candidate.workload,
        groups=group_plans(model, candidate.options),
        lora_modules=lora_modules(model, candidate.options),
        global_batch=global_batch,
        zero={k: getattr(zero, k) for k in zero.__dataclass_fields__},
        trainer=trainer,
        request=request,
        constraints=constraints,
        gives_up=candidate.gives_up,
        per_gpu_bytes=est.per_gpu.total_bytes,
        host_bytes=est.host.total_bytes,
        nvme_bytes=est.nvme_bytes,
        gpu_peak_phase=est.per_gpu.peak_phase.value,
        host_peak_phase=est.host.peak_phase.value,
        step_seconds=dict(candidate.speed.terms),
        tokens_per_s=candidate.speed.tokens_per_s,
        candidate=candidate.name,
        notes=notes,
        space=space,
    )

