"""Workload: what one training step processes and which parameters it trains.

Second stage of the flow. ``trainable_inventory`` applies the options' group selections and
LoRA to a model and returns every parameter tensor the run holds, each marked trained or frozen,
with LoRA's A/B matrices and peft's ``modules_to_save`` copies added.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field, model_validator

from planner.errors import ProfileError
from planner.profile.architectures import Part, TensorKind, TensorSpec
from planner.profile.catalog import ModelSpec, close_matches
from planner.profile.hf_groups import PROJECTOR_KIND, VISION_TOWER_KIND
from planner.workload.media import (
    AUDIO_POOL_STEP,
    QUERY_TOKENS,
    AudioLayout,
    ImageLayout,
    audio_layout,
    image_layout,
)
from planner.workload.options import LoraOptions, TrainingOptions
from planner.workload.vision import VisionLayout, VisionRule, check_vision

DEFAULT_IMAGE_SIZE = (1344, 1344)
"""A large square photo: with MiniCPM's default 9 slices it uses all of them (3 x 3 + thumbnail,
the reference's own example); with fewer slices it is cut as finely as they allow."""

# Bounds on a workload, far beyond any real fine-tuning run; beyond them a number is a typo, and
# the simulators (which step through every layer and every image crop) would take minutes.
MIN_SEQ_LEN = 2
"""Tokens per sample below which there is no step: the causal-LM loss predicts each token from the
ones before it (labels shifted by one), so one token leaves nothing to predict, and the decoder
simulator refuses it (`decoder.decoder_step_memory`)."""
MAX_SEQ_LEN = 2**24
"""Tokens per sample (16,777,216). The longest context released: Llama 4 Scout's 10M tokens."""
MAX_SAMPLES = 65_536
"""Micro-batch, accumulation steps and global batch, samples. The largest batch published for
transformer training: LAMB's BERT pre-training, 65,536 sequences (You et al., 2019)."""
MAX_IMAGES_PER_SAMPLE = 1024
"""Images (or video frames) in one sample. Qwen2.5-VL caps a video at 768 frames
(``FPS_MAX_FRAMES``); MiniCPM-V 2.6 packs up to 64 frames."""
MAX_IMAGE_SIDE = 65_535
"""Pixels on an image's side: the most a JPEG can hold."""
MAX_SLICE_NUMS = 64
"""MiniCPM's ``max_slice_nums``: its processors use 9 (V 2.6, o 2.6)."""
MAX_CROPS_PER_MICRO_STEP = 4096
"""Vision-tower crops in one micro-step on one GPU, all samples and images together: 400 times a
MiniCPM sample's 10 (9 slices and the thumbnail). The vision simulator steps through every crop,
so this also bounds its time (under a second)."""
MAX_AUDIO_SECONDS = 3600.0
"""Audio per sample: an hour, 120 of Whisper's 30-second pieces and about 97,000 LLM tokens."""


