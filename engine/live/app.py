"""APP steering (Attenuation via Posterior Probabilities; Fereidouni et al., "Evaluating Sparse Autoencoders for
Monosemantic Representation", reference MultifacetedNLP/SAEMonosemanticity ``FineGrainedBlocking*.py``): suppress
one labelled concept by scaling latents at the SAE's hook, every position.

Fitting (``fit_concept``): the latents' pooled values on the concept file's *fitting* texts (even lines per
concept, ``engine.data.text_values``) give, per latent, the concepts it is active for and their KDEs
(``engine.analysis.concepts.ConceptDensities``). Latents active for the concept only are set to 0; latents it
shares with another concept are multiplied by ``1 - P(concept | a)``, ``P = p_c(a) / (sum_j p_j(a) + 1e-12)`` over
the active concepts' densities (equal priors, as the reference), except beyond 2.5 standard deviations of the
concept's own values (left alone, the reference's tail rule). The baseline is zero-ablation of every latent the
concept is active for. Both change only the latents' part of the activation (``x + sum_i (m_i - 1) f_i(x)
W_dec[i]``, the SAE error kept, as clamping does); the reference splices the reconstruction in instead.

``removal_report`` measures them on the *held-out* texts (odd lines): the mean next-token loss, and its
perplexity, on the concept's texts (removal: how much the model loses on the concept) and on the other concepts'
texts (cost), for the clean model, APP and zero-ablation.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..analysis.concepts import ConceptDensities, Concepts
from ..analysis.interventions import check_sae_fits
from ..assets import data_dir
from ..data.text_values import unit_values
from ..model.loading import LoadedModel
from ..saes import SAE
from .steering import InterventionFactory


def concepts_path(text: str) -> Path:
    """A concepts file: ``text`` as a path when it exists, else a file of that name in the data folder's
    ``concepts/`` (where the demo's are)."""
    given = Path(text).expanduser()
    if given.is_file():
        return given
    shipped = data_dir() / "concepts" / text
    if shipped.is_file():
        return shipped
    raise FileNotFoundError(f"no concepts file {text!r} (looked at {given} and {shipped}): give a JSONL of "
                            "{\"text\", \"label\"} lines")


def split_texts(concepts: Concepts) -> tuple[np.ndarray, np.ndarray]:
    """Fitting and held-out text indices: alternate texts of each concept (its 1st, 3rd, ... fit)."""
    fit, held = [], []
    for c in range(len(concepts.names)):
        rows = np.nonzero(concepts.labels == c)[0]
        fit += rows[::2].tolist()
        held += rows[1::2].tolist()
    return np.array(sorted(fit), dtype=np.int64), np.array(sorted(held), dtype=np.int64)


def fit_concept(lm: LoadedModel, sae: SAE, concepts: Concepts, concept: str, *, pool: str = "last",
                share: float = 0.1, max_tokens: int = 128) -> ConceptDensities:
    """APP's densities for suppressing ``concept`` (one of ``concepts.names``), fitted on the fitting texts."""
    if concept not in concepts.names:
        raise ValueError(f"no concept {concept!r} in the file: its labels are {', '.join(concepts.names)}")
    fit, _ = split_texts(concepts)
    values = unit_values(lm, sae, [concepts.texts[i] for i in fit], pool, max_tokens).latents
    return ConceptDensities.fit(values, values > 0, concepts.labels[fit], len(concepts.names),
                                concepts.names.index(concept), share)


@contextlib.contextmanager
def scaled_latents(lm: LoadedModel, sae: SAE, zeroed: Sequence[int], densities: ConceptDensities | None) -> Iterator[None]:
    """Within the block, latents ``zeroed`` are set to 0 and (with ``densities``) its shared latents multiplied by
    APP's factor, at every position of the SAE's hook."""
    hook = check_sae_fits(lm, sae)
    zero = torch.as_tensor(list(zeroed), dtype=torch.long, device=sae.device)
    shared = torch.as_tensor(densities.shared if densities is not None else [], dtype=torch.long, device=sae.device)

    def fn(x: torch.Tensor) -> torch.Tensor:
        x_in = sae.select_input(x)
        codes = sae.encode(x_in).float()
        delta = torch.zeros(*codes.shape[:-1], sae.cfg.d_in, dtype=torch.float32, device=codes.device)
        if len(zero):
            delta = delta - codes[..., zero] @ sae.W_dec[zero].float()
        if densities is not None and len(shared):
            a = codes[..., shared]
            factor = densities.multipliers(a).float()
            delta = delta + ((factor - 1) * a) @ sae.W_dec[shared].float()
        if delta.shape[-1] != x_in.shape[-1]:
            delta = delta.unflatten(-1, x_in.shape[-2:])
        return sae.replace_input(x, x_in.float() + delta)

    with lm.hooks.intervene(hook, fn):
        yield


def app_intervention(lm: LoadedModel, sae: SAE, densities: ConceptDensities) -> InterventionFactory:
    """A factory of APP scopes (for ``steering.generate`` / ``compare``)."""
    return lambda: scaled_latents(lm, sae, densities.exclusive, densities)


def zero_intervention(lm: LoadedModel, sae: SAE, densities: ConceptDensities) -> InterventionFactory:
    """A factory of scopes zero-ablating every latent the concept is active for (APP's baseline)."""
    return lambda: scaled_latents(lm, sae, [*densities.exclusive, *densities.shared], None)


@torch.inference_mode()
def mean_loss(lm: LoadedModel, texts: Sequence[str], intervention: InterventionFactory | None = None,
              max_tokens: int = 128) -> tuple[float, int]:
    """Mean next-token loss (nats) over the texts' predictions, one text per forward, and their count."""
    total, count = 0.0, 0
    for text in texts:
        ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
        if len(ids) < 2:
            continue
        batch = torch.tensor([ids], dtype=torch.long, device=lm.device)
        with intervention() if intervention is not None else contextlib.nullcontext():
            logits = lm.model(input_ids=batch).logits[0, :-1].float()
        total += float(torch.nn.functional.cross_entropy(logits, batch[0, 1:], reduction="sum"))
        count += len(ids) - 1
    return (total / count if count else float("nan")), count


@dataclass(frozen=True)
class RemovalRow:
    method: str
    """``clean``, ``APP`` or ``zero-ablation``."""
    concept_loss: float
    """Mean next-token loss on the concept's held-out texts (nats)."""
    other_loss: float
    """On the other concepts' held-out texts."""

    @property
    def concept_ppl(self) -> float:
        return math.exp(self.concept_loss)

    @property
    def other_ppl(self) -> float:
        return math.exp(self.other_loss)


def removal_report(lm: LoadedModel, sae: SAE, concepts: Concepts, densities: ConceptDensities, *,
                   texts_per_side: int = 16, max_tokens: int = 128) -> list[RemovalRow]:
    """Clean, APP and zero-ablation losses on up to ``texts_per_side`` held-out texts of the concept and of the
    others (the others' taken in turn from each other concept)."""
    _, held = split_texts(concepts)
    mine = [i for i in held if concepts.labels[i] == densities.concept][:texts_per_side]
    rest = [i for i in held if concepts.labels[i] != densities.concept]
    order = np.argsort([np.sum(concepts.labels[rest[: j + 1]] == concepts.labels[rest[j]]) for j in range(len(rest))],
                       kind="stable")  # round-robin over the other concepts
    other = [rest[j] for j in order][:texts_per_side]
    sides = ([concepts.texts[i] for i in mine], [concepts.texts[i] for i in other])
    rows = []
    for method, factory in (("clean", None), ("APP", app_intervention(lm, sae, densities)),
                            ("zero-ablation", zero_intervention(lm, sae, densities))):
        losses = [mean_loss(lm, texts, factory, max_tokens)[0] for texts in sides]
        rows.append(RemovalRow(method, *losses))
    return rows
