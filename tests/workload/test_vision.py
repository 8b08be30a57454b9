"""Each vision-language family's image rule, judged by transformers' own processor code where it
can run without a tokenizer, and by worked examples (docs/multimodal.md) where it cannot."""

from __future__ import annotations

import ast
import importlib.util
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pydantic import ValidationError

from planner.errors import ProfileError
from planner.workload.inventory import Workload
from planner.workload.vision import Gemma3Rule, Idefics3Rule, LlavaRule, QwenVLRule, parse_rule

SIZES = [(1344, 1344), (640, 480), (480, 640), (1920, 1080), (28, 28), (10, 10), (56, 3000), (4000, 3000),
         (333, 777), (8192, 8192), (300, 200), (364, 364), (365, 364), (1456, 900)]


def _transformers_functions(relative: str, *names: str) -> dict[str, Any]:
    """Functions (module-level, or methods of its classes) from a transformers source file, run
    as written: the image processors import torchvision or PIL, which the planning environment
    does not need, while the arithmetic here needs neither."""
    root = Path(importlib.util.find_spec("transformers").submodule_search_locations[0])
    tree = ast.parse((root / relative).read_text())
    wanted = [node for node in ast.walk(tree)
              if isinstance(node, ast.FunctionDef | ast.Assign) and (getattr(node, "name", None) in names or (
                  isinstance(node, ast.Assign) and any(getattr(t, "id", None) in names for t in node.targets)))]
    for node in wanted:
        if isinstance(node, ast.FunctionDef):
            node.decorator_list = []
            node.returns = None
            for arg in node.args.args + node.args.kwonlyargs:
                arg.annotation = None
    namespace: dict[str, Any] = {"math": math}
    exec(compile(ast.Module(body=wanted, type_ignores=[]), str(root / relative), "exec"), namespace)
    return namespace


def test_llava_15_gives_576_tokens_whatever_the_image():
    """336 px crop, 14 px patches: 24 x 24 = 576 patches, the CLS dropped ("default" strategy)."""
    rule = LlavaRule(crop_size=336, patch_size=14)
    for w, h in SIZES:
        lay = rule.layout(w, h)
        assert (lay.llm_tokens, lay.patches, lay.crops) == (576, 577, ((336, 336),))
    assert LlavaRule(crop_size=336, patch_size=14, drop_cls=False).layout(10, 10).llm_tokens == 577  # "full"


@pytest.mark.parametrize("patch", [14, 16])
@pytest.mark.parametrize(("low", "high"), [(56 * 56, 28 * 28 * 1280), (3136, 12_845_056),
                                           (256 * 28 * 28, 1280 * 28 * 28)])