class Workload(BaseModel):
    """What one micro-step processes on one GPU, and accumulation.

    ``seq_len`` is the LLM context per sample (``model_max_length``); image and audio tokens are
    counted inside it, as MiniCPM's fine-tuning script does. The encoders see every crop and
    every second whatever the truncation: the script does not drop images with the text.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    micro_batch: int = Field(default=1, gt=0)
    grad_accum: int = Field(default=1, gt=0)
    seq_len: int = Field(default=1024, gt=0)
    images: int = Field(default=0, ge=0, description="images per sample")
    image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE
    """(width, height) in pixels."""
    max_slice_nums: int = Field(default=9, gt=0)
    audio_seconds: float = Field(default=0.0, ge=0)
    vision: VisionRule | None = None
    """How a vision-language model read from a config.json turns an image into patches and LLM
    tokens (`planner.workload.vision`); None: MiniCPM's slicing."""

    @model_validator(mode="after")
    def _bounded(self) -> Workload:
        """Every count within its bound, and the sample's image and audio tokens inside its context.

        Raises ValueError (pydantic's ValidationError), its message fit to show a user."""
        for flag, value, limit in (("--seq-len", self.seq_len, MAX_SEQ_LEN), ("--micro-batch", self.micro_batch,
                                   MAX_SAMPLES), ("--grad-accum", self.grad_accum, MAX_SAMPLES),
                                   ("--images", self.images, MAX_IMAGES_PER_SAMPLE),
                                   ("--max-slice-nums", self.max_slice_nums, MAX_SLICE_NUMS)):
            if value > limit:
                raise ValueError(f"{flag} {value}: memplan plans for at most {limit:,} (see docs/cli.md, bounds)")
        if self.seq_len < MIN_SEQ_LEN:
            raise ValueError(f"--seq-len {self.seq_len}: a training step needs at least {MIN_SEQ_LEN} tokens per "
                             "sample (the causal-LM loss predicts each token from the ones before it)")
        width, height = self.image_size
        if not (0 < width <= MAX_IMAGE_SIDE and 0 < height <= MAX_IMAGE_SIDE):
            raise ValueError(f"--image-size {width}x{height}: each side must be from 1 to {MAX_IMAGE_SIDE:,} pixels")
        if not (math.isfinite(self.audio_seconds) and self.audio_seconds <= MAX_AUDIO_SECONDS):
            raise ValueError(f"--audio-seconds {self.audio_seconds}: must be a finite number of seconds, "
                             f"at most {MAX_AUDIO_SECONDS:,.0f}")
        layout, audio = self.image_layout(), self.audio()
        if audio is not None and audio.encoder_positions < AUDIO_POOL_STEP:
            raise ValueError(f"--audio-seconds {self.audio_seconds:g}: too short for MiniCPM-o, whose audio pooling "
                             f"needs {AUDIO_POOL_STEP} encoder positions (more than 0.02 s of audio: 3 mel frames)")
        crops = self.micro_batch * self.images * (len(layout.crops) if layout else 0)
        if crops > MAX_CROPS_PER_MICRO_STEP:
            raise ValueError(f"--micro-batch {self.micro_batch} x --images {self.images} x {len(layout.crops)} "
                             f"crops per image = {crops:,} vision crops per micro-step: memplan plans for at most "
                             f"{MAX_CROPS_PER_MICRO_STEP:,} (lower --micro-batch, --images or --max-slice-nums)")
        image_tokens = self.images * layout.llm_tokens if layout else 0
        audio_tokens = audio.llm_tokens if audio else 0
        if image_tokens + audio_tokens > self.seq_len:
            parts = []
            if image_tokens:
                parts.append(f"--images {self.images} take {self.images} x {layout.llm_tokens} = "
                             f"{image_tokens:,} LLM tokens")
            if audio_tokens:
                parts.append(f"--audio-seconds {self.audio_seconds:g} takes {audio_tokens:,} LLM tokens")
            raise ValueError(f"{' and '.join(parts)}, more than --seq-len {self.seq_len:,}: image and audio "
                             "tokens are part of each sample's context (raise --seq-len, or lower the media)")
        return self

    def image_layout(self, query_tokens: int = QUERY_TOKENS) -> ImageLayout | VisionLayout | None:
        """How each image is cut (the model family's rule, else MiniCPM slicing), or None without images."""
        if not self.images:
            return None
        if self.vision is not None:
            return self.vision.layout(*self.image_size)
        return image_layout(*self.image_size, self.max_slice_nums, query_tokens)

    def audio(self) -> AudioLayout | None:
        """What each sample's audio becomes, or None without audio."""
        return audio_layout(self.audio_seconds) if self.audio_seconds else None


def check_media(model: ModelSpec, options: TrainingOptions, workload: Workload) -> None:
    """Refuse images without a vision tower, or audio without an audio encoder, in the run.

    Raises:
        ProfileError: names the option and the model.
    """
    built = {g.name for g in model.groups if g.name not in options.without}
    check_vision(model, built, workload.images, workload.vision)
    if workload.audio_seconds and not any(g.kind == "whisper_encoder" and g.name in built for g in model.groups):
        raise ProfileError(f"--audio-seconds {workload.audio_seconds:g}: {model.name} has no audio encoder "
                           "in this run")


class StepInput(StrEnum):
    """What a group runs on in one training step."""

    TEXT = "the text"
    IMAGES = "the images"
    AUDIO = "the audio"
    DUMMY_IMAGE = "a dummy 224x224 image when a sample has none"
    DUMMY_AUDIO = "a dummy 1 s audio when a sample has none"
    UNKNOWN_KIND = "an input memplan does not know (assumed to run)"


MINICPM_VISION_KINDS = ("siglip_vision", "resampler")
MINICPM_AUDIO_KINDS = ("whisper_encoder", "mlp_projector")
LOCAL_MEDIA_KINDS = ("module", VISION_TOWER_KIND, PROJECTOR_KIND)
"""Groups of a local config.json beside its LLM: a vision-language model runs its tower and
projector only on a sample's images (LlavaModel, Qwen2VLModel... skip them without
``pixel_values``)."""
NOT_IN_STEP_KINDS = ("chattts",)
"""MiniCPM-o's TTS head: its training ``forward`` never calls it (modeling_minicpmo.py, ``forward``)."""


