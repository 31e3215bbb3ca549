"""The prompt lens of a g-SAE: per token, the pre-activation ``z``, the gradient term ``beta * z * |W_dec grad|``
and the latents the gradient alone admitted (they fire under the g-SAE rule, not under plain TopK over ``z``).

One full forward and one backward of the prompt (teacher-forced on its own tokens, ``data.gradients``); the last
token has no next-token label, so its gradient is zero and its rule is plain TopK.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..analysis.interventions import check_sae_fits
from ..data.activations import stats_mask
from ..data.gradients import hook_gradients
from ..model.loading import LoadedModel
from ..model.tokens import display_tokens
from ..saes import SAE
from ..saes.gradient_topk import GradientTopKSAE, gradient_scores


@dataclass(frozen=True)
class GradientToken:
    """One prompt token under a g-SAE."""

    position: int
    token: str
    admitted: list[tuple[int, float, float]]
    """Latents admitted by the gradient alone: (latent, z, gradient term)."""
    displaced: list[int]
    """Latents plain TopK would have kept that the gradient pushed out."""
    top: list[tuple[int, float, float]]
    """The token's firing latents under the g-SAE rule: (latent, z, gradient term), by activation."""
    has_gradient: bool
    """False at the last token (no next-token label: plain TopK) and at excluded tokens."""


def gradient_lens(lm: LoadedModel, sae: SAE, token_ids: list[int], *, top_k: int = 8) -> list[GradientToken]:
    """Each token's gradient admissions under the g-SAE ``sae``."""
    if not isinstance(sae, GradientTopKSAE):
        raise ValueError(f"the gradient lens is for g-SAEs; this SAE is {sae.cfg.architecture}")
    hook = check_sae_fits(lm, sae)
    ids = torch.tensor([token_ids[: lm.max_context]], dtype=torch.long)
    if ids.shape[1] < 2:
        raise ValueError("the gradient lens needs a prompt of at least 2 tokens (a next-token loss)")
    acts, grads = hook_gradients(lm, hook, ids)
    mask = stats_mask(ids, lm.special_token_ids)[0]
    with torch.no_grad():
        x = acts[0].to(sae.device)
        g = grads[0].to(sae.device)
        sae_in, _, _ = sae.process_in(x)
        pre = (sae_in @ sae.W_enc + sae.b_enc).float()
        term = gradient_scores(pre, g, sae.W_dec.float(), sae.cfg.gradient_beta) - pre
        with_grad = sae.encode(x, grad=g).float()
        plain = sae.encode(x).float()
    strings = display_tokens(lm.tokenizer, ids[0].tolist())
    out = []
    for p in range(ids.shape[1]):
        fired, plain_fired = with_grad[p] > 0, plain[p] > 0
        if not bool(mask[p]):
            fired = plain_fired = torch.zeros_like(fired)
        admitted = torch.nonzero(fired & ~plain_fired).flatten().tolist()
        displaced = torch.nonzero(plain_fired & ~fired).flatten().tolist()
        order = with_grad[p].argsort(descending=True)[: int(fired.sum().clamp_max(top_k))].tolist()
        out.append(GradientToken(
            position=p, token=strings[p],
            admitted=[(i, float(pre[p, i]), float(term[p, i])) for i in admitted],
            displaced=displaced,
            top=[(i, float(pre[p, i]), float(term[p, i])) for i in order],
            has_gradient=bool(mask[p]) and p < ids.shape[1] - 1,
        ))
    return out
