"""The runs ``compare`` and ``evaluate`` work on: their eval cards, the checks that they are comparable, and
the model and SAEs their manifests name (refused when the files there are not the ones the run was computed
with)."""

from __future__ import annotations

from collections.abc import Sequence

from ..run.manifest import sections
from ..run.store import RunStore

CARD_FIELDS = (
    "l0", "explained_variance", "ce_loss_increase", "ce_loss_increase_ci95", "ce_loss_recovered", "kl_div", "kl_score",
    "dead_fraction", "dense_fraction", "dm_error_r2", "dm_norm_r2",
)
"""The eval card of a run, in display order (``card``)."""


def card(store: RunStore) -> dict:
    """A run's eval card from its manifest: width and the aggregate metrics (dark matter: saescope's held-out R^2
    of the error and of its norm predicted linearly from x, not the paper's ``paper_*`` estimator)."""
    man = store.manifest()
    sae, metrics, dm = sections(man).sae, store.metrics(), store.dark_matter()
    return {
        "run": str(store.run_dir), "d_sae": int(sae.d_sae or 0), "architecture": sae.architecture,
        "k": sae.k, "n_tokens": metrics.n_tokens, "l0": metrics.l0,
        "explained_variance": metrics.explained_variance, "ce_loss_increase": metrics.ce_loss_increase,
        "ce_loss_increase_ci95": metrics.ce_loss_increase_ci95, "ce_loss_recovered": metrics.ce_loss_recovered,
        "kl_div": metrics.kl_div, "kl_score": metrics.kl_score, "dead_fraction": metrics.dead_fraction,
        "dense_fraction": metrics.dense_fraction,
        "dm_error_r2": dm.heldout_error_r2 if dm else None, "dm_norm_r2": dm.heldout_norm_r2 if dm else None,
    }


def check_comparable(stores: Sequence[RunStore]) -> None:
    """Refuse runs of SAEs on different models or hook points (a ValueError naming each run's)."""
    seen = {}
    for store in stores:
        run = sections(store.manifest())
        seen[str(store.run_dir)] = (run.model.hash, run.model.name, run.sae.hook, run.sae.d_in)
    if len({(h, hook, d) for h, _, hook, d in seen.values()}) > 1:
        lines = "; ".join(f"{run}: model {name} ({h}), hook {hook}, d_in {d}" for run, (h, name, hook, d) in seen.items())
        raise ValueError(f"these runs are not SAEs on the same model and hook point, so their latents cannot be "
                         f"compared: {lines}")
