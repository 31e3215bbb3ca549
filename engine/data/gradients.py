"""The next-token loss gradient with respect to a hooked activation (what a g-SAE selects with): one full forward
and one backward of the model per batch, teacher-forced on the context's own tokens.

The loss is each context's summed next-token cross-entropy (summed, not averaged, so a token's gradient does not
shrink with the batch or context size). The last position predicts no labelled token and nothing later reads it, so
its gradient is exactly zero: a g-SAE's rule there is plain TopK.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F

from ..model.hooks import interventions
from ..model.loading import LoadedModel
from .activations import ActivationBatch, batched, massive_tokens, stats_mask


def hook_gradients(lm: LoadedModel, hook_name: str, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations ``[batch, pos, width]`` (model dtype) at ``hook_name`` and the next-token loss gradient there
    (float32), for ``token_ids [batch, pos]``; per-head hooks are flattened. A ValueError where no gradient exists."""
    lm.hooks.check(hook_name)
    if token_ids.ndim != 2 or token_ids.shape[1] < 2:
        raise ValueError(f"no next-token labels in contexts of shape {tuple(token_ids.shape)}: a loss gradient needs "
                         "contexts of at least 2 tokens")
    store: dict[str, torch.Tensor] = {}

    def grab(act: torch.Tensor) -> torch.Tensor:
        leaf = act.detach().clone().requires_grad_(True)
        store["x"] = leaf
        return leaf

    with torch.inference_mode(False), torch.enable_grad(), interventions(lm.hooks, [(hook_name, grab)]):
        ids = token_ids.to(lm.device).clone()  # not an inference tensor (callers may be in inference mode)
        logits = lm.model(input_ids=ids, use_cache=False).logits
        leaf = store.get("x")
        if leaf is None:
            raise RuntimeError(f"hook point {hook_name} was not reached by the forward pass")
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum")
        grad = None
        if loss.requires_grad:
            (grad,) = torch.autograd.grad(loss, leaf, allow_unused=True)
    if grad is None:
        raise ValueError(f"the model's next-token loss does not depend on {hook_name}: there is no loss gradient "
                         "there for a g-SAE to select with")
    acts, grad = leaf.detach(), grad.float()
    if acts.ndim == 4:  # per-head hook: [batch, pos, n_heads, d_head] flattened as iter_activations does
        acts, grad = acts.flatten(-2), grad.flatten(-2)
    return acts, grad


def iter_gradients(
    lm: LoadedModel, hook_name: str, contexts: Iterable[list[int]], batch_size: int, *, include_special: bool = False,
    include_first: bool = False, include_massive: bool = False,
) -> Iterator[ActivationBatch]:
    """``iter_activations`` (the same masks) with each batch's loss gradient at the hook in ``grads``."""
    for token_ids in batched(contexts, batch_size):
        acts, grads = hook_gradients(lm, hook_name, token_ids)
        mask = stats_mask(token_ids, lm.special_token_ids, include_special=include_special, include_first=include_first)
        mask = mask.to(acts.device)
        massive = massive_tokens(acts, mask)
        if not include_massive:
            mask &= ~massive
        yield ActivationBatch(token_ids, acts, mask, None, massive, grads)
