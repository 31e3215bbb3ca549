"""Reading a corpus and packing it into fixed-length token contexts.

A corpus is text (``.txt``/``.jsonl`` files, optionally ``.gz``/``.xz``, or a directory of them) or a table
(``tables.py``: a local Parquet/Arrow file or directory, or a Hugging Face dataset ``hf:NAME[:split][:column]``).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
from collections.abc import Iterator
from pathlib import Path

from . import tables

CORPUS_HELP = ("text/jsonl file (.gz/.xz ok) or a directory of them; a Parquet/Arrow file or directory; or a Hugging Face "
               "dataset hf:NAME[:split][:column] (pip install 'saescope[hf]'); input_ids/tokens columns are used as stored")
"""What ``--corpus`` takes (the help of every command that reads a corpus)."""
SUFFIXES = (".txt", ".jsonl", ".txt.gz", ".jsonl.gz", ".txt.xz", ".jsonl.xz")


def corpus_files(path: str | Path) -> list[Path]:
    """The files of a corpus: one file, or every supported file in a directory (sorted); none for a hub dataset.

    Checks that the corpus exists (for a hub dataset: that the spec parses and ``datasets`` is installed)."""
    spec = tables.parse_spec(path, SUFFIXES)
    if spec is not None:
        if spec.hub:
            try:
                import datasets  # noqa: F401
            except ImportError:
                raise ValueError(f"corpus {path}: Hugging Face datasets need the 'datasets' package: {tables.HF_EXTRA} "
                                 "(local Parquet/Arrow files need nothing extra)") from None
            return []
        return tables.local_files(spec)
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"corpus path {path} does not exist")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(SUFFIXES)) if path.is_dir() else [path]
    if path.is_dir() and not files:
        raise ValueError(f"corpus directory {path} holds no {', '.join(SUFFIXES)} files")
    if not path.is_dir() and not path.name.endswith(SUFFIXES):
        raise ValueError(f"corpus file {path} must end with one of {', '.join(SUFFIXES)}")
    return files


def _open(path: Path):
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    if path.name.endswith(".xz"):
        return lzma.open(path, "rt", encoding="utf-8", errors="replace")
    return path.open("r", encoding="utf-8", errors="replace")


def iter_documents(path: str | Path) -> Iterator[str]:
    """Documents of a corpus: each JSONL line's ``text``, each text file whole, or each row of a text column."""
    spec = tables.parse_spec(path, SUFFIXES)
    if spec is not None:
        yield from tables.texts(spec, *tables.open_stream(spec))
        return
    for file in corpus_files(path):
        with _open(file) as f:
            if ".jsonl" in file.name:
                for i, line in enumerate(f):
                    if not line.strip():
                        continue
                    try:
                        doc = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{file}:{i + 1} is not valid JSON: {err}") from err
                    text = doc.get("text") if isinstance(doc, dict) else None
                    if isinstance(text, str) and text:
                        yield text
            else:
                text = f.read()
                if text:
                    yield text


def corpus_hash(path: str | Path) -> str:
    """SHA-256 over the corpus files' names and bytes (a hub dataset: over its name, split and column)."""
    spec = tables.parse_spec(path, SUFFIXES)
    if spec is not None:
        return tables.table_hash(spec)
    digest = hashlib.sha256()
    for file in corpus_files(path):
        digest.update(file.name.encode())
        with file.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def iter_contexts(tokenizer, path: str | Path, context_len: int, *, separator_id: int | None = None) -> Iterator[list[int]]:
    """Pack the corpus' documents (joined by ``separator_id``, default EOS) into windows of ``context_len`` tokens.

    No BOS is inserted: position 0 of every window is excluded from statistics and training by callers,
    since it behaves as an attention sink whatever token sits there. A pretokenized table corpus (an
    ``input_ids``/``tokens`` column) is used exactly as stored: its rows are concatenated with nothing added
    and cut into windows, so rows of ``context_len`` ids come back one per window, unchanged.
    """
    if context_len < 2:
        raise ValueError(f"context length must be at least 2, got {context_len}")
    spec = tables.parse_spec(path, SUFFIXES)
    docs: Iterator[str]
    if spec is None:
        docs = iter_documents(path)
    else:
        column, arrays = tables.open_stream(spec)
        if column.kind == "tokens":
            yield from _pack_token_rows(tables.token_rows(spec, column, arrays, len(tokenizer)), context_len)
            return
        docs = tables.texts(spec, column, arrays)
    sep = separator_id if separator_id is not None else getattr(tokenizer, "eos_token_id", None)
    buffer: list[int] = []
    for doc in docs:
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        buffer.extend(ids)
        if sep is not None:
            buffer.append(sep)
        start = 0
        while len(buffer) - start >= context_len:
            yield buffer[start : start + context_len]
            start += context_len
        del buffer[:start]


def _pack_token_rows(rows: Iterator, context_len: int) -> Iterator[list[int]]:
    buffer: list[int] = []
    for row in rows:
        buffer.extend(row.tolist())
        start = 0
        while len(buffer) - start >= context_len:
            yield buffer[start : start + context_len]
            start += context_len
        del buffer[:start]
