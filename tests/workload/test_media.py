"""MiniCPM image slicing and audio tokens: the worked examples of shared/reference/minicpm-o.md."""

from __future__ import annotations

import pytest

from planner.workload.media import audio_layout, image_layout, sliced_grid


@pytest.mark.parametrize(
    ("size", "max_slices", "grid", "crops", "patches", "tokens"),
    [
        # max_slice_nums 1: one crop of about 448^2 (about 1024 patches), 66 tokens for any image
        ((640, 480), 1, None, 1, 1036, 66),
        ((4000, 3000), 1, None, 1, 1036, 66),
        # 640x480, max 9: grid 2x1, 3 crops, about 3064 patches, about 201 tokens
        ((640, 480), 9, (2, 1), 3, 3064, 201),
        # 1344x1344 or larger square: grid 3x3, 10 crops, 10240 patches, about 665 tokens
        ((1344, 1344), 9, (3, 3), 10, 10240, 665),
        ((2688, 2688), 9, (3, 3), 10, 10240, 665),
        # a small image is upscaled to one crop
        ((300, 200), 9, None, 1, 1014, 66),
    ],
)
def test_reference_examples(size, max_slices, grid, crops, patches, tokens):
    layout = image_layout(*size, max_slices)
    assert layout.grid == grid
    assert len(layout.crops) == crops
    assert layout.patches == patches
    assert layout.llm_tokens == tokens
    assert all(w % 14 == 0 and h % 14 == 0 for w, h in layout.crops)


def test_grid_follows_aspect_ratio():
    # 16:9 full HD with 9 slices: ratio 10.3 -> multiple 9 -> candidates 8, 9; 4x2 is nearest 16:9
    assert sliced_grid(1920, 1080, 9) == (4, 2)
    assert sliced_grid(1080, 1920, 9) == (2, 4)
    # a 2-slice cap never yields a grid of more than 2 slices
    assert sliced_grid(1920, 1080, 2) == (2, 1)


def test_audio_rate():
    # 100 mel frames/s -> 50 encoder positions/s -> 25 embeddings/s + 2 markers a second = 27 tokens/s
    assert audio_layout(1).llm_tokens == 27
    assert audio_layout(10) == audio_layout(10.0)
    a = audio_layout(30)
    assert (a.encoder_positions, a.pieces, a.llm_tokens) == (1500, 1, 810)
    assert audio_layout(45.5).pieces == 2
    with pytest.raises(ValueError):
        audio_layout(-1)
    with pytest.raises(ValueError):
        image_layout(0, 10, 9)
