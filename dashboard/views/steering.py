"""Steering: baseline and steered continuations side by side, same seed, streamed token by token."""

from typing import TYPE_CHECKING

import pandas as pd
import streamlit as st

from dashboard import cache, common, render
from dashboard.params import DEFAULT_CONCEPTS, DEFAULT_STRENGTH, MODES, STEER_KEYS, STRENGTH_RANGE, SteerSettings
from dashboard.render import fmt
from engine.live.app import app_intervention, concepts_path
from engine.live.lens import tokenize_prompt
from engine.live.steering import SteeringSpec, compare, steering_intervention

if TYPE_CHECKING:
    from engine.model.loading import LoadedModel

WIDGETS = ("steer_mode", "steer_raw", "steer_prompt", "steer_chat", "steer_max_new", "steer_temp", "steer_seed",
           "steer_concepts", "steer_concept")
MODE_NAMES = {"add": "add", "clamp": "clamp", "app": "APP (concept)"}
PROMPT_LIMIT = 512  # tokens of prompt kept (the most recent ones): generation on a CPU stays interactive

run = common.current_run()
store = common.run_store(run)
n_features = store.n_features()
st.title("Steering")
st.caption(
    "Add a latent's decoder direction to the activation at the SAE's hook (every position), or clamp the latent "
    "to a value. Strength is in units of the latent's max activation in this run. **APP** suppresses a labelled "
    "concept instead: latents only that concept activates are set to 0, latents it shares are multiplied by "
    "1 − P(concept | activation) from densities fitted on labelled texts (Fereidouni et al.). Both continuations use "
    "the same seed."
)
man = cache.manifest(run)


def apply(s: SteerSettings) -> None:
    unknown = [i for i in s.latents if i >= n_features]
    if unknown:
        st.warning(f"Ignored unknown latent(s) {unknown}: this SAE has {n_features} latents (0 to {n_features - 1}).")
    st.session_state["steer_latents"] = [i for i in s.latents if i < n_features]
    for latent, strength in s.latents.items():
        st.session_state[f"steer_s_{latent}"] = strength
    st.session_state.update(
        steer_mode=s.mode, steer_raw=s.unit == "raw", steer_prompt=s.prompt, steer_chat=s.chat,
        steer_max_new=s.max_new, steer_temp=s.temperature, steer_seed=s.seed, steer_concepts=s.concepts,
        steer_concept=s.concept,
    )


def add_latent(latent: int) -> None:
    if latent not in st.session_state["steer_latents"]:
        st.session_state["steer_latents"].append(latent)
        st.session_state[f"steer_s_{latent}"] = DEFAULT_STRENGTH


def remove_latent(latent: int) -> None:
    st.session_state["steer_latents"].remove(latent)


def decode(lm: "LoadedModel", ids: list[int]) -> str:
    """The text of ``ids``."""
    text = lm.tokenizer.decode(ids)
    assert isinstance(text, str)  # a flat list of ids decodes to one string (a batch would give a list)
    return text


def max_act(latent: int) -> float:
    """The latent's max activation in this run (0 for a latent the run does not have)."""
    row = cache.feature(run, latent)
    return float(row.max_act or 0.0) if row is not None else 0.0


# A link (shared, or from a feature page's "steer with this latent") sets the state; the state then sets the URL.
common.restore_widgets("steering")
if "steer_latents" not in st.session_state:
    apply(SteerSettings())
url = {k: st.query_params[k] for k in STEER_KEYS if k in st.query_params}
if url and url != st.session_state.get("steer_url"):
    try:
        apply(SteerSettings.from_query(url))
        st.session_state["steer_autorun"] = "prompt" in url
    except ValueError as err:
        st.warning(f"Ignored the steering settings in the link: {render.md(err)}")
added = common.query_int("add")
if added is not None:
    del st.query_params["add"]
    if 0 <= added < n_features:
        add_latent(added)
    else:
        st.warning(f"Latent {added} does not exist: this SAE has {n_features} latents (0 to {n_features - 1}).")

