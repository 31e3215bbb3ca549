"""Rebuild the demo's labelled concept files (run as: python scripts/build_concepts.py).

The committed corpus holds no Bible text (data/corpus: its documents are all of source ``python-docs``), so the
concepts come from the documentation's own structure, labelled as sparse probing labels it
(``engine.eval.probing_data``), from the held-out documents the demo SAEs were not trained on:

* ``python-docs-manuals.jsonl``: ``label`` = the manual a block's document belongs to (whats_new,
  language_reference, library, c_api, howto);
* ``python-docs-code-prose.jsonl``: ``label`` = ``code`` (an example block) or ``prose`` (a paragraph).

Up to ``PER_LABEL`` blocks per label of at least ``MIN_CHARS`` characters, sampled with a fixed seed, each cut to
``MAX_CHARS`` characters at a line end. One JSON object per line: ``{"text", "label"}``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from engine.eval.probing_data import corpus_blocks

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "data" / "corpus" / "heldout.jsonl.xz"
OUT = ROOT / "data" / "concepts"
PER_LABEL, MIN_CHARS, MAX_CHARS, SEED = 60, 120, 600, 0


def cut(text: str) -> str:
    if len(text) <= MAX_CHARS:
        return text
    head = text[:MAX_CHARS]
    return head[: head.rfind("\n")] if "\n" in head else head


def write(name: str, items: list[tuple[str, str]]) -> None:
    rng = np.random.default_rng(SEED)
    lines = []
    for label in sorted({label for _, label in items}):
        texts = [t for t, lab in items if lab == label]
        for i in sorted(rng.choice(len(texts), size=min(PER_LABEL, len(texts)), replace=False)):
            lines.append(json.dumps({"text": cut(texts[i]), "label": label}, ensure_ascii=False))
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"{OUT / name}: {len(lines)} texts")


def main() -> None:
    blocks = [b for b in corpus_blocks(CORPUS) if len(b.text) >= MIN_CHARS]
    write("python-docs-manuals.jsonl", [(b.text, b.manual_part) for b in blocks if b.manual_part])
    write("python-docs-code-prose.jsonl", [(b.text, b.kind) for b in blocks if b.kind])


if __name__ == "__main__":
    main()
