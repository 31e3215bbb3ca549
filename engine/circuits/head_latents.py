"""One head's part in an attention-output SAE's latents on a task's prompts (the Circuits page's head panel).

For an SAE on ``blocks.L.attn.hook_z`` and a head ``h`` of layer ``L``, a latent's pre-activation at a token splits
exactly over heads (``engine.analysis.dfa.head_decomposition``). Here, at each prompt's last token, head ``h``'s term
of each latent counts where the latent fires (0 where it does not), averaged over the positive prompts and over the
counterfactual prompts separately.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from ..analysis.dfa import attention_layer, head_decomposition, linear_encoder
from ..model.loading import LoadedModel
from ..saes import SAE


class HeadLatents(NamedTuple):
    """``[d_sae]`` mean head terms on the positive and on the counterfactual prompts."""

    positive: np.ndarray
    negative: np.ndarray


@torch.inference_mode()
def head_terms(lm: LoadedModel, sae: SAE, prompts: Sequence[Sequence[int]], head: int) -> np.ndarray:
    """``[d_sae]``: head ``head``'s mean term in each latent's pre-activation at the prompts' last token, where the
    latent fires."""
    layer = attention_layer(lm, sae)  # a ValueError for an SAE not on attn.hook_z
    linear_encoder(sae)
    if not 0 <= head < lm.n_heads:
        raise ValueError(f"head {head} is out of range: layer {layer} has {lm.n_heads} heads")
    hook = f"blocks.{layer}.attn.hook_z"
    total = torch.zeros(sae.cfg.d_sae)
    by_length: dict[int, list[Sequence[int]]] = {}
    for ids in prompts:
        by_length.setdefault(len(ids), []).append(ids)
    for group in by_length.values():
        z = lm.capture(torch.tensor(group, dtype=torch.long), hook)[hook][:, -1]  # [batch, n_heads, d_head]
        terms = head_decomposition(sae, z)[..., head]  # [batch, d_sae]
        fires = sae.encode(sae.select_input(z).to(sae.device)).float() > 0
        total += (terms * fires.to(terms.device)).sum(0).cpu()
    return (total / max(len(prompts), 1)).numpy()


def head_latents(lm: LoadedModel, sae: SAE, positive: Sequence[Sequence[int]], negative: Sequence[Sequence[int]],
                 head: int) -> HeadLatents:
    """Head ``head``'s mean terms on the positive and on the counterfactual prompts."""
    return HeadLatents(head_terms(lm, sae, positive, head), head_terms(lm, sae, negative, head))


def top_latents(terms: HeadLatents, n: int = 8) -> tuple[list[int], list[int]]:
    """The ``n`` latents the head adds most to on the positive prompts and on the negative ones (ties: lower id)."""
    def best(v: np.ndarray) -> list[int]:
        order = np.argsort(-v, kind="stable")
        return [int(j) for j in order[:n] if v[j] > 0]

    return best(terms.positive), best(terms.negative)