with st.container(border=True):
    left, right = st.columns([2, 3])
    query = left.text_input("Add a latent", placeholder="id, or words from its label", key="steer_query")
    if query.strip():
        matches = common.search(store, query.strip(), limit=6)
        if not matches:
            right.caption(f"No latent matches {render.md(repr(query))}.")
        names = cache.describe(run, [row.feature_id for row in matches])
        for row in matches:
            right.button(
                f"Add #{row.feature_id} · {render.md((names.get(row.feature_id) or '')[:60])}", key=f"steer_add_{row.feature_id}",
                on_click=add_latent, args=(int(row.feature_id),),
            )
    latents = st.session_state["steer_latents"]
    if not latents:
        st.info("No latent chosen yet: add one above, or use “Steer with this latent” on a feature page.")
    labels = cache.describe(run, latents)
    for latent in latents:
        c_name, c_slider, c_rm = st.columns([3, 6, 1], vertical_alignment="center")
        with c_name:
            common.feature_link(latent, labels.get(latent, ""))
        st.session_state.setdefault(f"steer_s_{latent}", DEFAULT_STRENGTH)
        c_slider.slider(
            f"Strength of #{latent}", *STRENGTH_RANGE, step=0.25, key=f"steer_s_{latent}",
            help="Multiples of the latent's max activation (negative values push away from it).",
        )
        c_rm.button("Remove", key=f"steer_rm_{latent}", on_click=remove_latent, args=(latent,))

c1, c2, c3, c4, c5 = st.columns([2, 2, 2, 2, 2])
c1.radio("Mode", list(MODES), key="steer_mode", horizontal=True, format_func=MODE_NAMES.__getitem__,
         help="clamp: set the latent to the value at every position; APP: suppress a labelled concept")
c2.toggle("Raw coefficient", key="steer_raw",
          help="Strength as a plain coefficient on the decoder row instead of max-activation units")
c3.number_input("Max new tokens", 1, 256, key="steer_max_new")
c4.slider("Temperature", 0.0, 2.0, step=0.05, key="steer_temp", help="0 = greedy")
c5.number_input("Seed", 0, 2**31 - 1, key="steer_seed")
concept_file = None
if st.session_state["steer_mode"] == "app":
    with st.container(border=True):
        st.caption("APP uses the concept's own latents (the chosen latents above are not used). Its densities are "
                   "fitted on every other text of each concept in the file; the rest measure it.")
        left, right = st.columns([3, 2])
        if not st.session_state.get("steer_concepts"):  # a widget not drawn in the other modes loses its state
            st.session_state["steer_concepts"] = DEFAULT_CONCEPTS
        left.text_input("Concepts file", key="steer_concepts",
                        help="A JSONL of {\"text\", \"label\"} lines; a bare name is looked up in the data folder's "
                             "concepts/ (the demo's: python-docs-code-prose.jsonl, python-docs-manuals.jsonl)")
        with common.shown_errors("Could not read the concepts file"):
            found = concepts_path(st.session_state["steer_concepts"])
            names = cache.concepts(str(found), found.stat().st_mtime).names
            if st.session_state.get("steer_concept") not in names:
                st.session_state["steer_concept"] = names[0]
            right.selectbox("Concept to suppress", names, key="steer_concept")
            concept_file = found
st.text_area("Prompt", key="steer_prompt", height=90)
st.toggle("Send as a chat message (the model's chat template)", key="steer_chat")

common.save_widgets("steering", [*WIDGETS, *(f"steer_s_{i}" for i in latents)])
settings = SteerSettings(
    latents={i: float(st.session_state[f"steer_s_{i}"]) for i in latents},
    mode=st.session_state["steer_mode"], unit="raw" if st.session_state["steer_raw"] else "max_act",
    prompt=st.session_state["steer_prompt"], chat=st.session_state["steer_chat"],
    max_new=int(st.session_state["steer_max_new"]), temperature=float(st.session_state["steer_temp"]),
    seed=int(st.session_state["steer_seed"]), concepts=st.session_state.get("steer_concepts") or DEFAULT_CONCEPTS,
    concept=st.session_state.get("steer_concept") or "",
)
query_now = settings.to_query()
if query_now != st.session_state.get("steer_url"):
    st.query_params.update(query_now)
    st.session_state["steer_url"] = query_now
st.caption("The page's address holds these settings: copy it to share this result.")


def app_key() -> tuple:
    """What the concept's cached densities and report are keyed on."""
    assert concept_file is not None
    return (common.model_source(man), common.sae_source(man), str(concept_file), concept_file.stat().st_mtime,
            settings.concept)


