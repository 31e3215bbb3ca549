"""Circuits: a task's attention heads found from discrete SAE codes (O'Neill & Bui 2024) beside saescope's activation
patching (``?task=ioi&head=L12.H3``): task accuracy, layer x head heatmaps, ROC curves, top head pairs, one head's
codes on the positive and counterfactual prompts."""

import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from dashboard import access, cache, charts, circuits_view, common, graph_cache, render
from dashboard.render import fmt
from engine.circuits.files import head_label, list_circuits, task_dir_name
from engine.run.schema import MANIFEST

st.title("Circuits")
root = graph_cache.circuit_root()
served = cache.run_root()
if root is not None and served is not None and (served / MANIFEST).is_file():  # a run: its model can find circuits
    with st.expander("Find the circuit of your own task"):
        upload = st.file_uploader("JSONL of prompt pairs", type=["jsonl"], key="circuit_upload",
                                  help='one {"prompt", "answer", "counterfactual"} per line (docs/circuits.md)')
        min_accuracy = st.number_input("Minimum accuracy", 0.0, 1.0, 0.6, 0.05, key="circuit_min_accuracy",
                                       help="below it the model is said not to do the task and no circuit is computed")
        found = None
        if upload is not None and access.write_button("Find the circuit", writes="circuit folders into the run",
                                                      key="circuit_go", icon=":material/play_arrow:"):
            from engine.circuits.files import write_circuit
            from engine.circuits.pipeline import CircuitConfig, run_circuit
            from engine.circuits.tasks import load_jsonl

            source, dtype = common.model_source(cache.manifest(str(served)))
            with st.spinner("Running the task, the code SAE and patching (minutes on a CPU)…"), \
                    common.shown_errors("No circuit"), tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / Path(upload.name).name
                path.write_bytes(upload.getvalue())
                lm = cache.model(source, dtype, cache.device())
                result = run_circuit(lm, load_jsonl(path, lm.tokenizer), CircuitConfig(min_accuracy=min_accuracy))
                write_circuit(root, result, source)
                found = task_dir_name(result.task.name)
        if found is not None:
            st.query_params["task"] = found
            st.query_params.pop("head", None)
            st.rerun()
tasks = list_circuits(root) if root is not None else []
if root is None or not tasks:
    st.info("No circuit runs to show. `saescope circuit --model MODEL --task ioi --out "
            f"{render.code(root or 'RUN/circuits')}` computes one (also `greater-than`, `docstring` or a JSONL file of "
            "prompt pairs).", icon=":material/account_tree:")
    st.stop()
linked = st.query_params.get("task")
task = st.selectbox("Task", tasks, index=tasks.index(linked) if linked in tasks else 0, key="circuit_task")
if linked != task:
    st.query_params.pop("head", None)  # a head of another task
st.query_params["task"] = task
info, tables = graph_cache.circuit(str(root / task))
heads, prompts, codes = tables["heads"], tables["prompts"], tables["codes"]
perf, n_layers, n_heads = info["performance"], info["n_layers"], info["n_heads"]
by_key = {(a["method"], a["reference"]): a for a in info["agreement"]}

cols = st.columns(5)
cols[0].metric("Accuracy", f"{perf['accuracy']:.0%}", help="positive prompts whose right answer beats the wrong one")
cols[1].metric("Logit diff", fmt(perf["logit_diff"]),
               help=f"mean; on the counterfactuals {fmt(perf['logit_diff_counterfactual'])}")
node = by_key.get(("node", "patching"))
cols[2].metric("ROC-AUC (node)", fmt(node["auc"]) if node else "–",
               help="code-method node score against saescope's patching circuit")
cols[3].metric("Patching circuit", f"{info['circuit_size']} heads",
               help=f"|normalised patching effect| ≥ {info['config']['circuit_threshold']}")
t = info["timings"]
cols[4].metric("Codes / patching", f"{t['code_method_s']:.3g} s / {t['patching_s']:.3g} s",
               help="wall time of the code method (forwards, SAE, scores) and of patching every head")
st.caption(f"Model {render.code(info['model'])}, {info['n_pairs']} prompt pairs; top-1 accuracy {perf['top1']:.0%}; "
           f"SAE of {info['config']['n_latents']} latents on {info['config']['n_train']} prompts.")

labels = heads["label"].to_numpy().reshape(n_layers, n_heads)
grid = {name: heads[column].to_numpy().reshape(n_layers, n_heads)
        for name, column in (("code score (node)", "unique_positive"), ("patching effect", "patch_effect"))}
st.plotly_chart(charts.head_heatmaps(grid, labels), key="circuit_heatmaps")
left, right = st.columns(2)
curves = [(f"{a['method']} vs {a['reference']} (AUC {a['auc']:.3f})", a["fpr"], a["tpr"]) for a in info["agreement"]]
left.plotly_chart(charts.roc_curves(curves), key="circuit_roc")
pairs = tables["pairs"].head(20)
right.dataframe(pd.DataFrame({"head A": [head_label(*divmod(int(i), n_heads)) for i in pairs["head_a"]],
                              "head B": [head_label(*divmod(int(i), n_heads)) for i in pairs["head_b"]],
                              "unique co-occurrences": pairs["unique_cooccurrences"]}), hide_index=True, width="stretch")

ranked = heads.sort_values("unique_positive", ascending=False)["label"].tolist()
linked_head = st.query_params.get("head")
head = st.selectbox("Head", ranked, index=ranked.index(linked_head) if linked_head in ranked else 0, key="circuit_head",
                    help="heads by code score, best first")
st.query_params["head"] = head
row = heads[heads["label"] == head].iloc[0]
index = int(row["layer"]) * n_heads + int(row["head"])
st.subheader(f"Head {head}")
st.markdown(f"Codes unique to positives: **{int(row['unique_positive'])}** · patching effect **{fmt(row['patch_effect'])}** · "
            f"mean-ablation effect **{fmt(row['mean_ablation_effect'])}** · "
            f"{'in' if row['in_circuit'] else 'not in'} the patching circuit")
mine = codes[codes["head_index"] == index].set_index("prompt")["code"]
shown = prompts.assign(code=prompts["prompt"].map(mine))
positive_codes, negative_codes = set(shown[shown["positive"]]["code"]), set(shown[~shown["positive"]]["code"])
for side, frame, other, color in (("Positive prompts", shown[shown["positive"]], negative_codes, "pos"),
                                  ("Counterfactual prompts", shown[~shown["positive"]], positive_codes, "neg")):
    st.markdown(f"**{side}** (tinted: a code never seen on the other side)")
    html = []
    for text, code in zip(frame["text"].head(12), frame["code"].head(12), strict=True):
        own = int(code) not in other
        chip = render.token_span(f"#{int(code)}", 1.0 if own else 0.0, 1.0, color=color)
        html.append(f'<div style="margin: 2px 0;">{chip} {render.escape(render.visible(text))}</div>')
    st.html("".join(html))
if np.isnan(row["mean_ablation_effect"]):
    st.caption("Mean-ablation was not computed for this run.")
if not np.isnan(row.get("path_patch_effect", np.nan)):
    st.caption(f"Direct path to the logits (path patching head → logits): effect {fmt(row['path_patch_effect'])}.")
hooks = circuits_view.served_hooks(served) if served is not None else {}
circuits_view.head_panel(hooks, int(row["layer"]), int(row["head"]), prompts, (n_layers, n_heads))
circuits_view.supervised_panel(root, hooks)
