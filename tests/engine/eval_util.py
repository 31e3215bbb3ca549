"""Tiny runs of two SAEs of different widths on one tiny model and hook, for the compare and evaluate tests."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.dashboard.tinyrun import HOOK, make_sae, write_corpus


def wide_sae(narrow, d_sae: int = 256, n_split: int = 8, seed: int = 1):
    """A TopK SAE whose first ``2 * n_split`` latents are two perturbed copies of each of the narrow SAE's first
    ``n_split`` latents (planted splits); the rest random unit directions. Encoder = decoder transposed."""
    from engine.saes import SAEConfig, build_sae

    gen = torch.Generator().manual_seed(seed)
    d_in = narrow.cfg.d_in
    w = torch.randn(d_sae, d_in, generator=gen)
    parents = narrow.W_dec.detach()[:n_split]
    noise = torch.randn(2 * n_split, d_in, generator=gen) * 0.05
    w[: 2 * n_split] = parents.repeat_interleave(2, dim=0) + noise
    w = w / w.norm(dim=-1, keepdim=True)
    cfg = SAEConfig(architecture="topk", d_in=d_in, d_sae=d_sae, hook_name=HOOK, k=8)
    return build_sae(cfg, {"W_dec": w, "b_dec": torch.zeros(d_in), "W_enc": w.T.contiguous(), "b_enc": torch.zeros(d_sae)})


def build_width_runs(root: Path, corpus: Path | None = None) -> dict[str, Path]:
    """A tiny model, a 64-latent and a 256-latent TopK SAE on ``blocks.0.hook_resid_post``, and a run of each
    (``root/runs/narrow``, ``root/runs/wide``); returns their paths and the model's."""
    from engine.model.loading import load_model
    from engine.model.tiny import save_tiny_model
    from engine.precompute.pipeline import precompute
    from engine.saes import load_sae

    root.mkdir(parents=True, exist_ok=True)
    model_dir = root / "model"
    if not (model_dir / "config.json").is_file():
        save_tiny_model(model_dir)
    narrow = make_sae("topk", d_sae=64, seed=0)
    saes = {"narrow": narrow.save(root / "sae_narrow"), "wide": wide_sae(narrow).save(root / "sae_wide")}
    corpus = corpus or write_corpus(root / "corpus.jsonl")
    lm = load_model(model_dir, device="cpu", dtype="float32")
    out = {"model": model_dir}
    for name, path in saes.items():
        out[name] = root / "runs" / name
        precompute(lm, load_sae(path), corpus, out[name], context_len=32, sae_path=path, progress=False)
    return out


PROSE = [
    "The function returns a new list\nwith the items in sorted order.",
    "A module is a file containing definitions\nand statements that other code can import.",
    "When the loop ends the value is printed\nand the program exits cleanly.",
]
CODE = [
    "     >>> x = sorted([3, 1, 2])\n     >>> x\n     [1, 2, 3]",
    "     def add(a, b):\n         return a + b",
    "     import numpy as np; x = np.zeros(3)",
]


def write_probe_corpus(path: Path, n_docs: int = 60) -> Path:
    """Info-like documents of three manual chapters (1, 5, 7), each alternating prose paragraphs and indented
    code examples: labels for both probing datasets (``engine.eval.probing_data``)."""
    import json

    gen = torch.Generator().manual_seed(0)
    with path.open("w") as f:
        for d in range(n_docs):
            chapter = ("1", "5", "7")[d % 3]
            parts = [f"{chapter}.{d}.1 Section {d}\n" + "." * 12]
            for _ in range(6):
                parts.append(PROSE[int(torch.randint(3, (1,), generator=gen))])
                parts.append(CODE[int(torch.randint(3, (1,), generator=gen))])
            f.write(json.dumps({"source": "python-docs", "title": f"s{d}", "text": "\n\n".join(parts)}) + "\n")
    return path
