"""Images and audio as MiniCPM turns them into encoder inputs and LLM tokens.

Part of the workload stage. Mirrors MiniCPM-V 2.5/2.6 and MiniCPM-o 2.6's image slicing
(``image_processing_minicpmv.py``: ``get_sliced_grid``, ``find_best_resize``,
``get_refine_size``) and the fine-tuning script's placeholders (``finetune/dataset.py``), and
MiniCPM-o's audio placeholder (``processing_minicpmo.py``: ``get_audio_placeholder``). Facts and
worked examples: shared/reference/minicpm-o.md; derivations: docs/multimodal.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SCALE_RESOLUTION = 448  # slice_config.scale_resolution: a crop is about 448 x 448 pixels
PATCH_SIZE = 14  # SigLIP patch: a 448 x 448 crop is 32 x 32 = 1024 patches
QUERY_TOKENS = 64  # resampler queries: LLM tokens per crop (MiniCPM-V 2.6 / o 2.6; 96 for Llama3-V 2.5)
IMAGE_MARKERS = 2  # <image> ... </image> (and <slice> ... </slice>) around each crop's queries
IMAGE_ID_TOKENS = 3  # <image_id> N </image_id>, only in front of a sliced image (finetune/dataset.py)
VISION_BATCH_SIZE = 16  # MiniCPM's vision_batch_size: crops through the vision tower per chunk

MEL_FRAMES_PER_S = 100  # Whisper fbank: hop 160 samples at 16 kHz
AUDIO_POOL_STEP = 2  # MiniCPM-o audio_pool_step: AvgPool1d over encoder positions
AUDIO_CHUNK_S = 1  # chunk_length: <|audio_start|> ... <|audio_end|> markers per second of audio
AUDIO_MARKERS = 2
WHISPER_MAX_S = 30  # Whisper positions: 1500 = 30 s; longer audio is cut into 30 s pieces


@dataclass(frozen=True)
class ImageLayout:
    """How one image is cut: crops (width, height in pixels) and the LLM tokens it becomes.

    Attributes:
        grid: (cols, rows) of slices, or None when the image is not sliced.
        crops: every crop's (width, height): the thumbnail first, then the slices.
        llm_tokens: placeholder tokens in the LLM sequence, markers included.
    """

    grid: tuple[int, int] | None
    crops: tuple[tuple[int, int], ...]
    llm_tokens: int

    @property
    def patches(self) -> int:
        """SigLIP patches over all crops (the vision tower's sequence lengths summed)."""
        return sum((w // PATCH_SIZE) * (h // PATCH_SIZE) for w, h in self.crops)

    @property
    def max_crop_patches(self) -> int:
        """The longest crop, in patches (the padded sequence length of a vision batch)."""
        return max((w // PATCH_SIZE) * (h // PATCH_SIZE) for w, h in self.crops)


def sliced_grid(width: int, height: int, max_slice_nums: int) -> tuple[int, int] | None:
    """``get_sliced_grid``: the (cols, rows) grid whose log aspect ratio is nearest the image's,
    among slice counts {multiple-1, multiple, multiple+1}; None when no slicing."""
    log_ratio = math.log(width / height)
    multiple = min(math.ceil(width * height / SCALE_RESOLUTION**2), max_slice_nums)
    if multiple <= 1:
        return None
    best, best_err = (1, 1), float("inf")
    for n in (multiple - 1, multiple, multiple + 1):
        if n == 1 or n > max_slice_nums:
            continue
        for m in range(1, n + 1):
            if n % m == 0:
                err = abs(log_ratio - math.log(m / (n // m)))
                if err < best_err:
                    best, best_err = (m, n // m), err
    return best


def _ensure_divide(length: float, patch: int) -> int:
    return max(round(length / patch) * patch, patch)


def best_resize(width: float, height: float, allow_upscale: bool) -> tuple[int, int]:
    """``find_best_resize``: about 448^2 pixels at the same aspect ratio, sides multiples of 14;
    images already smaller are only rounded unless ``allow_upscale``."""
    if width * height > SCALE_RESOLUTION**2 or allow_upscale:
        r = width / height
        height = int(SCALE_RESOLUTION / math.sqrt(r))
        width = int(height * r)
    return _ensure_divide(width, PATCH_SIZE), _ensure_divide(height, PATCH_SIZE)


def image_layout(width: int, height: int, max_slice_nums: int, query_tokens: int = QUERY_TOKENS) -> ImageLayout:
    """Crops and LLM tokens of one image (``slice_image`` and finetune/dataset.py's placeholder).

    Raises:
        ValueError: non-positive sizes or slice count.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if max_slice_nums < 1:
        raise ValueError(f"max_slice_nums must be at least 1, got {max_slice_nums}")
    per_crop = query_tokens + IMAGE_MARKERS
    grid = sliced_grid(width, height, max_slice_nums)
    if grid is None:
        return ImageLayout(None, (best_resize(width, height, allow_upscale=True),), per_crop)
    cols, rows = grid
    thumb = best_resize(width, height, allow_upscale=False)
    # get_refine_size: each slice is best_resize of (width/cols, height/rows), upscaling allowed.
    slice_size = best_resize(
        _ensure_divide(width, cols) / cols, _ensure_divide(height, rows) / rows, allow_upscale=True
    )
    crops = (thumb,) + (slice_size,) * (cols * rows)
    tokens = IMAGE_ID_TOKENS + per_crop + cols * rows * per_crop + (rows - 1)  # rows joined by "\n"
    return ImageLayout(grid, crops, tokens)


@dataclass(frozen=True)
class AudioLayout:
    """What some seconds of audio become.

    Attributes:
        encoder_positions: Whisper encoder positions (after its stride-2 conv), all pieces.
        pieces: 30-second pieces the encoder runs on.
        llm_tokens: placeholder tokens in the LLM sequence, chunk markers included.
    """

    encoder_positions: int
    pieces: int
    llm_tokens: int


def audio_layout(seconds: float) -> AudioLayout:
    """``get_audio_placeholder`` with chunked input (one chunk per second): 100 mel frames/s,
    stride-2 conv -> 50 positions/s, average pool 2 -> 25 embeddings/s, plus 2 markers per
    chunk: about 27 LLM tokens per second.

    Raises:
        ValueError: negative duration.
    """
    if seconds < 0:
        raise ValueError(f"audio seconds must not be negative, got {seconds}")
    if seconds == 0:
        return AudioLayout(0, 0, 0)
    frames = math.ceil(seconds * MEL_FRAMES_PER_S)
    positions = (frames - 1) // 2 + 1
    embeds = (positions - AUDIO_POOL_STEP) // AUDIO_POOL_STEP + 1
    chunk_frames = AUDIO_CHUNK_S * MEL_FRAMES_PER_S
    chunk_embeds = (((chunk_frames - 1) // 2 + 1) - AUDIO_POOL_STEP) // AUDIO_POOL_STEP + 1
    chunks = -(-embeds // chunk_embeds)
    return AudioLayout(positions, math.ceil(seconds / WHISPER_MAX_S), embeds + AUDIO_MARKERS * chunks)
