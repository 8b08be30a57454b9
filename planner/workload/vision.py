"""Images as the Hugging Face vision-language families turn them into vision-tower patches and LLM
tokens, each by its own processor's rule (MiniCPM's slicing is `media`).

Part of the workload stage. A model read from a local config.json carries its family's rule in
its vision tower group's config (``image_rule``, written by `planner.profile.hf_groups` from the
config and the folder's preprocessor_config.json); `vision_rule` reads it back, and
`Workload.image_layout` asks the rule what one image becomes. Each rule cites the transformers
5.25 code it mirrors. Derivations and worked examples: docs/multimodal.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from planner.errors import ProfileError
from planner.profile.catalog import ModelSpec
from planner.profile.hf_groups import VISION_TOWER_KIND
from planner.workload.media import ImageLayout

MAX_RULE_SIDE = 2**16
"""Pixels on a processor's side or patch (the most a JPEG holds, as `MAX_IMAGE_SIDE`)."""
MAX_RULE_PIXELS = 2**32
"""A processor's pixel budget per image (Qwen2.5-VL's max_pixels is 12,845,056)."""
QWEN_MAX_ASPECT = 200
"""``smart_resize`` refuses a longer side over 200 times the shorter (image_processing_qwen2_vl.py)."""
QWEN_MARKERS = 2
"""``<|vision_start|>`` and ``<|vision_end|>`` around each image's ``<|image_pad|>`` tokens (Qwen2-VL's
chat template; processing_qwen2_vl.py expands only the pad token)."""
GEMMA3_MARKERS = 4
"""processing_gemma3.py: ``full_image_sequence = "\\n\\n" + boi + image tokens + eoi + "\\n\\n"``: the
begin and end of image tokens and a ``"\\n\\n"`` token on each side."""
IDEFICS3_MAX_SIDE = 4096
"""``MAX_IMAGE_SIZE`` in image_processing_idefics3.py: no resized side exceeds 4096 pixels."""


