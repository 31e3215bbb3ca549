"""Rebuild the demo corpus from Debian packages (run as: python scripts/build_corpus.py).

Sources (see data/corpus/LICENSES.md):
  * King James Bible, public domain: packages bible-kjv + bible-kjv-text (dumped with the `bible` program).
  * Python 3.11 documentation, PSF licence: package python3.11-doc (/usr/share/info/python3.11.info.gz),
    with the Changelog part removed.
Writes data/corpus/{train,heldout}.jsonl.xz: one JSON object per document ({"source", "title", "text"}),
the two sources interleaved; every 10th document of each source is held out and never used for training.
"""

from __future__ import annotations

import gzip
import json
import lzma
import re
import subprocess
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "data" / "corpus"
INFO = Path("/usr/share/info/python3.11.info.gz")
_VERSE = re.compile(r"^([1-3]?[A-Z][a-z]+)(\d+):(\d+) (.*)$")


def kjv_chapters() -> list[dict]:
    text = subprocess.run(["bible", "Gen1:1-Rev22:21"], capture_output=True, text=True, check=True).stdout
    chapters: dict[tuple[str, str], list[str]] = {}
    for line in text.splitlines():
        m = _VERSE.match(line.strip())
        if m:
            chapters.setdefault((m.group(1), m.group(2)), []).append(m.group(4))
    return [
        {"source": "kjv", "title": f"{book} {chap}", "text": " ".join(verses)} for (book, chap), verses in chapters.items()
    ]


def python_nodes() -> list[dict]:
    raw = gzip.open(INFO, "rt", encoding="utf-8", errors="replace").read()
    raw = raw.split("\x1f\nTag Table:")[0]
    nodes, parent = [], {}
    for chunk in raw.split("\x1f\n")[1:]:
        header, _, body = chunk.partition("\n")
        name = re.search(r"Node: ([^,]+)", header)
        up = re.search(r"Up: ([^,]+)", header)
        if not name:
            continue
        parent[name.group(1).strip()] = up.group(1).strip() if up else ""
        nodes.append((name.group(1).strip(), body.strip()))

    def under_changelog(node: str) -> bool:
        seen = set()
        while node and node not in seen:
            if node == "Changelog":
                return True
            seen.add(node)
            node = parent.get(node, "")
        return False

    return [
        {"source": "python-docs", "title": name, "text": body}
        for name, body in nodes
        if body and not under_changelog(name) and len(body) > 200
    ]


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    sources = [kjv_chapters(), python_nodes()]
    train, heldout = [], []
    for docs in sources:
        for i, doc in enumerate(docs):
            (heldout if i % 10 == 9 else train).append(doc)
    for name, docs in (("train", train), ("heldout", heldout)):
        by_source = [[d for d in docs if d["source"] == s] for s in ("kjv", "python-docs")]
        mixed = [d for pair in _interleave(*by_source) for d in pair]
        with lzma.open(OUT / f"{name}.jsonl.xz", "wt", encoding="utf-8", preset=9) as f:
            for doc in mixed:
                f.write(json.dumps(doc, ensure_ascii=False) + "\n")
        chars = sum(len(d["text"]) for d in docs)
        print(f"{name}: {len(docs)} documents, {chars / 1e6:.1f} M characters")


def _interleave(a: list, b: list):
    """Spread the shorter list evenly through the longer one so any prefix mixes both sources."""
    long, short = (a, b) if len(a) >= len(b) else (b, a)
    ratio = len(long) / max(1, len(short))
    j = 0
    for i, doc in enumerate(long):
        batch = [doc]
        while j < len(short) and j * ratio <= i:
            batch.append(short[j])
            j += 1
        yield batch
    yield short[j:]


if __name__ == "__main__":
    main()
