"""Training data for the built-in target: MiniCPM-style conversations -> token ids and labels.

Part of the train stage (plan -> writers -> launch -> **train**), used by `planner.train`. Reads
a JSON list or JSONL file of samples::

    {"id": "0", "image": "optional/path.jpg",
     "conversations": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}

(``{"from": "human" | "gpt", "value": ...}`` turns are accepted too), renders each sample with the
tokenizer's chat template, and trains only on the assistant turns. Loading is plain JSON; only
`encode` and `Collator` touch the tokenizer and torch.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

IGNORE_INDEX = -100
"""Label of a token the loss skips (torch ``CrossEntropyLoss(ignore_index=-100)``, HF's default)."""

ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}
"""Role names accepted in samples -> the chat-template role (ShareGPT's human/gpt included)."""


class DataError(ValueError):
    """The data file cannot be used; the message names the file and the sample."""


@dataclass(frozen=True)
class Sample:
    """One conversation, its turns normalized to chat-template roles."""

    id: str
    messages: tuple[dict[str, str], ...]
    image: Any = None
    """The sample's ``image`` field as written (a path, a dict of paths), or None."""


def load_samples(path: str | Path) -> list[Sample]:
    """Read a JSON list or a JSONL file of conversations.

    Raises:
        DataError: missing or unreadable file, bad JSON, no samples, or a sample without a
            ``conversations`` list of user/assistant/system turns.
    """
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"data file {p} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"data file {p}: cannot read: {exc}") from None
    if text.lstrip().startswith("["):
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{p}: not valid JSON: {exc.msg} (line {exc.lineno})") from None
    else:
        raw = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                raw.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{p}: line {lineno} is not valid JSON: {exc.msg}") from None
    if not raw:
        raise DataError(f"{p}: no samples")
    return [_sample(doc, i, p) for i, doc in enumerate(raw)]


def _sample(doc: Any, index: int, path: Path) -> Sample:
    if not isinstance(doc, dict):
        raise DataError(f"{path}: sample {index} is not a JSON object")
    sid = str(doc.get("id", index))
    turns = doc.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{path}: sample {sid!r} has no \"conversations\" list")
    messages = []
    for turn in turns:
        role = turn.get("role", turn.get("from")) if isinstance(turn, dict) else None
        content = turn.get("content", turn.get("value")) if isinstance(turn, dict) else None
        if role not in ROLES or not isinstance(content, str):
            raise DataError(f"{path}: sample {sid!r}: each turn needs a role (user, assistant, system; or "
                            f"from: human, gpt) and a text content; got {json.dumps(turn)[:80]}")
        messages.append({"role": ROLES[role], "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{path}: sample {sid!r} has no assistant turn to train on")
    if messages[0]["role"] == "assistant":
        raise DataError(f"{path}: sample {sid!r} starts with an assistant turn")
    return Sample(sid, tuple(messages), doc.get("image") or None)


def _render(tokenizer: Any, messages: Sequence[dict[str, str]], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)


def _template_segments(tokenizer: Any, messages: Sequence[dict[str, str]]) -> list[tuple[str, bool]] | None:
    """The conversation as (text, trained) pieces, cut where the template's rendering of a
    shorter conversation ends; None when the template is not prefix-stable (it rewrites earlier
    turns, as Qwen3's drops old reasoning)."""
    segments: list[tuple[str, bool]] = []
    prev = ""
    for i, message in enumerate(messages):
        full = _render(tokenizer, messages[: i + 1])
        if message["role"] == "assistant":
            prompt = _render(tokenizer, messages[:i], generation_prompt=True)
            if not (prompt.startswith(prev) and full.startswith(prompt)):
                return None
            segments += [(prompt[len(prev):], False), (full[len(prompt):], True)]
        else:
            if not full.startswith(prev):
                return None
            segments.append((full[len(prev):], False))
        prev = full
    return segments


def _last_turn_segments(tokenizer: Any, messages: Sequence[dict[str, str]]) -> list[tuple[str, bool]] | None:
    """Fallback for templates that are not prefix-stable: train on the last assistant turn only."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    prompt = _render(tokenizer, messages[:last], generation_prompt=True)
    full = _render(tokenizer, messages[: last + 1])
    if not full.startswith(prompt):
        return None
    return [(prompt, False), (full[len(prompt):], True)]


def _plain_segments(tokenizer: Any, messages: Sequence[dict[str, str]]) -> list[tuple[str, bool]]:
    """``role: content`` lines for a tokenizer without a chat template; the EOS token closes each
    assistant turn so the model learns to stop."""
    eos = tokenizer.eos_token or ""
    segments: list[tuple[str, bool]] = []
    for m in messages:
        if m["role"] == "assistant":
            segments += [("assistant: ", False), (m["content"] + eos + "\n", True)]
        else:
            segments.append((f"{m['role']}: {m['content']}\n", False))
    return segments


def encode(tokenizer: Any, sample: Sample, max_len: int) -> dict[str, list[int]]:
    """Token ids and labels of one sample, truncated to ``max_len`` tokens; labels are
    `IGNORE_INDEX` everywhere but on assistant turns (the template's end-of-turn token included).

    Each piece is tokenized on its own (as LLaMA-Factory encodes turn by turn), so a token never
    straddles a prompt/answer boundary.

    Raises:
        DataError: the chat template renders the sample in a way no assistant turn can be found in.
    """
    ids: list[int] = []
    if getattr(tokenizer, "chat_template", None):
        segments = _template_segments(tokenizer, sample.messages) or _last_turn_segments(tokenizer, sample.messages)
        if segments is None:
            raise DataError(f"sample {sample.id!r}: the tokenizer's chat template renders the conversation "
                            "so that the assistant turn cannot be located")
    else:
        segments = _plain_segments(tokenizer, sample.messages)
        bos = tokenizer.bos_token_id
        if bos is not None and tokenizer("a").input_ids[:1] == [bos]:
            ids.append(bos)
    labels = [IGNORE_INDEX] * len(ids)
    for text, trained in segments:
        if not text:
            continue
        piece = tokenizer(text, add_special_tokens=False).input_ids
        ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    return {"input_ids": ids[:max_len], "labels": labels[:max_len]}


def encode_all(tokenizer: Any, samples: Sequence[Sample], max_len: int) -> tuple[list[dict[str, list[int]]], int]:
    """Every sample encoded; samples left with no trained token after truncation are dropped.

    Returns:
        The encoded samples and how many were dropped.

    Raises:
        DataError: every sample was dropped.
    """
    out = []
    for s in samples:
        enc = encode(tokenizer, s, max_len)
        if any(label != IGNORE_INDEX for label in enc["labels"][1:]):  # position 0 is never predicted
            out.append(enc)
    if not out:
        raise DataError(f"no sample keeps an assistant token within the first {max_len} tokens (the plan's seq_len)")
    return out, len(samples) - len(out)


@dataclass(frozen=True)
class Collator:
    """Pads a batch on the right: ``pad_id`` for inputs, `IGNORE_INDEX` for labels, 0 in the
    attention mask."""

    pad_id: int

    def __call__(self, batch: Sequence[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[row, :n] = torch.tensor(b["input_ids"])
            labels[row, :n] = torch.tensor(b["labels"])
            mask[row, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}