def step_input(kind: str, workload: Workload) -> StepInput | None:
    """What a group of ``kind`` runs on in one training step, or None when it does not run.

    MiniCPM's training forward runs its vision tower and resampler on a dummy 224x224 image when
    the sample has no image, and (with audio built) Whisper and the audio projection on a dummy
    100-frame mel input when it has no audio, so that their gradients exist
    (modeling_minicpmo.py ``get_vllm_embedding`` and ``get_audio_embedding``, ``self.training``
    branches; the copy cited in profiles/models/minicpm.toml). A ``module`` group (a local
    config.json's vision tower or projector) runs only on images; a kind this table does not know
    is assumed to run.
    """
    if kind == "decoder":
        return StepInput.TEXT
    if kind in MINICPM_VISION_KINDS:
        return StepInput.IMAGES if workload.images else StepInput.DUMMY_IMAGE
    if kind in MINICPM_AUDIO_KINDS:
        return StepInput.AUDIO if workload.audio_seconds else StepInput.DUMMY_AUDIO
    if kind in LOCAL_MEDIA_KINDS:
        return StepInput.IMAGES if workload.images else None
    if kind in NOT_IN_STEP_KINDS:
        return None
    return StepInput.UNKNOWN_KIND


class Origin:
    """Why a tensor exists in the run."""

    BASE = "base"  # the model's own parameter
    LORA = "lora"  # a LoRA A or B matrix
    COPY = "copy"  # peft modules_to_save: a trained copy beside the frozen original


