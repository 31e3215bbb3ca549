"""Head attribution of an ``attn.hook_z`` SAE, gathered in the main pass (Kissane et al., 2024).

Three things per latent, no second pass over the corpus:

* weight-based head shares: each head's share of ``||W_dec[i]||^2`` (``head_weight_shares``), from the weights;
* the DFA of each top example at its max token: the latent's pre-activation there split over (head, source token)
  (``dfa_compact``), kept as the ``n_sources`` largest contributions, the sum of the rest, the bias, and the
  per-head totals. It is computed while the batch's attention capture is in memory, for the pairs
  ``ExampleReservoirs.top_candidates`` says may enter the top k, and rides in the reservoir's top slots as a payload;
* data-based head shares: over the latent's top examples, each head's summed contribution at the max token divided by
  the summed ``pre - bias`` (so shares sum to 1; a head working against the latent gets a negative share).

Residual and MLP SAEs get none of these (null columns); SAEs whose pre-activations do not split over heads
(matching pursuit, per-token ``layer_norm``) get the weight-based shares only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..analysis.dfa import LatentReadout, dfa_compact, head_weight_shares, latent_readout
from ..model.attention import AttentionCapture
from ..model.families import parse_hook_name
from ..model.loading import LoadedModel
from ..saes import SAE
from .reservoirs import TopCandidates

HEAD_TERMS = "head_terms"
"""Payload name of the per-head totals (the only payload field the data-based shares read)."""


def attention_hook(hook: str) -> int | None:
    """The layer of an ``attn.hook_z`` hook, None for any other hook."""
    try:
        layer, kind = parse_hook_name(hook)
    except ValueError:
        return None
    return layer if kind == "attn.hook_z" else None


def weight_shares(lm: LoadedModel, sae: SAE) -> np.ndarray | None:
    """``[d_sae, n_heads]`` float32 weight-based head shares of an ``attn.hook_z`` SAE; None for other hooks."""
    if attention_hook(sae.cfg.hook_name) is None:
        return None
    return head_weight_shares(sae, lm.n_heads).cpu().numpy().astype(np.float32)


@dataclass
class HeadAttribution:
    """What the pass needs to attribute top examples to heads and sources (see the module docstring)."""

    sae: SAE
    readout: LatentReadout
    layer: int
    n_heads: int
    n_sources: int
    seconds: float = field(default=0.0)
    """Time spent in ``payload`` (the DFA of candidate pairs)."""
    pairs: int = field(default=0)
    """Candidate pairs attributed so far."""

    @classmethod
    def setup(cls, lm: LoadedModel, sae: SAE, n_sources: int) -> tuple[HeadAttribution | None, str | None]:
        """The attribution for ``sae`` on ``lm``, or None and why not (None and None for a non-attention hook)."""
        layer = attention_hook(sae.cfg.hook_name)
        if layer is None:
            return None, None
        if n_sources < 1:
            return None, "turned off (dfa_sources = 0)"
        try:
            readout = latent_readout(sae, lm.device)
        except ValueError as err:
            return None, str(err)
        return cls(sae, readout, layer, lm.n_heads, n_sources), None

    def payload_spec(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """The reservoir payload of one top example."""
        n = self.n_sources
        return {
            "dfa_head": ((n,), torch.int16), "dfa_source": ((n,), torch.int16), "dfa_value": ((n,), torch.float32),
            "dfa_rest": ((), torch.float32), "dfa_bias": ((), torch.float32), HEAD_TERMS: ((self.n_heads,), torch.float32),
        }

    @torch.inference_mode()
    def payload(self, capture: AttentionCapture, found: TopCandidates) -> dict[str, torch.Tensor]:
        """The compact DFA of each candidate pair of the batch ``capture`` describes (rows ``[P, ...]``)."""
        tick = time.perf_counter()
        out = dfa_compact(self.sae, capture, found.latent, found.pos, found.row, self.n_sources, self.readout)
        pad = self.n_sources - out.value.shape[1]  # a context shorter than n_sources / n_heads positions
        payload = {
            "dfa_head": _pad(out.head, pad, -1).to(torch.int16), "dfa_source": _pad(out.source, pad, -1).to(torch.int16),
            "dfa_value": _pad(out.value, pad, 0.0), "dfa_rest": out.rest, "dfa_bias": out.bias, HEAD_TERMS: out.by_head,
        }
        self.seconds += time.perf_counter() - tick
        self.pairs += len(found.latent)
        return payload

    def manifest(self) -> dict:
        """The manifest's ``head_attribution`` section."""
        return {
            "layer": self.layer, "n_heads": self.n_heads, "dfa": True, "sources_per_example": self.n_sources,
            "data_shares": "top examples, at the max token: per-head sum / sum of pre - bias",
            "pairs_attributed": self.pairs, "seconds": round(self.seconds, 4),
        }


def _pad(t: torch.Tensor, n: int, value: float) -> torch.Tensor:
    return t if n <= 0 else torch.nn.functional.pad(t, (0, n), value=value)


def data_shares(terms: np.ndarray) -> list[np.ndarray | None]:
    """Per latent, ``terms [n_heads]`` summed over its top examples -> shares summing to 1 (None without examples or
    where the sum is 0)."""
    out: list[np.ndarray | None] = []
    for row in terms:
        total = float(row.sum(dtype=np.float64))
        out.append(None if not np.isfinite(total) or total == 0 else (row / total).astype(np.float32))
    return out
