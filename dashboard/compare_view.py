"""Parts of the Compare page: the runs it can compare, eval cards side by side, curves across widths, a latent and
its counterparts in the other run with their top examples side by side. Engine calls only (``engine.eval``)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

from dashboard import cache, charts, common, render
from dashboard.feature_view import example_html
from dashboard.render import fmt
from engine.run.manifest import sections
from engine.run.schema import MANIFEST

CARD = {
    "l0": "L0", "explained_variance": "Explained variance", "ce_loss_increase": "CE loss increase (nats)",
    "ce_loss_increase_ci95": "CE loss increase: ± 95% interval", "ce_loss_recovered": "CE loss recovered",
    "kl_div": "KL to clean", "kl_score": "KL score", "dead_fraction": "Dead fraction",
    "dense_fraction": "Dense fraction (> 10%)",
    "dm_error_r2": "Dark matter (saescope's fit): error variance predicted",
    "dm_norm_r2": "Dark matter (saescope's fit): ‖e‖ predicted",
}
EVALUATION = {
    "core/l2_ratio": "L2 ratio ‖x̂‖/‖x‖", "core/relative_reconstruction_bias": "Relative reconstruction bias",
    "core/cosine": "cos(x, x̂)", "core/frac_over_1pct": "Latents firing on > 1%",
    "core/frac_over_10pct": "Latents firing on > 10%",
    "sparse_probing/llm_accuracy": "Probing: dense probe on x (ceiling)",
    "sparse_probing/sae_top_k_accuracy@1": "Probing: 1 latent", "sparse_probing/sae_top_k_accuracy@5": "Probing: 5 latents",
    "sparse_probing/sae_top_k_accuracy@20": "Probing: 20 latents",
    "absorption/mean_absorption_fraction": "Absorption fraction", "absorption/mean_full_absorption": "Full absorption rate",
    "absorption/std_dev_absorption_fraction": "Absorption fraction: sd over letters",
    "absorption/mean_num_split_features": "Split features per letter",
    "separability/mean_js_all": "Concept separability (JS distance): latents",
    "separability/mean_js_polysemantic": "Concept separability: latents active on ≥ 2 concepts",
    "separability/polysemantic_fraction": "Latents active on ≥ 2 concepts",
    "separability/neuron_mean_js_all": "Concept separability: the hook's neurons",
}
EXAMPLES = 5


FAMILY_COLUMNS = {
    "sae": "SAE", "architecture": "family", "l0_mean": "L0 mean", "l0_p5": "L0 p5", "l0_p50": "L0 p50",
    "l0_p95": "L0 p95", "explained_variance_without_massive": "explained variance",
    "explained_variance": "explained variance (massive tokens too)", "ce_loss_recovered": "CE loss recovered",
    "kl_div": "KL", "heldout_silent_fraction": "silent (held out)", "dead_fraction_training": "dead (training)",
    "dense_fraction": "dense (> 10%)", "steer_shift": "steering Δlog p at equal cost",
    "steer_shift_per_unit": "Δlog p per unit strength", "steer_reached_fraction": "latents reaching the cost",
}


def family_tables() -> list[Path]:
    """Folders with a family table (``saescope family-table --out``): the served run directory, its
    sub-directories and, when it is one run, its parent's sub-directories."""
    from engine.train.family_table import INFO_FILE

    root = cache.run_root()
    if root is None or not root.exists():
        return []
    places = [root, *(p for p in root.iterdir() if p.is_dir())] if root.is_dir() else []
    if (root / MANIFEST).is_file():
        places += [p for p in root.parent.iterdir() if p.is_dir()]
    return sorted({p for p in places if (p / INFO_FILE).is_file()})