@dataclass(frozen=True, slots=True)
class Param:
    """One parameter tensor of the run, with where it sits and whether it is trained."""

    group: str
    tensor: TensorSpec
    trainable: bool
    origin: str = Origin.BASE
    numel: int = field(init=False, repr=False, compare=False)
    """Number of elements (the tensor's)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "numel", self.tensor.numel)


def parse_selection(names: Iterable[str], model: ModelSpec, flag: str) -> set[tuple[str, Part | None]]:
    """``llm`` -> (llm, None) meaning the whole group; ``llm.embed_tokens`` -> (llm, EMBED_TOKENS)."""
    out: set[tuple[str, Part | None]] = set()
    known = {g.name: g for g in model.groups}
    choices = list(known) + [f"{g.name}.{p.value}" for g in model.groups if g.kind == "decoder" for p in g.parts]
    for raw in names:
        name = raw.strip()
        if not name:
            continue
        group_name, _, part_name = name.partition(".")
        group = known.get(group_name)
        if group is None:
            raise ProfileError(f"{flag}: model {model.name!r} has no group {name!r}; {close_matches(name, choices)}")
        if not part_name:
            out.add((group_name, None))
            continue
        try:
            part = Part(part_name)
        except ValueError:
            part = None
        if part is None or (part not in group.parts and not (part is Part.LM_HEAD and group.tied_lm_head)):
            raise ProfileError(
                f"{flag}: group {group_name!r} has no part {part_name!r}; {close_matches(name, choices)}"
            )
        out.add((group_name, part))
    return out


def _selected(sel: set[tuple[str, Part | None]], group: str, part: Part) -> bool:
    return (group, None) in sel or (group, part) in sel


def _show(group: str, part: Part | None) -> str:
    return f"{group}.{part.value}" if part else group


def _check_selections(train: set[tuple[str, Part | None]] | None, freeze: set[tuple[str, Part | None]],
                      without: set[str]) -> None:
    """Refuse a group or part both trained and frozen, or trained but never built."""
    for group, part in sorted(train or (), key=lambda s: (s[0], s[1] or "")):
        what = _show(group, part)
        if group in without:
            raise ProfileError(f"--train {what} and --without {group}: {group} is not built in this run")
        if (group, None) in freeze:
            frozen = (group, None)
        elif part is not None and (group, part) in freeze:
            frozen = (group, part)
        else:
            continue  # freezing a part of a trained group is how one trains the rest
        raise ProfileError(f"--train {what} and --freeze {_show(*frozen)}: {what} cannot be both trained and "
                           "frozen (name it in one of them)")


def untrained(params: Iterable[Param], selection: set[tuple[str, Part | None]]) -> list[str]:
    """The selected groups/parts not trained fully: some tensor of theirs that can train is
    neither trained itself nor has a trained copy (LoRA adapters do not count)."""
    params = list(params)
    full = {(p.group, p.tensor.name) for p in params if p.trainable and p.origin != Origin.LORA}
    out = []
    for group, part in sorted(selection, key=lambda s: (s[0], s[1] or "")):
        tensors = [p.tensor for p in params if p.origin == Origin.BASE and p.group == group
                   and (part is None or p.tensor.part is part) and p.tensor.requires_grad]
        if not tensors or any((group, t.name) not in full for t in tensors):
            out.append(_show(group, part))
    return out


def _lora_matches(t: TensorSpec, lora: LoraOptions) -> bool:
    if t.kind is not TensorKind.LINEAR:
        return False
    if "all-linear" in lora.targets:  # peft: every linear but the output layer
        return t.part is not Part.LM_HEAD
    return t.module in lora.targets


_INVENTORIES: dict[tuple, tuple[ModelSpec, tuple[Param, ...]]] = {}


def trainable_inventory(model: ModelSpec, options: TrainingOptions) -> list[Param]:
    """Every parameter tensor the run holds, marked trained or frozen (see `_inventory`).

    Remembered per model and selection: the search asks for the same inventory under many
    engines, stages and offloads.
    """
    key = (id(model), options.train, options.freeze, options.without, options.lora)
    hit = _INVENTORIES.get(key)
    if hit is None or hit[0] is not model:
        if len(_INVENTORIES) > 256:
            _INVENTORIES.clear()
        hit = (model, tuple(_inventory(model, options)))
        _INVENTORIES[key] = hit
    return list(hit[1])


def _inventory(model: ModelSpec, options: TrainingOptions) -> list[Param]:
    """Every parameter tensor the run holds, marked trained or frozen.

    Rules (one per flag, applied in this order):
      * ``without``: those groups are never built; they hold nothing.
      * ``train``: when given, only those groups/parts train; otherwise all do (no LoRA) or none
        do (LoRA: peft freezes the base model).
      * ``freeze``: those groups/parts are frozen.
      * LoRA: the LoRA groups' base weights are frozen and every targeted linear gets A (r x in)
        and B (out x r), trained. Under peft every other trained part becomes a
        ``modules_to_save`` entry: the original stays, frozen, and a trained copy is added.

    Raises:
        ProfileError: a selection names a group or part the model does not have, or LoRA finds
            no linear to adapt.
    """
    without = {g for g, _ in parse_selection(options.without, model, "--without")}
    train = parse_selection(options.train, model, "--train") if options.train is not None else None
    freeze = parse_selection(options.freeze, model, "--freeze")
    _check_selections(train, freeze, without)
    lora = options.lora
    lora_groups: set[str] = set()
    if lora is not None:
        lora_groups = set(lora.groups) or {g.name for g in model.groups if g.kind == "decoder"}
        unknown = lora_groups - {g.name for g in model.groups}
        if unknown:
            name = sorted(unknown)[0]
            hint = close_matches(name, [g.name for g in model.groups])
            raise ProfileError(f"--lora-groups: no group {name!r}; {hint}")
        lora_groups -= without

    params: list[Param] = []
    adapters = 0
    for group in model.groups:
        if group.name in without:
            continue
        for t in group.tensors:
            if train is None:
                full = lora is None
            else:
                full = _selected(train, group.name, t.part)
            if _selected(freeze, group.name, t.part) or not t.requires_grad:
                full = False
            if lora is None:
                params.append(Param(group.name, t, full))
                continue
            params.append(Param(group.name, t, False))
            if full:
                params.append(Param(group.name, t, True, Origin.COPY))
            if group.name in lora_groups and _lora_matches(t, lora):
                out_f, in_f = t.shape
                stem = t.name.removesuffix(".weight")
                params.append(
                    Param(
                        group.name,
                        TensorSpec(f"{stem}.lora_A.weight", (lora.rank, in_f), TensorKind.LINEAR, t.part),
                        True,
                        Origin.LORA,
                    )
                )
                params.append(
                    Param(
                        group.name,
                        TensorSpec(f"{stem}.lora_B.weight", (out_f, lora.rank), TensorKind.LINEAR, t.part),
                        True,
                        Origin.LORA,
                    )
                )
                adapters += 1
    if lora is not None and adapters == 0:
        where = ", ".join(sorted(lora_groups)) or "any group"
        raise ProfileError(f"--lora-targets {','.join(lora.targets)} matches no linear layer in {where}")
    if not any(p.trainable for p in params):
        given = [f"--{flag} {','.join(names)}" for flag, names in
                 (("train", options.train), ("freeze", options.freeze), ("without", options.without)) if names]
        raise ProfileError(f"nothing is trained: {' '.join(given) or 'the selections'} leave no parameter of "
                           f"{model.name} to train (train a group, or add --lora-rank)")
    return params
