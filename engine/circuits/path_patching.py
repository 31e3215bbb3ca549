"""Path patching of each head's direct path to the logits (Wang et al. 2022, restricted to head -> final logits).

The head's output from the counterfactual run reaches only the residual stream the unembedding reads: at the last
token, ``resid_final' = resid_final + (z_cf - z_clean)[h] W_O^h``, everything else frozen at the clean run (later
layers do not see the change). The final norm is applied to the patched residual, as the model would (it is not
frozen), then the unembedding. The effect is normalised as activation patching's:
``(LD_clean - LD_path) / (LD_clean - LD_counterfactual)``. No forward per head: two forwards per group of prompts,
then one norm and unembedding per head.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..model.loading import LoadedModel
from ..model.tail import can_resume, resume_logits
from .heads import OutputProjection, head_results, output_projection
from .patching import groups, metric, pair_ids, run_with_cache
from .tasks import Task


def _final(lm: LoadedModel) -> str:
    return f"blocks.{lm.n_layers - 1}.hook_resid_post"


def _unembed(lm: LoadedModel, resid: torch.Tensor) -> torch.Tensor:
    """Logits ``[n, vocab]`` of final residuals ``[n, d_model]`` (final norm, unembedding, soft-capping)."""
    return resume_logits(lm, _final(lm), resid[:, None])[:, -1].float()


@torch.inference_mode()
def direct_deltas(lm: LoadedModel, ids: torch.Tensor, cf_ids: torch.Tensor,
                  projections: Sequence[OutputProjection]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The clean final residual at the last token ``[batch, d_model]``, each head's change of its output there
    ``[n_layers, n_heads, batch, d_model]`` (counterfactual minus clean), and the clean and counterfactual last-token
    logits."""
    names = [f"blocks.{layer}.attn.hook_z" for layer in range(lm.n_layers)]
    logits, clean = run_with_cache(lm, ids, [*names, _final(lm)])
    cf_logits, cf = run_with_cache(lm, cf_ids, names)
    deltas = torch.stack([head_results((cf[n] - clean[n])[:, -1:].float(), p)[:, 0].permute(1, 0, 2)
                          for n, p in zip(names, projections, strict=True)])
    return clean[_final(lm)][:, -1].float(), deltas, logits[:, -1].float(), cf_logits[:, -1].float()


def check_direct(lm: LoadedModel) -> None:
    if not can_resume(lm, _final(lm)):
        raise ValueError(f"path patching needs the final norm and unembedding of the {lm.family.name} family")


@torch.inference_mode()
def direct_path_logits(lm: LoadedModel, ids: torch.Tensor, cf_ids: torch.Tensor,
                       heads: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Last-token logits ``[batch, vocab]`` with the direct paths of all ``heads`` (``(layer, head)``) patched at once."""
    check_direct(lm)
    projections = [output_projection(lm, layer) for layer in range(lm.n_layers)]
    resid, deltas, _, _ = direct_deltas(lm, ids, cf_ids, projections)
    for layer, head in heads:
        resid = resid + deltas[layer, head]
    return _unembed(lm, resid)


@torch.inference_mode()
def path_patch_scan(lm: LoadedModel, task: Task) -> np.ndarray:
    """``[n_layers, n_heads]``: each head's normalised direct-path patching effect."""
    check_direct(lm)
    L, H, n = lm.n_layers, lm.n_heads, len(task.pairs)
    projections = [output_projection(lm, layer) for layer in range(L)]
    patched, clean_ld, cf_ld = np.zeros((L, H, n)), np.zeros(n), np.zeros(n)
    for members in groups(task).values():
        pairs = [task.pairs[i] for i in members]
        resid, deltas, logits, cf_logits = direct_deltas(lm, pair_ids(pairs), pair_ids(pairs, counterfactual=True), projections)
        clean_ld[members], cf_ld[members] = metric(logits, pairs), metric(cf_logits, pairs)
        for layer in range(L):  # one layer's heads at once: H x batch rows through the unembedding
            last = _unembed(lm, (resid[None] + deltas[layer]).flatten(0, 1))
            patched[layer][:, members] = metric(last, pairs * H).reshape(H, len(pairs))
    gap = clean_ld.mean() - cf_ld.mean()
    if abs(gap) < 1e-6:
        raise ValueError("the clean and counterfactual prompts give the same mean logit difference: no effect to "
                         "normalise")
    return (clean_ld.mean() - patched.mean(-1)) / gap