def family_table(folder: Path) -> None:
    """The family table: SAEs of several families on the same held-out tokens, their L0 distributions and the
    markdown for the README."""
    from engine.train.family_table import read_family_table

    found = read_family_table(folder)
    if found is None:
        return
    table, info = found
    shown = pd.DataFrame({FAMILY_COLUMNS[c]: table[c] for c in FAMILY_COLUMNS if c in table.columns})
    st.dataframe(shown, hide_index=True, width="stretch",
                 column_config={name: st.column_config.NumberColumn(format="%.3g")
                                for name in shown.columns if name not in ("SAE", "family")})
    cfg = info.get("settings", {})
    st.caption(
        f"{render.md(info.get('model', ''))} at {render.code(info.get('hook', ''))}, the same "
        f"{cfg.get('eval_contexts', 0):,} held-out contexts of {cfg.get('context_len', 0):,} tokens for every SAE "
        f"({render.code(folder)}). Steering: {cfg.get('steer_latents', 0)} live latents per SAE, their top "
        f"{cfg.get('steer_top_tokens', 0)} promoted tokens, strength (in units of the median activation norm, "
        f"{fmt(info.get('median_norm'))}) set where the continuation's loss rises by "
        f"{fmt(cfg.get('steer_fluency_cost'))} nats; docs/families.md defines each column.")
    hists = {name: (d["l0_histogram"]["edges"], d["l0_histogram"]["counts"]) for name, d in info.get("saes", {}).items()}
    if hists:
        st.plotly_chart(charts.l0_distributions(hists), key="family_l0")
    with st.expander("Markdown (README-ready)"):
        st.code(info.get("markdown", ""), language="markdown")


def known_runs() -> dict[str, str]:
    """Name -> path of every complete run the app serves (a directory of runs gives several)."""
    root = cache.run_root()
    if root is None or not root.exists():
        return {}
    return {Path(p).name: p for p in cache.list_runs(str(root)) if (Path(p) / MANIFEST).is_file()}


def identity(run: str) -> tuple:
    """What two runs must share to be compared: the model's hash, the SAE's hook point and input width."""
    info = sections(cache.manifest(run))
    return info.model.hash, info.sae.hook, info.sae.d_in


def peers(identities: dict[str, tuple]) -> dict[str, list[str]]:
    """Each run -> the other runs it can be compared with (the same identity), in the given order."""
    return {n: [m for m in identities if m != n and identities[m] == ident] for n, ident in identities.items()}


def opening_pair(peers: dict[str, list[str]], a: str | None, b: str | None, fallback: str | None) -> tuple[str, str] | None:
    """The pair the page opens on: ``a`` (a link's) if it can be compared with something, else ``fallback`` (the
    sidebar's run) if it can, else the first run that can; with ``b`` when it is one of its peers, else its first
    peer. ``None`` when no two runs can be compared."""
    first = next((n for n in (a, fallback, *peers) if n in peers and peers[n]), None)
    if first is None:
        return None
    return first, b if b in peers[first] else peers[first][0]


def describe_runs(names: list[str], identities: dict[str, tuple]) -> str:
    """Markdown naming each run with its hook point, runs that can be compared grouped together."""
    groups: dict[tuple, list[str]] = {}
    for name in names:
        groups.setdefault(identities[name], []).append(name)
    return "; ".join(", ".join(render.code(n) for n in group) + f" (on {render.code(ident[1])})"
                     for ident, group in groups.items())


def cards(names: list[str], paths: list[str]) -> None:
    """The runs' eval cards (and evaluation results where a run has them) as one table, a column per run."""
    rows = {label: [cache.card(p).get(key) for p in paths] for key, label in CARD.items()}
    evaluations = [cache.evaluation(p) for p in paths]
    for key, label in EVALUATION.items():
        values = [e[0].get(key) if e else None for e in evaluations]
        if any(v is not None for v in values):
            rows[label] = values
    columns = [f"{n} ({cache.card(p)['d_sae']:,})" for n, p in zip(names, paths, strict=True)]
    table = pd.DataFrame({"metric": list(rows), **{c: [fmt(rows[m][i], 4) for m in rows] for i, c in enumerate(columns)}})
    st.dataframe(table, hide_index=True, width="stretch", height=35 * (len(table) + 1) + 3)  # every row, no scrolling
    for name, e in zip(names, evaluations, strict=True):
        if e is None:
            st.caption(f"{render.code(name)} has no evaluation yet: `saescope evaluate` on it adds SAEBench-style rows here.")
        elif e[2]:
            st.warning(f"The evaluation of {render.code(name)} was computed for an earlier computation of the run: "
                       "rerun `saescope evaluate`.")


