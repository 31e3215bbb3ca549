"""A Matryoshka SAE's nested prefixes: how well the first ``w`` latents reconstruct on their own, per prefix width.

Each prefix is the SAE with the decoder rows of later latents zeroed (the encoder unchanged: the codes are the
full SAE's, as the Matryoshka training loss decodes them), scored like any SAE on the run's sampled contexts:
explained variance on the counted tokens and, optionally, CE loss recovered with the prefix spliced in.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import NamedTuple

import torch

from ..analysis.metrics import ReconStats, ce_metrics
from ..data.activations import iter_activations
from ..model.loading import LoadedModel
from ..saes import SAE


class PrefixPoint(NamedTuple):
    """One prefix of the nested dictionary."""

    width: int
    """Latents ``[0, width)``."""
    groups: int
    """How many groups the prefix holds."""
    explained_variance: float
    l0: float
    """Mean latents per counted token that fire within the prefix."""
    ce_loss_recovered: float | None


def prefix_sae(sae: SAE, width: int) -> SAE:
    """A copy of ``sae`` whose latents from ``width`` on write nothing (their decoder rows zeroed)."""
    if not 0 < width <= sae.cfg.d_sae:
        raise ValueError(f"prefix width {width} is outside 1..{sae.cfg.d_sae}")
    out = copy.deepcopy(sae)
    with torch.no_grad():
        out.W_dec[width:] = 0
    return out


@torch.inference_mode()
def prefix_curve(lm: LoadedModel, sae: SAE, contexts: Sequence[list[int]], *, batch_size: int = 8,
                 with_ce: bool = True) -> list[PrefixPoint]:
    """Explained variance (and CE loss recovered) of every Matryoshka prefix of ``sae`` on ``contexts``."""
    widths = sae.cfg.matryoshka_widths
    if not widths:
        raise ValueError(f"this {sae.cfg.architecture} SAE has no Matryoshka groups (cfg.json matryoshka_widths)")
    prefixes = [prefix_sae(sae, w) for w in widths]
    stats = [ReconStats(sae.cfg.d_in) for _ in widths]
    masks, ids = [], []
    for batch in iter_activations(lm, sae.cfg.hook_name, contexts, batch_size, head_index=sae.cfg.hook_head_index):
        x = batch.acts[batch.mask].float().to(sae.device)
        masks.append(batch.mask.cpu())
        ids.append(batch.token_ids)
        if not len(x):
            continue
        for w, p, st in zip(widths, prefixes, stats, strict=True):
            out = p(x)
            st.update(x, out.x_hat.float(), out.codes[:, :w])
    if not ids or stats[0].n == 0:
        raise ValueError("no counted tokens in the sampled contexts")
    token_ids, mask = torch.cat(ids), torch.cat(masks)
    points = []
    for g, (w, p, st) in enumerate(zip(widths, prefixes, stats, strict=True)):
        summary = st.summary()
        ce = ce_metrics(lm, p, token_ids, mask, batch_size).ce_loss_recovered if with_ce else None
        points.append(PrefixPoint(w, g + 1, summary["explained_variance"], summary["l0"], ce))
    return points
