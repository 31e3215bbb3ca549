"""The Circuits page's two panels that read the served runs' SAEs: the supervised-dictionary evaluation of an SAE
whose hook matches (``saescope circuit --supervised``), and a clicked head's part in the latents of an attention-output
SAE at its layer."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import streamlit as st

from dashboard import cache, charts, common, graph_cache, render
from dashboard.render import fmt
from engine.run.manifest import sections

PROMPTS_PER_SIDE = 12
"""Positive and counterfactual prompts the head panel runs (one forward per prompt length and side)."""


def served_hooks(served: Path) -> dict[str, str]:
    """Each served run's SAE hook -> the run (the first run of a hook)."""
    out: dict[str, str] = {}
    for run in cache.list_runs(str(served)):
        try:
            hook = str(sections(cache.manifest(run)).sae.hook or "")
        except (OSError, ValueError):
            continue  # a run still being written
        if hook:
            out.setdefault(hook, run)
    return out


def _pct(value: float | None) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.0%}"


def supervised_panel(root: Path, hooks: dict[str, str]) -> None:
    """The evaluation of a served run's SAE against IOI's supervised dictionary, or one line saying how to get it."""
    st.subheader("Supervised dictionary (IOI)")
    found = [(hook, got) for hook in hooks if (got := graph_cache.supervised(root, hook)) is not None]
    if not found:
        st.caption("No supervised-dictionary evaluation for the served SAE's hook: `saescope circuit --model M --task ioi "
                   f"--supervised --out {render.code(root)}` computes one (Makelov et al. 2024; docs/circuits.md).")
        return
    if len(found) > 1:
        shown = st.selectbox("SAE hook", [h for h, _ in found], key="circuit_supervised_hook")
        found = [f for f in found if f[0] == shown]
    hook, (info, control, f1) = found[0]
    st.caption(f"The SAE at {render.code(hook)} against mean codes of IO name, S name and IO position, from "
               f"{info['n_fit']} IOI prompts; approximation and control on {info['positions'][0]['n_eval']} others "
               f"(model accuracy {info['accuracy']:.0%}). **Recovered**: |LD − LD_mean| / |LD_clean − LD_mean| with the "
               "activation at that token replaced (1 = clean, 0 = mean-ablation). **Control**: moving the IO to another "
               "name; success = the answer of the counterfactual patch, over the prompts that patch changes.")
    rows = []
    for p in info["positions"]:
        sae_points = [c for c in p["control"] if c["method"] == "sae"]
        by = {c["method"]: c for c in p["control"]}
        rows.append({"position": p["position"], "recovered (SAE)": fmt(p["recovered_sae"]),
                     "recovered (supervised)": fmt(p["recovered_supervised"]),
                     **{f"best F1 {a}": fmt(b["mean"]) for a, b in p["best_f1"].items()},
                     f"control SAE k={sae_points[-1]['k']}": _pct(sae_points[-1]["success"]),
                     "control supervised": _pct(by["supervised"]["success"]),
                     "patch moves": f"{p['n_moved']} / {p['n_eval']}"})
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
    positions = [p["position"] for p in info["positions"]]
    position = st.radio("Control at", positions, horizontal=True, key="circuit_supervised_position")
    mine = control[control["position"] == position]
    sae_rows = mine[mine["method"].isin(["none", "sae"])].sort_values("k")
    levels = mine.set_index("method")["success"]
    if sae_rows["success"].isna().all():
        st.caption(f"At {position} the counterfactual patch changes no answer: control cannot be measured there.")
    else:
        st.plotly_chart(charts.control_curves([("SAE (top-F1 latents)", sae_rows["k"].tolist(),
                                                sae_rows["success"].tolist())],
                                              [("supervised edit", float(levels["supervised"]))]),
                        key="circuit_control")
    best = f1[(f1["position"] == position) & (f1["rank"] == 0)].sort_values("f1", ascending=False)
    st.caption(f"Interpretability at {position}: the best latent of each attribute value by F1 of \"latent active\" "
               "against \"the prompt has this value\" over the fit prompts (the 12 best shown).")
    st.dataframe(best[["attribute", "value", "support", "latent", "precision", "recall", "f1"]].head(12),
                 hide_index=True, width="stretch")


def head_panel(hooks: dict[str, str], layer: int, head: int, prompts: pd.DataFrame, shape: tuple[int, int]) -> None:
    """The latents of the attention-output SAE at ``layer`` the head adds to most, on positive vs counterfactual
    prompts; one line when no such SAE is served."""
    hook = f"blocks.{layer}.attn.hook_z"
    run = hooks.get(hook)
    if run is None:
        st.caption(f"No attention-output SAE at layer {layer} ({render.code(hook)}) is loaded: serve a run of one to see "
                   "which of its latents this head writes.")
        return
    with common.shown_errors("No head panel"):
        man = cache.manifest(run)
        model_key, sae_path = common.model_source(man), common.sae_source(man)
        lm = cache.model(*model_key, cache.device())
        if (lm.n_layers, lm.n_heads) != shape:
            st.caption(f"The attention SAE's run ({render.code(Path(run).name)}) is on another model "
                       f"({lm.n_layers} layers x {lm.n_heads} heads).")
            return
        sides = [tuple(tuple(int(t) for t in ids) for ids in list(prompts.loc[prompts["positive"] == flag, "token_ids"])
                       [:PROMPTS_PER_SIDE]) for flag in (True, False)]
        terms = graph_cache.head_latents(model_key, sae_path, sides[0], sides[1], head)
        from engine.circuits.head_latents import top_latents

        best = top_latents(terms)
        labels = cache.labels(run, sorted(set(best[0]) | set(best[1])))
        st.markdown(f"**Latents of {render.code(Path(run).name)} ({render.code(hook)}) this head writes most**, at the "
                    f"last token, where they fire (mean over {len(sides[0])} prompts per side)")
        for column, title, ids in zip(st.columns(2), ("On positive prompts", "On counterfactual prompts"), best,
                                      strict=True):
            column.markdown(f"*{title}*")
            column.dataframe(pd.DataFrame({"latent": ids, "label": [labels.get(i, "") for i in ids],
                                           "positive": [float(terms.positive[i]) for i in ids],
                                           "counterfactual": [float(terms.negative[i]) for i in ids]}),
                             hide_index=True, width="stretch")