def width_curves(paths: list[str]) -> None:
    """Explained variance and dark matter across widths (three runs of one model and hook or more)."""
    cards_ = [cache.card(p) for p in paths]
    widths = [c["d_sae"] for c in cards_]
    left, right = st.columns(2)
    with left:
        st.plotly_chart(charts.width_curves(widths, {"explained variance": [c["explained_variance"] for c in cards_],
                                                     "CE loss recovered": [c["ce_loss_recovered"] for c in cards_]},
                                            y="fraction"), key="cmp_ev_curve")
    with right:
        st.plotly_chart(charts.width_curves(widths, {"error variance predicted (saescope)": [c["dm_error_r2"] for c in cards_],
                                                     "‖e‖ predicted (saescope)": [c["dm_norm_r2"] for c in cards_]},
                                            y="held-out R² of the linear map x → e"), key="cmp_dm_curve")
    st.caption("Dark matter after “Decomposing the Dark Matter of SAEs”, as saescope measures it (not the paper's "
               "numbers): how much of the SAE error e, and of its norm ‖e‖, a ridge map with an intercept from x "
               "predicts on held-out contexts, R² pooled over dimensions. The paper's estimator (no bias, R² averaged "
               "per dimension, ‖e‖², a random token split) is on each run's Dark matter page.")


def examples(run: str, feature_id: int, title: str) -> None:
    """A latent's heading, stats and top examples."""
    row = cache.feature(run, feature_id)
    if row is None:
        st.warning(f"No latent {feature_id} in {render.code(Path(run).name)}.")
        return
    label = cache.describe(run, [feature_id]).get(feature_id, "")
    st.markdown(f"**{render.md(title)}** · #{feature_id}" + (f" · {render.md(label)}" if label else ""))
    st.caption(f"density {fmt(row.density)} · max activation {fmt(row.max_act)}")
    top = [e for e in row.examples if e.kind == "top"][:EXAMPLES]
    if not top:
        st.caption("No examples: it never fired in its run.")
    st.html("".join(example_html(e, float(row.max_act or 1.0)) for e in top))


def pick_latent(key: str, ids: list[int]) -> None:
    """Selecting a row of a table opens that latent (``latent=`` in the URL)."""
    rows = st.session_state[key].selection.rows
    if rows:
        st.query_params["latent"] = str(ids[rows[0]])


def latent_panel(a: str, b: str, latent: int, folder: str, swapped: bool) -> None:
    """Latent ``latent`` of run ``a`` beside its counterparts in ``b``: its split children (or, for a latent of
    the wider run, the latent it splits off), else its best decoder match. ``swapped``: ``a`` is the wider run
    (the comparison's B side)."""
    from engine.eval.files import Comparison

    comp = Comparison(folder)
    kin = "the latent it splits off" if swapped else "split child"
    related = (comp.parents(latent) if swapped else comp.children(latent)).to_pylist()
    other = "a_id" if swapped else "b_id"
    counterparts = [(int(r[other]), f"{kin} · cos {r['cos']:.2f} · P(parent fires | child fires) {fmt(r['p_a_given_b'])}")
                    for r in related if r["child"]]
    if not swapped and len(counterparts) < 2:  # one child is a match, not a split
        counterparts = []
    if not counterparts:
        row = comp.match_b(latent) if swapped else comp.match(latent)
        if row is None:
            common.fail(f"Latent {latent} does not exist in {render.code(Path(a).name)}.")
        best, partner = (row["best_a"], row["partner_a"]) if swapped else (row["best_b"], row["partner_b"])
        counterparts = [(int(best), f"best decoder match · cos {row['best_cos']:.2f}")]
        if partner is not None and partner != best:
            cos = "" if swapped else f" · cos {fmt(row['partner_cos'])} · activation corr. {fmt(row['partner_corr'])}"
            counterparts.append((int(partner), f"one-to-one partner{cos}"))
    left, right = st.columns(2)
    with left:
        examples(a, latent, Path(a).name)
    with right:
        for fid, why in counterparts:
            examples(b, fid, f"{Path(b).name}: {why}")
