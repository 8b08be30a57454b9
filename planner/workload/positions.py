"""Positions: whether a sample's sequence is one the LLM can take.

Workload stage, pure. A model with a learned table of absolute positions (GPT-2's ``wpe``, BERT's
``position_embeddings``, OPT's ``embed_positions``) has no row for a position past its table: a
longer sequence cannot run (the embedding lookup fails in the first forward), so it is an error.
A RoPE model computes any position, but past its ``max_position_embeddings`` it sees positions
it was not trained on: a warning. ``seq_len`` counts image and audio tokens already
(`inventory.Workload`), so it is the LLM's whole sequence.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from planner.errors import ProfileError
from planner.profile.architectures import DECODER_TYPES, TensorKind
from planner.profile.catalog import Group, ModelSpec

_TABLE = re.compile(r"(?:^|\.)(?:wpe|position_embeddings|embed_positions|positions_embed)\.weight$")
"""A learned absolute position table, as transformers names it: ``transformer.wpe`` (GPT-2,
GPT-Neo, GPT-BigCode), ``embeddings.position_embeddings`` (BERT, RoBERTa, GIT),
``decoder.embed_positions`` (OPT, BART, BioGPT, TrOCR), ``transformer.positions_embed``
(OpenAI GPT). Checked on the meta device, transformers 5.25."""

LENGTH_KEYS = ("n_positions", "max_position_embeddings")
"""Config fields that give the positions a model takes."""

PADDING_OFFSET_TYPES = frozenset({"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "xmod", "data2vec-text",
                                  "roberta-prelayernorm"})
"""Models whose position ids start after the padding index (``create_position_ids_from_input_ids``
in modeling_roberta.py): positions ``pad_token_id + 1`` onwards, so ``pad_token_id + 1`` rows of
the table are never a token's (RoBERTa's 514 rows take 512 tokens)."""

ROPE_KEYS = ("rope_theta", "rope_parameters", "rope_scaling")
"""Config fields of a rotary-position model; the decoders memplan models are all RoPE too."""


@dataclass(frozen=True)
class LearnedPositions:
    """A learned absolute position table and the most tokens it takes.

    Attributes:
        model: the model's name.
        tensor: the table's parameter name.
        positions: the longest sequence the model takes, tokens.
    """

    model: str
    tensor: str
    positions: int

    def why(self) -> str:
        """One phrase: where the limit comes from."""
        return f"{self.model} has learned absolute positions for {self.positions} tokens only ({self.tensor})"


def _table_limit(group: Group, rows: int) -> int:
    """Tokens a table of ``rows`` takes: less a padding offset, and no more than the config says
    (OPT's and BART's tables carry 2 rows more than ``max_position_embeddings``)."""
    cfg = group.config
    limit = rows
    if cfg.get("model_type") in PADDING_OFFSET_TYPES:
        pad = cfg.get("pad_token_id")
        limit -= (1 if not isinstance(pad, int) else pad) + 1  # RobertaConfig's pad_token_id is 1
    for key in LENGTH_KEYS:
        value = cfg.get(key)
        if isinstance(value, int) and 0 < value < limit:
            limit = value
    return limit


def learned_positions(model: ModelSpec) -> LearnedPositions | None:
    """The tightest learned absolute position table of the model's LLM(s), or None without one."""
    found = []
    for group in model.groups:
        if group.kind != "decoder":
            continue  # an encoder's position table counts patches or audio frames, not tokens
        for t in group.tensors:
            if t.kind is TensorKind.EMBEDDING and len(t.shape) == 2 and _TABLE.search(t.name):
                found.append(LearnedPositions(model.name, t.name, _table_limit(group, t.shape[0])))
    return min(found, key=lambda f: f.positions, default=None)


def check_positions(model: ModelSpec, seq_len: int) -> list[str]:
    """Refuse a sequence past learned positions; warn past a RoPE model's trained length.

    Args:
        model: the model.
        seq_len: tokens per sample, image and audio tokens included.

    Returns:
        Warnings (one line each) for the estimate's notes.

    Raises:
        ProfileError: ``seq_len`` is longer than the LLM's learned position table takes.
    """
    learned = learned_positions(model)
    if learned is not None and seq_len > learned.positions:
        raise ProfileError(f"--seq-len {seq_len}: {learned.why()}; a longer sequence cannot run (lower --seq-len)")
    out = []
    for group in model.groups:
        cfg = group.config
        trained = cfg.get("max_position_embeddings")
        rope = cfg.get("model_type") in DECODER_TYPES or any(k in cfg for k in ROPE_KEYS)
        if group.kind == "decoder" and rope and isinstance(trained, int) and 0 < trained < seq_len:
            out.append(f"--seq-len {seq_len} is past {model.name}'s trained length (max_position_embeddings "
                       f"{trained}, RoPE): it runs, but positions past {trained} were not trained")
    return out
