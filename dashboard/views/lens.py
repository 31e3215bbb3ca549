"""Prompt lens: every token of a prompt with its top latents, its reconstruction error and the SAE's loss cost."""

import pandas as pd
import streamlit as st

from dashboard import cache, common, heads_view, render
from engine.live.lens import tokenize_prompt

PROMPT_LIMIT = 512  # tokens analysed: a longer prompt is cut, with a notice

run = common.current_run()
man = common.manifest(run)
common.restore_widgets("lens", {"lens_top_k": 5})
st.title("Prompt lens")
lm, sae = common.live(run)
st.caption(f"Which latents fire on each token at {render.code(sae.cfg.hook_name)}, and what the SAE misses there.")

text = st.text_area("Text", key="lens_text", height=110, placeholder="Type or paste text…")
c1, c2, c3 = st.columns(3)
has_template = bool(getattr(lm.tokenizer, "chat_template", None))
chat = c1.toggle("As a chat message", key="lens_chat", disabled=not has_template,
                 help="Render the text as a user message with the model's chat template" if has_template
                 else "This model has no chat template")
top_k = c2.slider("Latents per token", 1, 16, key="lens_top_k")
steps = None
if sae.cfg.architecture == "matching_pursuit":
    most = int(sae.cfg.max_iterations or min(sae.cfg.d_in, 128))
    st.session_state.setdefault("lens_steps", min(most, 32))
    steps = c3.slider("Pursuit steps", 1, max(most, 2), key="lens_steps",
                      help="Matching pursuit adds one latent per step: fewer steps, sparser codes (adaptive sparsity).")

common.save_widgets("lens", ("lens_text", "lens_chat", "lens_top_k", "lens_steps"))

if not text.strip():
    st.info("Type or paste some text above to see the latents on each of its tokens.")
    st.stop()
try:
    ids = tokenize_prompt(lm, text, chat=chat)
    result = cache.lens(run, common.model_source(man), common.sae_source(man), tuple(ids), top_k, PROMPT_LIMIT, steps)
except Exception as err:
    common.fail(f"Could not run the prompt: {render.md(err)}")
if result.truncated:
    st.warning(f"The prompt has {result.n_input_tokens} tokens: only the first {len(result.tokens)} were analysed.")

rows = result.tokens
strings = [t.token for t in rows]
fired = result.max_per_latent()
order = [int(i) for i in fired.argsort(descending=True)[: min(40, int((fired > 0).sum()))]]
labels = cache.describe(run, order)  # best explanation, else the top-token label
options = ["top"] + [f"latent:{i}" for i in order] + ["error", "ce"]


def describe(option: str) -> str:
    if option == "top":
        return "Each token's strongest latent"
    if option == "error":
        return "Reconstruction error norm ‖x − x̂‖"
    if option == "ce":
        return "Next-token loss change with the SAE spliced in"
    latent = int(option.split(":")[1])
    return f"Latent #{latent} · {labels.get(latent) or 'no label'}"


version = hash((tuple(ids), top_k, steps)) % 10**9  # widgets whose options depend on the prompt start afresh with it
choice = st.selectbox("Tint the text by", options, index=1 if order else 0, format_func=describe, key=f"lens_tint_{version}")
explained = cache.explanations(run, sorted({i for t in rows for i, _ in t.top_latents}))
titles = [
    f"{t.token!r} · position {t.position}"
    + ("".join(f"\n#{i}: {v:.3f}" + (f" · {explained[i][:60]}" if i in explained else "") for i, v in t.top_latents)
       if t.top_latents else "\nno latent active")
    + f"\n‖error‖ {t.err_norm:.3g}" + (f" · ΔCE {t.ce_delta:+.3f}" if t.ce_delta is not None else "")
    + ("" if t.included else "\n(excluded: position 0 or special token)")
    for t in rows
]
color, signed = "act", False
if choice == "top":
    values = [t.top_latents[0][1] if t.top_latents else 0.0 for t in rows]
elif choice == "error":
    values, color = [t.err_norm if t.included else 0.0 for t in rows], "error"
elif choice == "ce":
    values, signed = [t.ce_delta or 0.0 for t in rows], True
else:
    latent = int(choice.split(":")[1])
    values = result.latent_acts(latent)
st.html(render.tokens_html(strings, values, titles=titles, color=color, signed=signed))
if choice.startswith("latent:"):
    latent = int(choice.split(":")[1])
    common.feature_link(latent, labels.get(latent, ""), suffix=f" — max {fired[latent]:.3g} here; open its feature page")

