"""How token ids are shown: one display string per id, and a short form for labels."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def display_tokens(tokenizer: PreTrainedTokenizerBase, token_ids: Iterable[int]) -> list[str]:
    """Human-readable text of each token id, decoded one by one (byte-level pieces included)."""
    return list(tokenizer.batch_decode([[int(i)] for i in token_ids], clean_up_tokenization_spaces=False))


def token_strings(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> list[str]:
    """Display string of every token id below ``vocab_size`` (ids the tokenizer lacks show as ``<id N>``)."""
    known = min(vocab_size, len(tokenizer))
    return display_tokens(tokenizer, range(known)) + [f"<id {i}>" for i in range(known, vocab_size)]


def short_token(text: str) -> str:
    """A label-friendly rendering of a token: visible whitespace, trimmed."""
    shown = text.replace("\n", "\\n").replace("\t", "\\t").strip()
    return shown or repr(text)
