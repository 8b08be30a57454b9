"""The reference setup and MiniCPM's group sets: what memplan plans when no model is named, and the
media a sample carries by default. Part of the workload stage; every command uses these.
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.errors import ProfileError
from planner.profile.catalog import ModelSpec
from planner.workload.vision import check_vision, vision_rule

DEFAULT_MODEL = "minicpm-o-2.6"
"""The model planned when ``--model`` is not given (the reference report's)."""

DEFAULT_GPUS = "2x3090"
"""The cluster planned when ``--gpus`` is not given and no NVIDIA GPU is detected."""

MINICPM_BUILDS = frozenset({"llm", "vpm", "resampler"})
"""The groups MiniCPM-o's own ``finetune.py`` builds (``init_audio=False``, ``init_tts=False``):
its writer and the explain rules recognise a MiniCPM run by them."""

MINICPM_NOT_BUILT = ("apm", "audio_projection_layer", "tts")
"""MiniCPM-o's groups its ``finetune.py`` never builds: the audio encoder, its projector, the TTS."""

REFERENCE_FREEZE = ("vpm",)
"""The reference report freezes the vision tower (``--tune_vision false``)."""

REFERENCE_GROUPS = {"without": MINICPM_NOT_BUILT, "freeze": REFERENCE_FREEZE}
"""The reference setup's groups as TrainingOptions fields."""

REFERENCE_NOTE = (f"no --model: planning the reference setup: {DEFAULT_MODEL} as its finetune.py builds it"
                  " (without apm, audio_projection_layer, tts), vpm frozen, LLM and resampler trained,"
                  " one image per sample cut into at most 1 slice")


@dataclass(frozen=True)
class Selection:
    """What a command plans: the model's name and the groups it trains, freezes and leaves out."""

    model: str
    train: tuple[str, ...] | None
    freeze: tuple[str, ...]
    without: tuple[str, ...]
    max_slice_nums: int | None
    note: str | None = None


def select(model: str | None, train: tuple[str, ...] | None, freeze: tuple[str, ...] | None,
           without: tuple[str, ...] | None, lora_rank: int | None, max_slice_nums: int | None) -> Selection:
    """The request as given, or, when nothing about the model was given, the reference setup
    (shared/reference/minicpm-o.md): MiniCPM-o 2.6 as its finetune.py builds it, the vision tower
    frozen, one image cut into at most one slice; with a note saying so."""
    if model is None and train is None and freeze is None and without is None and lora_rank is None:
        return Selection(DEFAULT_MODEL, None, REFERENCE_FREEZE, MINICPM_NOT_BUILT,
                         1 if max_slice_nums is None else max_slice_nums, REFERENCE_NOTE)
    return Selection(model or DEFAULT_MODEL, train, freeze or (), without or (), max_slice_nums)


def minicpm_not_built(spec: ModelSpec) -> tuple[str, ...]:
    """Of ``spec``'s groups, those MiniCPM's finetune.py never builds."""
    return tuple(g.name for g in spec.groups if g.name in MINICPM_NOT_BUILT)


def default_images(spec: ModelSpec, without: tuple[str, ...], images: int | None,
                   audio_seconds: float = 0.0) -> int:
    """Images per sample: one where a vision tower memplan can cut images for is built, else none;
    media a run cannot take refused.

    Raises:
        ProfileError: images without a built vision tower, or audio without a built audio encoder.
    """
    built = {g.name for g in spec.groups} - set(without)
    rule = vision_rule(spec, without)
    has_vision = rule is not None or any(g.kind == "siglip_vision" and g.name in built for g in spec.groups)
    has_audio = any(g.kind == "whisper_encoder" and g.name in built for g in spec.groups)
    if images is None:
        images = 1 if has_vision else 0
    if images and not has_vision:
        check_vision(spec, built, images, rule)  # says which tower has no rule
        raise ProfileError(f"--images {images}: {spec.name} has no vision tower in this run")
    if audio_seconds and not has_audio:
        raise ProfileError(f"--audio-seconds: {spec.name} has no audio encoder in this run")
    return images
