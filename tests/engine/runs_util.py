"""Small corpora and brute-force reference statistics for precompute and store tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from engine.data.activations import stats_mask
from engine.model.tiny import TINY_TEXT

LINES = [line for line in TINY_TEXT.replace(". ", ".\n").splitlines() if line.strip()]


def write_corpus(path: Path, n_docs: int = 40, seed: int = 0) -> Path:
    """A JSONL corpus of shuffled tiny-text lines."""
    gen = torch.Generator().manual_seed(seed)
    with path.open("w") as f:
        for _ in range(n_docs):
            order = torch.randperm(len(LINES), generator=gen).tolist()
            f.write(json.dumps({"text": " ".join(LINES[i] for i in order)}) + "\n")
    return path


def brute_force(lm, sae, run_dir: Path, batch_size: int, include_special: bool = False, include_first: bool = False) -> dict:
    """Every statistic recomputed from scratch on the run's contexts (same batches, so same floats)."""
    table = pq.read_table(run_dir / "contexts.parquet").sort_by("context_id")
    ids = torch.tensor(table.column("token_ids").to_pylist(), dtype=torch.long)
    codes, xs, x_hats = [], [], []
    for start in range(0, len(ids), batch_size):
        batch = ids[start : start + batch_size]
        x = lm.capture(batch, sae.cfg.hook_name)[sae.cfg.hook_name].float()
        out = sae(x)
        codes.append(out.codes.float())
        xs.append(x)
        x_hats.append(out.x_hat.float())
    codes, x, x_hat = torch.cat(codes), torch.cat(xs), torch.cat(x_hats)
    mask = stats_mask(ids, lm.special_token_ids, include_special=include_special, include_first=include_first)
    codes[~mask] = 0
    xm, xhm = x[mask].double(), x_hat[mask].double()
    ev = 1 - (xm - xhm).pow(2).sum() / (xm - xm.mean(0)).pow(2).sum()
    return {
        "ids": ids.numpy(),
        "mask": mask.numpy(),
        "codes": codes.numpy(),  # [contexts, pos, d_sae], zero at excluded tokens
        "n_tokens": int(mask.sum()),
        "fire_count": (codes > 0).sum((0, 1)).numpy(),
        "max_act": codes.amax((0, 1)).numpy(),
        "context_max": codes.amax(1).numpy(),  # [contexts, d_sae]
        "explained_variance": float(ev),
    }


def top_contexts(context_max: np.ndarray, latent: int, k: int) -> list[int]:
    """Brute-force top-k context ids of a latent by their maximum activation (firing contexts only)."""
    values = context_max[:, latent]
    order = np.argsort(-values, kind="stable")[:k]
    return [int(c) for c in order if values[c] > 0]