def app_densities():
    """The concept's fitted densities (cached per file and concept)."""
    return cache.app_densities(*app_key())


def removal_table() -> None:
    """APP against zero-ablation of the concept's latents: losses on held-out texts of the concept and the others."""
    rows = cache.app_report(*app_key())
    concept = settings.concept
    st.dataframe(pd.DataFrame({
        "method": [r.method for r in rows],
        f"loss on {concept} texts": [fmt(r.concept_loss, 4) for r in rows],
        f"perplexity on {concept}": [fmt(r.concept_ppl, 4) for r in rows],
        "loss on other texts": [fmt(r.other_loss, 4) for r in rows],
        "perplexity on others": [fmt(r.other_ppl, 4) for r in rows],
    }), hide_index=True)
    st.caption(f"Removal: how much the loss on held-out {render.md(concept)} texts rises; cost: how much it rises on "
               "the other concepts' texts (up to 16 each, next-token loss in nats). Zero-ablation sets every latent "
               "the concept is active for to 0.")


go = st.button("Generate", type="primary", icon=":material/play_arrow:")
if st.session_state.pop("steer_autorun", False):
    go = True
if go:
    if not settings.prompt.strip():
        common.fail("The prompt is empty: type some text to continue.")
    lm, sae = common.live(run)
    with common.shown_errors("Could not generate"):
        ids = tokenize_prompt(lm, settings.prompt, chat=settings.chat)
        keep = max(1, min(PROMPT_LIMIT, lm.max_context - settings.max_new))
        if len(ids) > keep:
            st.warning(f"The prompt has {len(ids)} tokens; only its last {keep} are used.")
            ids = ids[-keep:]
        max_acts = {i: max_act(i) for i in settings.latents}
        dead = [i for i, m in max_acts.items() if m <= 0]
        if dead and settings.unit == "max_act":
            st.warning(f"Latent(s) {dead} never fired in this run (max activation 0): steer them with a raw coefficient.")
        if settings.mode == "app":
            if concept_file is None:
                common.fail("APP needs a concepts file and a concept.")
            densities = app_densities()
            factory = app_intervention(lm, sae, densities)
            title = (f"APP · suppress {render.md(settings.concept)} ({len(densities.exclusive)} latents set to 0, "
                     f"{len(densities.shared)} scaled)")
        else:
            factory = steering_intervention(lm, sae, SteeringSpec(settings.latents, settings.mode, settings.unit), max_acts)
            title = ", ".join(f"#{i} × {s:g}" for i, s in settings.latents.items()) or "no latent"
        shown = decode(lm, ids)
        cols = st.columns(2)
        cols[0].markdown("**Baseline**")
        cols[1].markdown("**Steered** · " + title)
        slots = [cols[0].empty(), cols[1].empty()]
        out: list[list[int]] = [[], []]
        stream = compare(lm, ids, factory, max_new_tokens=settings.max_new, temperature=settings.temperature, seed=settings.seed)
        for pair in stream:
            for side, token in enumerate(pair):
                if token is not None:
                    out[side].append(token)
                    slots[side].html(render.continuation_html(shown, decode(lm, out[side]), note="▌"))
        texts = [decode(lm, o) for o in out]
        for slot, text in zip(slots, texts, strict=True):
            slot.html(render.continuation_html(shown, text))
        st.session_state["steer_result"] = {"query": query_now, "prompt": shown, "texts": texts}
elif st.session_state.get("steer_result"):
    result = st.session_state["steer_result"]
    if result["query"] != query_now:
        st.caption("Result of earlier settings: press Generate to update it.")
    cols = st.columns(2)
    for col, title, text in zip(cols, ("Baseline", "Steered"), result["texts"], strict=True):
        col.markdown(f"**{title}**")
        col.html(render.continuation_html(result["prompt"], text))

if settings.mode == "app" and concept_file is not None:
    if st.button("Measure removal", key="steer_measure",
                 help="APP and zero-ablation of the concept's latents on held-out texts (a few forwards per text)"):
        common.live(run)  # loaded and checked against the run's fingerprints, as for generating
        with common.shown_errors("Could not measure the removal"):
            removal_table()