def test_qwen_vl_matches_transformers_smart_resize(patch: int, low: int, high: int):
    smart_resize = _transformers_functions("models/qwen2_vl/image_processing_qwen2_vl.py", "smart_resize")[
        "smart_resize"]
    rule = QwenVLRule(patch_size=patch, merge_size=2, min_pixels=low, max_pixels=high)
    for w, h in SIZES:
        if max(w, h) / min(w, h) > 200:
            continue
        rh, rw = smart_resize(h, w, factor=patch * 2, min_pixels=low, max_pixels=high)
        lay = rule.layout(w, h)
        assert lay.crops == ((rw, rh),)
        patches = (rh // patch) * (rw // patch)
        assert lay.patches == patches and lay.llm_tokens == patches // 4 + 2


def test_qwen_vl_worked_examples():
    """1344x1344 with the published max_pixels (12,845,056): 96 x 96 patches, 2,304 + 2 tokens; with
    the class default (1,003,520) it is resized to 980x980: 4,900 patches, 1,225 + 2 tokens."""
    published = QwenVLRule(patch_size=14, merge_size=2, min_pixels=3136, max_pixels=12_845_056)
    assert (published.layout(1344, 1344).patches, published.layout(1344, 1344).llm_tokens) == (9216, 2306)
    default = QwenVLRule(patch_size=14, merge_size=2, min_pixels=3136, max_pixels=1_003_520)
    assert default.layout(1344, 1344).crops == ((980, 980),) and default.layout(1344, 1344).llm_tokens == 1227
    with pytest.raises(ValueError, match="aspect ratio over 200"):
        default.layout(10_000, 40)


def test_gemma3_gives_256_image_tokens_and_4_markers():
    rule = Gemma3Rule(image_size=896, patch_size=14, tokens_per_image=256)
    for w, h in SIZES:
        lay = rule.layout(w, h)
        assert (lay.patches, lay.llm_tokens, lay.crops) == (4096, 260, ((896, 896),))


def _idefics3_text(rows: int, cols: int) -> str:
    """processing_idefics3.py's ``replace_image_token`` for an image cut into rows x cols."""
    from transformers.models.idefics3.processing_idefics3 import Idefics3Processor

    proc = Idefics3Processor.__new__(Idefics3Processor)  # the text rule needs no tokenizer
    proc.fake_image_token, proc.image_token = "<fake_token_around_image>", "<image>"
    proc.global_image_tag = "<global-img>"
    proc.image_seq_len = 169
    return proc.replace_image_token({"rows": [[rows]], "cols": [[cols]]}, 0)


def _tokens(text: str) -> int:
    """Tokens of the placeholder text: each special token and each newline one token."""
    specials = ("<fake_token_around_image>", "<image>", "<global-img>")
    n = sum(text.count(s) for s in specials) + text.count("\n") + text.count("<row_")
    return n


def test_idefics3_matches_its_processor():
    code = _transformers_functions("models/idefics3/image_processing_idefics3.py", "MAX_IMAGE_SIZE",
                                   "_resize_output_size_rescale_to_max_len",
                                   "_resize_output_size_scale_below_upper_bound", "get_number_of_image_patches")
    defaults = {"do_image_splitting": True, "max_image_size": {"longest_edge": 364}, "size": {"longest_edge": 4 * 364}}
    proc = SimpleNamespace(_merge_and_standardize_kwargs=lambda **kw: defaults)
    count = code["get_number_of_image_patches"]
    rule = Idefics3Rule(image_size=364, patch_size=14, scale_factor=2, longest_edge=4 * 364)
    for w, h in SIZES:
        crops, rows, cols = count(proc, h, w, {})
        lay = rule.layout(w, h)
        assert rule.grid(w, h) == (rows, cols), (w, h)
        assert len(lay.crops) == max(crops, 1)
        assert lay.llm_tokens == _tokens(_idefics3_text(rows, cols)), (w, h)
        assert lay.patches == len(lay.crops) * 676  # 26 x 26 patches per 364 px tile
    # 1344x1344: longest edge to 1456, 4 x 4 tiles + the global one: 17 x 676 patches
    lay = rule.layout(1344, 1344)
    assert (len(lay.crops), lay.llm_tokens) == (17, 16 * 171 + 4 + 1 + 172)
    unsplit = Idefics3Rule(image_size=364, patch_size=14, scale_factor=2, longest_edge=1456, split=False)
    assert unsplit.layout(1344, 1344).llm_tokens == 172 == _tokens(_idefics3_text(0, 0))


def test_workload_counts_a_family_s_image_tokens_inside_the_context():
    rule = LlavaRule(crop_size=336, patch_size=14)
    w = Workload(seq_len=2048, images=3, vision=rule)
    assert w.image_layout().llm_tokens == 576
    with pytest.raises(ValidationError, match=r"--images 2 take 2 x 576 = 1,152 LLM tokens, more than --seq-len 1,024"):
        Workload(seq_len=1024, images=2, vision=rule)
    with pytest.raises(ValidationError, match="aspect ratio over 200"):
        Workload(seq_len=4096, images=1, image_size=(20_000, 50),
                 vision=QwenVLRule(patch_size=14, merge_size=2, min_pixels=3136, max_pixels=1_003_520))
    again = Workload.model_validate(w.model_dump(mode="json"))  # plan.json round trip
    assert again == w and again.vision == rule


@pytest.mark.parametrize("bad", [{"family": "nope"}, {"family": "llava", "crop_size": 0, "patch_size": 14},
                                 {"family": "qwen2_vl", "patch_size": 14}, "llava"])
def test_a_malformed_rule_is_one_error(bad):
    with pytest.raises(ProfileError, match="image rule"):
        parse_rule(bad, "model m, group vision_tower")
