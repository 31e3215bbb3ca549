"""Labelled texts for sparse probing, derived from the demo corpus (the Python 3.11 documentation as Info text).

The committed held-out corpus (``data/corpus/heldout.jsonl.xz``) holds 442 documents, all of source
``python-docs`` (no Bible text): so the labels come from the documentation's own structure. Documents are split
into blocks at blank lines, and each block gets up to two labels:

- ``manual_part``: which manual its document belongs to, from the leading section number of the document
  (``5.3.1 ...`` is in chapter 5): ``whats_new`` (1), ``language_reference`` (4), ``library`` (5), ``c_api`` (7)
  and ``howto`` (10) — at most five classes, as SAEBench's datasets have.
- ``code_vs_prose``: ``code`` for an example block (an interactive ``>>>`` session, or a block indented 5+
  columns deeper than the prose around it, as Info renders examples, with code punctuation on most lines),
  ``prose`` for an unindented paragraph of two lines or more ending like a sentence (not a heading, not a
  menu); other blocks get no label.

Documents are split into train and test by index (every 5th document is a test document), so no document
gives blocks to both sides.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..data.corpus import iter_documents

CHAPTERS = {"1": "whats_new", "4": "language_reference", "5": "library", "7": "c_api", "10": "howto"}
TEST_EVERY = 5
_CODE_CHARS = re.compile(r"[=(){}\[\];#]|^\s*(\$|>>>|\.\.\.)")
_BULLET = re.compile(r"\s*([*-]|\d+\.)\s+")
_RULE = re.compile(r"^\s*([.=*-])\1{4,}\s*$")  # a heading's underline


@dataclass(frozen=True)
class Block:
    """A block of a document and its labels (None where it has none)."""

    text: str
    doc: int
    manual_part: str | None
    kind: str | None


@dataclass
class Dataset:
    """A multi-class probing dataset: block indices per class, train and test."""

    name: str
    train: dict[str, list[int]] = field(default_factory=dict)
    test: dict[str, list[int]] = field(default_factory=dict)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def blocks(text: str, doc: int) -> list[Block]:
    """The labelled blocks of one document (see the module docstring)."""
    head = re.match(r"(\d+)\.", text)
    part = CHAPTERS.get(head.group(1)) if head else None
    out, prose_indent = [], 0
    for raw in re.split(r"\n[ \t]*\n", text):
        lines = [line for line in raw.split("\n") if line.strip()]
        if not lines:
            continue
        indent = min(_indent(line) for line in lines)
        bullet = _BULLET.match(lines[0])
        codeish = sum(bool(_CODE_CHARS.search(line)) for line in lines) * 2 >= len(lines)
        if lines[0].lstrip().startswith(">>>") or (indent >= prose_indent + 5 and not bullet and codeish):
            kind = "code"
        else:
            prose_indent = len(bullet.group(0)) if bullet else indent
            sentence = (indent == 0 and len(lines) >= 2 and lines[-1].rstrip().endswith((".", ":"))
                        and not any(_RULE.match(line) or line.rstrip().endswith("::") for line in lines))
            kind = "prose" if sentence else None
        out.append(Block("\n".join(lines), doc, part, kind))
    return out


def corpus_blocks(corpus: str | Path) -> list[Block]:
    """Every block of every document of the corpus, in order."""
    return [b for doc, text in enumerate(iter_documents(corpus)) for b in blocks(text, doc)]


def datasets(items: list[Block], train_per_class: int = 400, test_per_class: int = 100, seed: int = 0) -> list[Dataset]:
    """``manual_part`` and ``code_vs_prose``: up to the given number of blocks per class and side, sampled
    without replacement; classes with fewer than 10 blocks on a side are left out, and a dataset with fewer
    than two classes left is dropped."""
    rng = np.random.default_rng(seed)
    out = []
    for name, label in (("manual_part", lambda b: b.manual_part), ("code_vs_prose", lambda b: b.kind)):
        data = Dataset(name)
        classes = sorted({label(b) for b in items} - {None})
        for cls in classes:
            sides = {}
            for side, cap in (("train", train_per_class), ("test", test_per_class)):
                ids = [i for i, b in enumerate(items) if label(b) == cls and (b.doc % TEST_EVERY == 0) == (side == "test")]
                sides[side] = sorted(rng.choice(ids, size=min(cap, len(ids)), replace=False).tolist()) if ids else []
            if min(len(v) for v in sides.values()) >= 10:
                data.train[cls], data.test[cls] = sides["train"], sides["test"]
        if len(data.train) >= 2:
            out.append(data)
    return out
