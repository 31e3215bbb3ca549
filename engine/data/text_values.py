"""Each labelled text's value of every unit at an SAE's hook: the model's neurons there (what the SAE reads) and the
SAE's latents, pooled over the text's counted tokens (not position 0, not special, not a massive-activation token,
as sparse probing counts them). Concept separability (``engine.eval.separability``) and APP steering
(``engine.live.app``) fit their per-concept densities on these."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch

from ..model.loading import LoadedModel
from ..saes import SAE
from .activations import MASSIVE_FACTOR, stats_mask

POOLS = ("last", "max")


class UnitValues(NamedTuple):
    neurons: np.ndarray
    """``[n, d_in]`` float32: what the SAE reads, pooled per text."""
    latents: np.ndarray
    """``[n, d_sae]`` float32: its codes, pooled per text (0 where silent)."""


def pad_id(lm: LoadedModel) -> int:
    """A token to right-pad with (it is special, so never counted)."""
    for value in (lm.tokenizer.pad_token_id, lm.tokenizer.eos_token_id):
        if isinstance(value, int):
            return value
    return 0


def text_batches(lm: LoadedModel, sae: SAE, texts: Sequence[str], max_tokens: int, batch_size: int
                 ) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """Texts (each cut to ``max_tokens``, no special tokens added) in batches of similar length, right-padded:
    ``(rows, acts, mask)`` with ``rows`` the texts' indices, ``acts [batch, pos, d_in]`` what the SAE reads at its
    hook (hook_z heads flattened) and ``mask [batch, pos]`` the counted tokens: not position 0, not special, not
    padding, not a massive-activation token."""
    hook = sae.cfg.hook_name
    pad = pad_id(lm)
    ids = [lm.tokenizer(t, add_special_tokens=False)["input_ids"][:max_tokens] for t in texts]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = max(2, max(len(ids[i]) for i in rows))
        batch = torch.full((len(rows), width), pad, dtype=torch.long)
        real = torch.zeros(len(rows), width, dtype=torch.bool)
        for r, i in enumerate(rows):
            batch[r, : len(ids[i])] = torch.tensor(ids[i], dtype=torch.long)
            real[r, : len(ids[i])] = True
        acts = sae.select_input(lm.capture(batch, hook)[hook])
        acts = acts.flatten(-2) if acts.ndim == 4 else acts
        mask = (stats_mask(batch, lm.special_token_ids) & real).to(acts.device)
        if mask.any():  # massive-activation tokens (attention sinks) are not counted
            norms = acts.float().norm(dim=-1)
            mask &= norms < MASSIVE_FACTOR * norms[mask].median()
        yield rows, acts, mask


@torch.inference_mode()
def unit_values(lm: LoadedModel, sae: SAE, texts: Sequence[str], pool: str = "last", max_tokens: int = 128,
                batch_size: int = 16) -> UnitValues:
    """Each text's value of every neuron at the SAE's hook and of every latent (``pool``: at the last counted token,
    or the maximum over counted tokens; special tokens are never counted)."""
    neurons = np.zeros((len(texts), sae.cfg.d_in), np.float32)
    latents = np.zeros((len(texts), sae.cfg.d_sae), np.float32)
    for rows, acts, mask in text_batches(lm, sae, texts, max_tokens, batch_size):
        acts = acts.float()
        width = acts.shape[1]
        codes = sae(acts.flatten(0, 1).to(sae.device, sae.dtype)).codes.float().view(len(rows), width, -1).to(acts.device)
        for r, i in enumerate(rows):
            counted = torch.nonzero(mask[r]).flatten()
            if not len(counted):
                continue
            if pool == "last":
                neurons[i], latents[i] = acts[r, counted[-1]].cpu().numpy(), codes[r, counted[-1]].cpu().numpy()
            else:
                neurons[i] = acts[r, counted].amax(0).cpu().numpy()
                latents[i] = codes[r, counted].amax(0).cpu().numpy()
    return UnitValues(neurons, latents)