class _Rule(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    processor: str = Field(default="transformers defaults", max_length=200)
    """Where the processor's values came from (``preprocessor_config.json``, or the transformers
    image processor's class defaults)."""


class LlavaRule(_Rule):
    """LLaVA-1.5: a fixed crop, one LLM token per patch.

    The CLIP image processor resizes the shortest edge to the crop size and center-crops it
    (image_processing_clip.py), whatever the image; processing_llava.py gives each image
    ``(crop // patch) ** 2 + num_additional_image_tokens (1, the CLS)`` tokens, less one when
    ``vision_feature_select_strategy == "default"`` drops the CLS: 576 at 336 px.
    """

    family: Literal["llava"] = "llava"
    crop_size: int = Field(gt=0, le=MAX_RULE_SIDE)
    patch_size: int = Field(gt=0, le=MAX_RULE_SIDE)
    drop_cls: bool = True

    def layout(self, width: int, height: int) -> VisionLayout:
        """One crop of ``crop_size`` pixels; the tower sees its patches and the CLS."""
        patches = (self.crop_size // self.patch_size) ** 2
        tokens = patches + 1 - (1 if self.drop_cls else 0)
        side = self.crop_size
        return VisionLayout(((side, side),), (patches + 1,), tokens,
                            f"LLaVA: every image resized and center-cropped to {side}x{side} ({self.processor}): "
                            f"{patches + 1} vision positions ({patches} patches + CLS), {tokens} LLM tokens")


class QwenVLRule(_Rule):
    """Qwen2-VL, Qwen2.5-VL and Qwen3-VL: dynamic resolution.

    ``smart_resize`` (image_processing_qwen2_vl.py) rounds each side to a multiple of
    ``patch_size * merge_size`` (28 pixels for 14-pixel patches merged 2x2) and rescales the image
    into ``[min_pixels, max_pixels]``. The tower sees every patch (a still image is one temporal
    patch); the merger joins 2x2 patches into one LLM token (processing_qwen2_vl.py:
    ``grid_thw.prod() // merge_size ** 2``), with ``<|vision_start|>``/``<|vision_end|>`` around them.
    """

    family: Literal["qwen2_vl"] = "qwen2_vl"
    patch_size: int = Field(gt=0, le=MAX_RULE_SIDE)
    merge_size: int = Field(gt=0, le=64)
    min_pixels: int = Field(gt=0, le=MAX_RULE_PIXELS)
    max_pixels: int = Field(gt=0, le=MAX_RULE_PIXELS)

    def layout(self, width: int, height: int) -> VisionLayout:
        """The image at its ``smart_resize`` size, one crop."""
        h, w = self.smart_resize(height, width)
        patches = (h // self.patch_size) * (w // self.patch_size)
        tokens = patches // self.merge_size**2 + QWEN_MARKERS
        return VisionLayout(((w, h),), (patches,), tokens,
                            f"Qwen-VL: {width}x{height} resized to {w}x{h} (pixels {self.min_pixels:,} to "
                            f"{self.max_pixels:,}, {self.processor}): {patches:,} patches of {self.patch_size} px, "
                            f"{tokens:,} LLM tokens (merged {self.merge_size}x{self.merge_size}, 2 markers)")

    def smart_resize(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) in pixels, as transformers' ``smart_resize`` computes them.

        Raises:
            ValueError: an aspect ratio over 200, which the processor refuses.
        """
        if max(height, width) / min(height, width) > QWEN_MAX_ASPECT:
            raise ValueError(f"--image-size {width}x{height}: Qwen-VL's processor refuses an aspect ratio over "
                             f"{QWEN_MAX_ASPECT}")
        factor = self.patch_size * self.merge_size
        h_bar = round(height / factor) * factor
        w_bar = round(width / factor) * factor
        if h_bar * w_bar > self.max_pixels:
            beta = math.sqrt((height * width) / self.max_pixels)
            h_bar = max(factor, math.floor(height / beta / factor) * factor)
            w_bar = max(factor, math.floor(width / beta / factor) * factor)
        elif h_bar * w_bar < self.min_pixels:
            beta = math.sqrt(self.min_pixels / (height * width))
            h_bar = math.ceil(height * beta / factor) * factor
            w_bar = math.ceil(width * beta / factor) * factor
        return h_bar, w_bar


class Gemma3Rule(_Rule):
    """Gemma 3: every image resized to the tower's square input (896 px, image_processing_gemma3.py,
    pan-and-scan off by default), its 64x64 patches pooled to ``mm_tokens_per_image`` (256) tokens
    (Gemma3MultiModalProjector), framed as processing_gemma3.py's ``full_image_sequence``."""

    family: Literal["gemma3"] = "gemma3"
    image_size: int = Field(gt=0, le=MAX_RULE_SIDE)
    patch_size: int = Field(gt=0, le=MAX_RULE_SIDE)
    tokens_per_image: int = Field(gt=0, le=2**20)

    def layout(self, width: int, height: int) -> VisionLayout:
        """One crop of ``image_size`` pixels."""
        side = self.image_size
        patches = (side // self.patch_size) ** 2
        tokens = self.tokens_per_image + GEMMA3_MARKERS
        return VisionLayout(((side, side),), (patches,), tokens,
                            f"Gemma 3: every image resized to {side}x{side} ({self.processor}): {patches:,} patches, "
                            f"{self.tokens_per_image} image tokens + 4 markers = {tokens} LLM tokens")


class Idefics3Rule(_Rule):
    """Idefics3: the image's longest edge resized to ``longest_edge`` (1456 = 4 x 364), then cut into
    ``image_size`` tiles (364 px) plus the whole image as one more tile
    (image_processing_idefics3.py, ``get_number_of_image_patches``). Each tile's patches are
    pixel-shuffled by ``scale_factor`` (2: 676 patches -> 169 tokens); processing_idefics3.py's
    ``replace_image_token`` frames each tile with ``<fake_token_around_image>`` and a
    ``<row_i_col_j>`` tag, ends each row with ``\\n``, and adds the global tile last."""

    family: Literal["idefics3"] = "idefics3"
    image_size: int = Field(gt=0, le=MAX_RULE_SIDE)
    patch_size: int = Field(gt=0, le=MAX_RULE_SIDE)
    scale_factor: int = Field(gt=0, le=64)
    longest_edge: int = Field(gt=0, le=MAX_RULE_SIDE)
    split: bool = True

    def layout(self, width: int, height: int) -> VisionLayout:
        """Rows x cols tiles and the global tile, each ``image_size`` square."""
        rows, cols = self.grid(width, height)
        tile = self.image_size
        per_tile = (tile // self.patch_size) ** 2
        seq = per_tile // self.scale_factor**2  # image_seq_len
        # global tile: fake + <global-img> + seq + fake; each split tile: fake + <row_col> + seq;
        # a "\n" after each row and one more before the global tile (counted as written: the
        # tokenizer may join the last two into one "\n\n" token).
        tokens = seq + 3 + (rows * cols * (seq + 2) + rows + 1 if rows else 0)
        crops = ((tile, tile),) * (rows * cols + 1)
        grid = f"{cols}x{rows} tiles + the global tile" if rows else "one tile (not split)"
        return VisionLayout(crops, (per_tile,) * len(crops), tokens,
                            f"Idefics3: {width}x{height} as {grid} of {tile}x{tile} ({self.processor}): "
                            f"{per_tile * len(crops):,} patches, {tokens:,} LLM tokens", (cols, rows) if rows else None)

    def grid(self, width: int, height: int) -> tuple[int, int]:
        """(rows, cols) of split tiles, (0, 0) when the image is not split (``get_number_of_image_patches``)."""
        if not self.split:
            return 0, 0
        h, w = _rescale_to_max_len(height, width, self.longest_edge)
        h, w = _scale_below(h, w, IDEFICS3_MAX_SIDE)
        tile = self.image_size
        rh, rw = math.ceil(h / tile) * tile, math.ceil(w / tile) * tile
        if rh > tile or rw > tile:
            return math.ceil(rh / tile), math.ceil(rw / tile)
        return 0, 0


def _rescale_to_max_len(height: int, width: int, max_len: int) -> tuple[int, int]:
    """``_resize_output_size_rescale_to_max_len``: the longest edge to ``max_len``, the other to an
    even number of pixels at the same aspect ratio."""
    aspect = width / height
    if width >= height:
        width, height = max_len, int(max_len / aspect)
        height += height % 2
    else:
        height, width = max_len, int(max_len * aspect)
        width += width % 2
    return max(height, 1), max(width, 1)


def _scale_below(height: int, width: int, max_len: int) -> tuple[int, int]:
    """``_resize_output_size_scale_below_upper_bound``: no side over ``max_len``."""
    aspect = width / height
    if width >= height and width > max_len:
        width, height = max_len, int(max_len / aspect)
    elif height > width and height > max_len:
        height, width = max_len, int(max_len * aspect)
    return max(height, 1), max(width, 1)


VisionRule = Annotated[LlavaRule | QwenVLRule | Gemma3Rule | Idefics3Rule, Field(discriminator="family")]
"""One family's image rule (what a `Workload` carries for a model read from a config.json)."""

RULE_FAMILIES = ("llava", "qwen2_vl", "gemma3", "idefics3")
"""The families with an image rule, by their ``family`` name."""

_RULE = TypeAdapter(VisionRule)


@dataclass(frozen=True)
class VisionLayout:
    """What one image becomes in a vision-language family.

    Attributes:
        crops: every crop's (width, height) in pixels, as the vision tower sees them.
        crop_positions: each crop's sequence length in the tower (patches, and the CLS where
            the tower has one).
        llm_tokens: placeholder tokens in the LLM sequence, markers included.
        text: one line saying how it was cut, with the numbers.
        grid: (cols, rows) of tiles where the image is split, else None.
    """

    crops: tuple[tuple[int, int], ...]
    crop_positions: tuple[int, ...]
    llm_tokens: int
    text: str
    grid: tuple[int, int] | None = None

    @property
    def patches(self) -> int:
        """The tower's positions over all crops of the image."""
        return sum(self.crop_positions)

    @property
    def max_crop_patches(self) -> int:
        """The longest crop, in tower positions."""
        return max(self.crop_positions)


def parse_rule(data: object, where: str) -> VisionRule:
    """A rule from its JSON form (a group config's ``image_rule``).

    Raises:
        ProfileError: not a rule of a known family, or a value out of bounds; names ``where``.
    """
    try:
        return _RULE.validate_python(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise ProfileError(f"{where}: image rule {loc}: {err['msg']}") from None


def vision_groups(model: ModelSpec, without: Iterable[str] = ()) -> list[str]:
    """The model's vision tower groups read from a config.json that the run builds."""
    out = set(without)
    return [g.name for g in model.groups if g.kind == VISION_TOWER_KIND and g.name not in out]


def vision_rule(model: ModelSpec, without: Iterable[str] = ()) -> VisionRule | None:
    """The image rule of the model's built vision tower, or None (no such tower, or a family
    memplan has no rule for: `check_vision` then refuses images).

    Raises:
        ProfileError: the stored rule is malformed.
    """
    for name in vision_groups(model, without):
        data = model.group(name).config.get("image_rule")
        if data is not None:
            return parse_rule(data, f"{model.name}, group {name}")
    return None


def check_vision(model: ModelSpec, built: set[str], images: int, rule: VisionRule | None) -> None:
    """Refuse images this model cannot take with this rule: a tower without a rule memplan knows,
    a rule the model's tower does not have, or no tower at all.

    Raises:
        ProfileError: names the model and what is missing.
    """
    towers = [g for g in model.groups if g.kind == VISION_TOWER_KIND and g.name in built]
    minicpm = any(g.kind == "siglip_vision" and g.name in built for g in model.groups)
    if rule is not None and not towers:
        raise ProfileError(f"--images {images}: {model.name} has no vision tower with a {rule.family} image rule "
                           "in this run")
    if not images or rule is not None or minicpm:
        return
    if towers:
        family = towers[0].config.get("model_type")
        raise ProfileError(f"--images {images}: memplan has no image-token rule for {model.name}'s vision tower "
                           f"{towers[0].name}{f' ({family})' if family else ''}; it has rules for "
                           f"{', '.join(RULE_FAMILIES)} and MiniCPM's profiles (--images 0 plans text-only samples)")
    raise ProfileError(f"--images {images}: {model.name} has no vision tower in this run")


def image_note(images: int, layout: VisionLayout | ImageLayout | None) -> str | None:
    """One line saying what each image became under a family's rule, for the estimate's notes;
    None without images or for MiniCPM's slicing (its layout is in docs/multimodal.md)."""
    if not images or not isinstance(layout, VisionLayout):
        return None
    return f"images: {images} per sample; {layout.text}"