included = [t for t in rows if t.included]
m1, m2, m3, m4 = st.columns(4)
m1.metric("Tokens", len(rows))
m2.metric("Mean L0", render.fmt(sum(t.l0 for t in included) / max(len(included), 1)))
m3.metric("Mean ‖e‖ / ‖x‖", render.fmt(sum(t.err_norm / max(t.x_norm, 1e-9) for t in included) / max(len(included), 1)))
deltas = [t.ce_delta for t in rows if t.ce_delta is not None and t.included]
m4.metric("Mean ΔCE (SAE spliced)", render.fmt(sum(deltas) / len(deltas)) if deltas else "–")

table = pd.DataFrame(
    {
        "pos": [t.position for t in rows],
        "token": [render.visible(t.token) for t in rows],
        "top latents": [", ".join(f"#{i} {v:.2f}" for i, v in t.top_latents) for t in rows],
        "L0": [t.l0 for t in rows],
        "‖x‖": [t.x_norm for t in rows],
        # the SAE leaves excluded tokens (position 0, specials) untouched: no error or loss change to show
        "‖error‖": [t.err_norm if t.included else None for t in rows],
        "linear part": [t.err_linear_norm if t.included else None for t in rows],
        "nonlinear part": [t.err_nonlinear_norm if t.included else None for t in rows],
        "ΔCE": [t.ce_delta if t.included else None for t in rows],
        "counted": [t.included for t in rows],
    }
)
st.subheader("Per token")
st.caption("Error split: the part of the error the run's linear map predicts from x, and what it leaves (the nonlinear part). "
           "ΔCE: loss of predicting the next token with the SAE's reconstruction spliced in, minus the clean loss.")
st.dataframe(table, hide_index=True, width="stretch", column_config={
    c: st.column_config.NumberColumn(format="%.3f") for c in ("‖x‖", "‖error‖", "linear part", "nonlinear part", "ΔCE")})

pos = st.selectbox("Inspect a token", [t.position for t in rows], index=min(1, len(rows) - 1),
                   format_func=lambda p: f"{p}: {render.visible(strings[p])!r}", key=f"lens_pos_{version}")
tops = rows[pos].top_latents
if not tops:
    skipped = "" if rows[pos].included else " (The SAE skips position 0 and special tokens.)"
    st.caption("No latent is active on this token." + skipped)
for latent_id, value in tops:
    common.feature_link(latent_id, cache.describe(run, [latent_id]).get(latent_id, ""), suffix=f" — {value:.3f}")

if sae.needs_loss_gradient:  # a g-SAE: what the loss gradient admitted on each token
    st.subheader("Gradient admissions (g-SAE)")
    st.caption("The table above uses the inference fallback, plain TopK over z (no gradient while the SAE is spliced "
               "in). Here the prompt runs forward and backward, teacher-forced on its own tokens: each token's "
               "latents under the g-SAE rule, TopK over z + β·z·|W_dec ∇L|, and those the gradient alone admitted. "
               "The last token has no next-token label, so no gradient.")
    with common.shown_errors("Could not compute the gradient admissions"):
        grad_rows = cache.gradient_lens(common.model_source(man), common.sae_source(man), tuple(ids[:PROMPT_LIMIT]), top_k)
        st.dataframe(pd.DataFrame({
            "pos": [g.position for g in grad_rows],
            "token": [render.visible(g.token) for g in grad_rows],
            "admitted by the gradient (#latent z / gradient term)": [
                ", ".join(f"#{i} {z:.2f} / {t:+.2f}" for i, z, t in g.admitted) for g in grad_rows],
            "displaced": [", ".join(f"#{i}" for i in g.displaced) for g in grad_rows],
            "top latents (z / gradient term)": [", ".join(f"#{i} {z:.2f} / {t:+.2f}" for i, z, t in g.top)
                                                for g in grad_rows],
            "gradient": [g.has_gradient for g in grad_rows],
        }), hide_index=True, width="stretch")

layer = heads_view.attention_layer(sae.cfg.hook_name)
if layer is not None and tops:  # an attention SAE: which heads and source tokens make the latent fire here
    st.subheader("Heads and source tokens")
    strongest = dict(tops)
    attributed = st.selectbox("Attribute latent", list(strongest), format_func=lambda i: f"#{i} · {strongest[i]:.3f}",
                              key=f"lens_dfa_{version}_{pos}",
                              help="Its pre-activation on this token, split over each head and each earlier token it "
                                   "attends to (direct feature attribution)")
    names = heads_view.head_names(layer, lm.n_heads)
    with common.shown_errors("Could not attribute the latent"):
        found = cache.dfa(common.model_source(man), common.sae_source(man), tuple(ids[: pos + 1]), attributed, pos)
        st.caption("Each token is tinted by what it contributes through the heads' attention, red adding and blue "
                   "subtracting; hover for the heads. The inspected token is underlined.")
        st.html(heads_view.dfa_html(strings[: pos + 1], heads_view.live_by_source(found, names), pos,
                                    note=heads_view.live_note(found, names)))
