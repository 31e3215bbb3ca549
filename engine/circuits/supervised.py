"""Supervised dictionaries and the maths of the three axes of Makelov et al. 2024 ("Towards Principled Evaluations of
Sparse Autoencoders for Interpretability and Control"; reference amakelov/sae).

- Dictionary (the reference's mean codes, ``get_mean_codes``): for activations ``x_p`` of prompts ``p`` with attribute
  values ``v_a(p)``, the bias is ``m = mean_p x_p`` and the code of value ``v`` of attribute ``a`` is
  ``u_{a,v} = mean_{p: v_a(p) = v} (x_p - m)``; a prompt is reconstructed as ``m + sum_a u_{a, v_a(p)}``. Closed
  form, no fitting. When the attributes are balanced and independent in the prompts (a full factorial design) and the
  activations are exactly such a sum with centred codes, this recovers the codes exactly.
- Interpretability: latent ``j`` "active" on a prompt when its code is > 0; precision / recall / F1 of "active" against
  "attribute = v" over the prompts (the reference's ``get_feature_scores``; 0/0 counts as 0, as scikit-learn's
  ``zero_division=0``).
- Control: an edit of one attribute from its clean value to its counterfactual value. Supervised: ``x - u_{a,old} +
  u_{a,new}``. SAE (the reference's ``get_edit_using_f1_scores``, version 2): of the latents ranked by F1 for the clean
  value, the first ``k`` active on the clean activation are removed (``- f_j d_j``); of those ranked for the
  counterfactual value, the first ``k`` active on the counterfactual activation are added with their counterfactual
  magnitudes (``+ f'_j d_j``). The edit is added to the activation itself, not to its reconstruction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class SupervisedDictionary:
    """``mean [d]`` and each attribute value's code ``vectors[attribute][value] [d]``."""

    mean: torch.Tensor
    vectors: dict[str, dict[str, torch.Tensor]]

    def has(self, labels: Mapping[str, str]) -> bool:
        """Whether every attribute value of a prompt has a code (was seen when the dictionary was built)."""
        return all(labels[a] in self.vectors[a] for a in self.vectors)

    def reconstruct(self, labels: Mapping[str, Sequence[str]]) -> torch.Tensor:
        """``[n, d]``: ``mean + sum_a u_{a, v_a(p)}`` for the prompts whose values ``labels[a]`` lists."""
        n = len(next(iter(labels.values())))
        out = self.mean.expand(n, -1).clone()
        for attribute, codes in self.vectors.items():
            out += torch.stack([codes[v] for v in labels[attribute]])
        return out

    def edit(self, x: torch.Tensor, attribute: str, old: Sequence[str], new: Sequence[str]) -> torch.Tensor:
        """``x [n, d]`` with attribute ``attribute`` moved from ``old[i]`` to ``new[i]``: ``x - u_old + u_new``."""
        codes = self.vectors[attribute]
        return x - torch.stack([codes[v] for v in old]) + torch.stack([codes[v] for v in new])


def mean_codes(x: torch.Tensor, labels: Mapping[str, Sequence[str]]) -> SupervisedDictionary:
    """The supervised dictionary of activations ``x [n, d]`` (float32) whose attribute values are ``labels``."""
    x = x.float()
    mean = x.mean(0)
    centred = x - mean
    vectors: dict[str, dict[str, torch.Tensor]] = {}
    for attribute, values in labels.items():
        if len(values) != x.shape[0]:
            raise ValueError(f"{len(values)} values of {attribute!r} for {x.shape[0]} activations")
        vectors[attribute] = {v: centred[[i for i, w in enumerate(values) if w == v]].mean(0) for v in sorted(set(values))}
    return SupervisedDictionary(mean, vectors)


@dataclass(frozen=True)
class F1Table:
    """Each latent's precision, recall and F1 (``[d_sae, n_values]``) for each value of one attribute."""

    values: tuple[str, ...]
    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    support: np.ndarray
    """``[n_values]``: prompts with each value."""

    def best(self) -> np.ndarray:
        """``[n_values]``: the best F1 of any latent for each value."""
        return self.f1.max(0)

    def ranked(self, value: str) -> np.ndarray:
        """Latents with F1 > 0 for ``value``, best first (ties: lower index first)."""
        column = self.f1[:, self.values.index(value)]
        order = np.argsort(-column, kind="stable")
        return order[column[order] > 0]


def f1_table(active: np.ndarray, labels: Sequence[str]) -> F1Table:
    """Scores of ``active [n, d_sae]`` (bool) against each value of ``labels`` (one per prompt)."""
    values = tuple(sorted(set(labels)))
    onehot = np.array([[w == v for v in values] for w in labels], dtype=np.float64)
    act = active.astype(np.float64)
    hits = act.T @ onehot
    fired = act.sum(0)[:, None]
    support = onehot.sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(fired > 0, hits / np.maximum(fired, 1), 0.0)
        recall = hits / support[None]
        f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-300), 0.0)
    return F1Table(values, precision, recall, f1, support)


def _first_active(ranked: np.ndarray, codes: torch.Tensor, k: int) -> list[int]:
    return [int(j) for j in ranked if codes[int(j)] > 0][:k]


def exchange_codes(codes: torch.Tensor, cf_codes: torch.Tensor, remove: Sequence[np.ndarray],
                   add: Sequence[np.ndarray], k: int) -> tuple[torch.Tensor, list[list[int]], list[list[int]]]:
    """The change of codes ``[n, d_sae]`` of the SAE edit: for prompt ``i``, minus the codes of the first ``k`` latents
    of ``remove[i]`` active in ``codes[i]``, plus the counterfactual codes of the first ``k`` of ``add[i]`` active in
    ``cf_codes[i]``; and the latents removed and added."""
    delta = torch.zeros_like(codes, dtype=torch.float32)
    removed, added = [], []
    for i in range(codes.shape[0]):
        out, into = _first_active(remove[i], codes[i], k), _first_active(add[i], cf_codes[i], k)
        delta[i, out] -= codes[i, out].float()
        delta[i, into] += cf_codes[i, into].float()
        removed.append(out)
        added.append(into)
    return delta, removed, added
