"""The runs ``compare`` and ``evaluate`` work on: their eval cards, the checks that they are comparable, and
the model and SAEs their manifests name (refused when the files there are not the ones the run was computed
with)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..model.loading import LoadedModel
from ..run import rundir
from ..run.store import RunStore
from ..saes import SAE

CARD_FIELDS = (
    "l0", "explained_variance", "ce_loss_increase", "ce_loss_increase_ci95", "ce_loss_recovered", "kl_div", "kl_score",
    "dead_fraction", "dense_fraction", "dm_error_r2", "dm_norm_r2",
)
"""The eval card of a run, in display order (``card``)."""


def card(store: RunStore) -> dict:
    """A run's eval card from its manifest: width and the aggregate metrics (dark matter: held-out R^2 of the
    error and of its norm predicted linearly from x)."""
    man = store.manifest()
    sae, metrics, dm = man.get("sae") or {}, store.metrics(), store.dark_matter()
    return {
        "run": str(store.run_dir), "d_sae": int(sae.get("d_sae") or 0), "architecture": sae.get("architecture"),
        "k": sae.get("k"), "n_tokens": metrics.n_tokens, "l0": metrics.l0,
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
        man = store.manifest()
        model, sae = man.get("model") or {}, man.get("sae") or {}
        seen[str(store.run_dir)] = (model.get("hash"), model.get("name"), sae.get("hook"), sae.get("d_in"))
    if len({(h, hook, d) for h, _, hook, d in seen.values()}) > 1:
        lines = "; ".join(f"{run}: model {name} ({h}), hook {hook}, d_in {d}" for run, (h, name, hook, d) in seen.items())
        raise ValueError(f"these runs are not SAEs on the same model and hook point, so their latents cannot be "
                         f"compared: {lines}")


def load_run_sae(store: RunStore, device=None) -> SAE:
    """The SAE the run's manifest names, checked against the fingerprint the run recorded."""
    from ..saes import load_sae

    sae_info = store.manifest().get("sae") or {}
    path = sae_info.get("path")
    if not path or not Path(path).exists():
        raise FileNotFoundError(f"the SAE of run {store.run_dir} is not at {path!r} (the path its manifest records)")
    sae = load_sae(path, device=device or "cpu")
    if sae_info.get("hash") and rundir.sae_fingerprint(sae) != sae_info["hash"]:
        raise ValueError(f"the SAE at {path} is not the one run {store.run_dir} was computed with (its weights changed)")
    return sae


def load_run_model(store: RunStore, lm: LoadedModel | None = None, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """The run's model (``lm`` if given), checked against the fingerprint the run recorded."""
    from ..model.loading import load_model

    model = store.manifest().get("model") or {}
    if lm is None:
        if not model.get("name"):
            raise ValueError(f"the manifest of {store.run_dir} does not say which model the run was computed on")
        lm = load_model(model["name"], device=device, dtype=dtype)
    if model.get("hash") and rundir.model_fingerprint(lm) != model["hash"]:
        raise ValueError(f"the model {lm.name} is not the one run {store.run_dir} was computed on")
    return lm
