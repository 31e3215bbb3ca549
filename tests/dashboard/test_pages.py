"""Every page of the app through Streamlit's AppTest, on tiny precomputed runs: widgets set, outputs checked."""

import base64
import html
import json
import shutil

import numpy as np
import pytest

from dashboard.render import fmt
from engine.live.lens import tokenize_prompt
from engine.live.steering import SteeringSpec, compare, steering_intervention
from engine.model.loading import load_model
from engine.run.store import RunStore
from engine.saes import load_sae

FEATURES, LENS, DARK, STEER = "views/features.py", "views/lens.py", "views/dark_matter.py", "views/steering.py"


def no_crash(at) -> None:
    assert not at.exception, [e.value for e in at.exception]


def errors(at) -> str:
    return " ".join(e.value for e in at.error)


def htmls(at) -> list[str]:
    return [h.proto.body for h in at.get("html")]


def plotly(at) -> list[dict]:
    return [json.loads(el.proto.spec) for el in at.get("plotly_chart")]


def values(data) -> np.ndarray:
    """A plotly array from a figure's JSON (plain list, or plotly's base64 typed array)."""
    if isinstance(data, dict) and "bdata" in data:
        return np.frombuffer(base64.b64decode(data["bdata"]), dtype=np.dtype(data["dtype"]))
    return np.asarray(data)


def metric(at, label: str) -> str:
    return next(m.value for m in at.metric if m.label == label)


@pytest.fixture(scope="module")
def store(tiny_runs):
    with RunStore.open(tiny_runs["topk"]) as s:
        yield s


# --- overview ---------------------------------------------------------------------------------
def test_overview_shows_the_run_and_its_metrics(tiny_runs, open_app, store):
    at = open_app(tiny_runs["topk"])
    no_crash(at)
    man = store.manifest()
    text = " ".join(m.value for m in at.markdown) + " ".join(c.value for c in at.caption)
    assert "topk" in text and "256" in text and "blocks.0.hook_resid_post" in text and "corpus.jsonl" in text
    assert f"{man['corpus']['n_tokens']:,} tokens" in text
    assert metric(at, "L0 (latents per token)") == "8.00"
    assert metric(at, "EV without massive tokens") == f"{man['metrics']['explained_variance']:.3g}"
    assert metric(at, "Dead latents") == str(int((store.densities() == 0).sum()))
    assert metric(at, "Dense latents") == str(int((store.densities() > 0.1).sum()))
    (spec,) = plotly(at)
    logs = values(spec["data"][0]["x"])
    alive = store.densities()[store.densities() > 0]
    np.testing.assert_allclose(np.sort(logs), np.sort(np.log10(alive)), rtol=1e-6)
    assert "1e-1" in spec["layout"]["xaxis"]["ticktext"]


def test_incomplete_run_and_missing_run_show_messages(tmp_path, open_app):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "features.parquet").write_bytes(b"")
    at = open_app(tmp_path / "half")
    no_crash(at)
    assert "manifest.json" in errors(at) and "incomplete" in errors(at)
    at = open_app(None)
    no_crash(at)
    assert "saescope serve --run" in errors(at)
    at = open_app(tmp_path / "nowhere")
    no_crash(at)
    assert "does not exist" in errors(at)


def test_directory_of_runs_gives_a_run_picker(tiny_runs, open_app):
    root = tiny_runs["topk"].parent
    at = open_app(root, **{"run": "topk"})
    no_crash(at)
    picker = at.sidebar.selectbox[0]
    assert picker.options == ["matching_pursuit", "topk"] and picker.value == "topk"
    assert any(str(tiny_runs["topk"]) in c.value for c in at.caption)
    picker.set_value("matching_pursuit").run()
    assert any(str(tiny_runs["mp"]) in c.value for c in at.caption)
    assert at.query_params["run"] == "matching_pursuit"


# --- features ----------------------------------------------------------------------------------
def test_feature_list_sorts_and_filters(tiny_runs, open_app, store):
    at = open_app(tiny_runs["topk"], FEATURES)
    no_crash(at)
    table = at.dataframe[0].value
    expected = store.top_features(sort_by="density", descending=True, limit=50)
    assert table["id"].tolist() == [r.feature_id for r in expected]
    at.selectbox(key="feat_sort").set_value("max_act")
    at.toggle(key="feat_desc").set_value(False).run()
    table = at.dataframe[0].value
    assert table["max act"].is_monotonic_increasing
    at.slider(key="feat_density").set_value((-1.5, 0.0)).run()
    table = at.dataframe[0].value
    assert len(table) and (table["density"] >= 10**-1.5).all()


@pytest.mark.parametrize("by", ["label", "token", "id"])
def test_feature_search(tiny_runs, open_app, store, by):
    word = {"label": store.feature(3).label.split(" / ")[0], "token": "the", "id": "17"}[by]
    at = open_app(tiny_runs["topk"], FEATURES)
    at.radio(key="feat_by").set_value(by)
    at.text_input(key="feat_query").input(word).run()
    no_crash(at)
    table = at.dataframe[0].value
    assert table["id"].tolist() == [r.feature_id for r in store.search(word, by=by, limit=50)]
    if by == "label":
        assert 3 in table["id"].tolist() and all(word.lower() in label.lower() for label in table["label"])
    if by == "id":
        assert table["id"].tolist() == [17]


def test_feature_page_by_deep_link(tiny_runs, open_app, store):
    row = store.feature(5)
    at = open_app(tiny_runs["topk"], FEATURES, feature=5)
    no_crash(at)
    assert at.title[0].value == "Feature #5"
    assert metric(at, "Fires on") == f"{row.fire_count:,}"
    (hist,) = plotly(at)
    assert values(hist["data"][0]["y"]).tolist() == row.hist_counts
    bodies = htmls(at)
    top = [e for e in row.examples if e.kind == "top"]
    assert sum(b.count('class="saescope-tokens"') for b in bodies) == len(row.examples)
    value = top[0].acts[top[0].max_pos - top[0].start]
    assert f": {value:.3f}" in bodies[2]  # the max token's exact activation is in its hover title
    links = [link.proto.label for link in at.get("page_link")]
    assert len(links) == len(row.neighbor_ids) and links[0].startswith(f"#{row.neighbor_ids[0]} ")


def test_feature_examples_escape_markup(tiny_runs, open_app, store):
    # a latent with "<" in its top examples (the corpus holds <script> and </div>)
    fid = next(i for i in range(store.n_features()) if any("<" in "".join(e.tokens) for e in store.examples(i, "top")))
    at = open_app(tiny_runs["topk"], FEATURES, feature=fid)
    no_crash(at)
    tokens = "".join(htmls(at))
    assert "&lt;" in tokens
    assert "<script" not in tokens and "<b>" not in tokens


def test_unknown_and_malformed_feature_ids(tiny_runs, open_app):
    at = open_app(tiny_runs["topk"], FEATURES, feature=99999)
    no_crash(at)
    assert "Feature 99999 does not exist" in errors(at) and "256 latents" in errors(at)
    at = open_app(tiny_runs["topk"], FEATURES, feature="abc")
    no_crash(at)
    assert "not a feature id" in errors(at)


def test_steer_button_opens_steering_with_the_latent(tiny_runs, open_app):
    at = open_app(tiny_runs["topk"], FEATURES, feature=5)
    next(b for b in at.button if b.label == "Steer with this latent").click().run()
    no_crash(at)
    assert at.title[0].value == "Steering"
    assert at.slider(key="steer_s_5").value == 4.0
    assert at.query_params["latents"] == "5:4"


# --- prompt lens -------------------------------------------------------------------------------
def test_lens_shows_tokens_latents_and_errors(tiny_runs, open_app):
    at = open_app(tiny_runs["topk"], LENS)
    no_crash(at)
    assert "Type or paste" in at.info[0].value  # empty prompt: a hint, not an error
    text = 'Hello <script>alert("x")</script> </div> world'
    at.text_area(key="lens_text").input(text).run()
    no_crash(at)
    lm = load_model(json.loads((tiny_runs["topk"] / "manifest.json").read_text())["model"]["name"], device="cpu", dtype="float32")
    ids = tokenize_prompt(lm, text)
    table = at.dataframe[0].value
    assert table["pos"].tolist() == list(range(len(ids)))
    assert (table["L0"][1:] == 8).all() and table["L0"][0] == 0  # TopK k=8; position 0 excluded
    lin, nonlin, err = table["linear part"][1:], table["nonlinear part"][1:], table["‖error‖"][1:]
    assert (lin > 0).all() and (nonlin > 0).all() and (err > 0).all()
    assert table["ΔCE"].iloc[1:-1].notna().all() and np.isnan(table["ΔCE"].iloc[-1])
    assert table[["‖error‖", "ΔCE"]].iloc[0].isna().all()  # position 0: the SAE leaves it alone
    body = htmls(at)[0]
    assert body.count("<span") == len(ids) and "&lt;" in body and "<script" not in body
    for option in ("error", "ce", "top"):
        next(b for b in at.selectbox if b.label == "Tint the text by").set_value(option).run()
        no_crash(at)
        assert htmls(at)[0].count("<span") == len(ids)
    latent = int(table["top latents"][1].split()[0].lstrip("#"))
    next(b for b in at.selectbox if b.label == "Inspect a token").set_value(1).run()
    assert any(link.proto.label.startswith(f"#{latent}") for link in at.get("page_link"))


def test_lens_truncates_long_prompts_with_a_notice(tiny_runs, open_app):
    at = open_app(tiny_runs["topk"], LENS)
    at.text_area(key="lens_text").input("the quick brown fox " * 200).run()
    no_crash(at)
    assert "only the first 256 were analysed" in at.warning[0].value
    assert len(at.dataframe[0].value) == 256


def test_lens_pursuit_steps_slider_for_matching_pursuit(tiny_runs, open_app):
    at = open_app(tiny_runs["mp"], LENS)
    at.text_area(key="lens_text").input("The quick brown fox jumps over the lazy dog.").run()
    no_crash(at)
    l0 = {}
    for n in (1, 4, 16):
        at.slider(key="lens_steps").set_value(n).run()
        no_crash(at)
        l0[n] = at.dataframe[0].value["L0"][1:]
        assert (l0[n] <= n).all()
    assert l0[1].max() == 1 and l0[16].mean() > l0[4].mean() > 1
    at = open_app(tiny_runs["topk"], LENS)
    assert all(s.key != "lens_steps" for s in at.slider)


def test_live_pages_explain_a_model_that_cannot_load(broken_model_run, open_app):
    for page in (LENS, STEER):
        at = open_app(broken_model_run, page, latents="1:2", prompt="hi")
        no_crash(at)
        assert "Could not load the model" in errors(at)


def test_live_pages_refuse_an_sae_that_is_not_the_runs(tiny_runs, open_app, tmp_path):
    run = tmp_path / "retrained"
    shutil.copytree(tiny_runs["topk"], run)
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["sae"]["hash"] = "0" * 16  # the SAE at its path has changed since the run was computed
    (run / "manifest.json").write_text(json.dumps(manifest))
    for page in (LENS, STEER):
        at = open_app(run, page, latents="1:2", prompt="hi")
        no_crash(at)
        assert "Live pages are off for this run: the SAE at" in errors(at)


# --- dark matter --------------------------------------------------------------------------------
def test_dark_matter_page(tiny_runs, open_app, store):
    at = open_app(tiny_runs["topk"], DARK)
    no_crash(at)
    dm = store.dark_matter()
    assert metric(at, "Error variance predicted") == f"{dm.heldout_error_r2:.3g}"
    assert dm.paper_heldout_error_r2_mean_dim is not None  # the paper's quantities beside ours
    assert metric(at, "Error predicted") == fmt(dm.paper_heldout_error_r2_mean_dim)
    assert metric(at, "‖e‖² predicted") == fmt(dm.paper_heldout_norm_sq_r2)
    assert metric(at, "Tokens fitted") == f"{dm.paper_n_train_tokens:,}"
    assert metric(at, "Tokens scored") == f"{dm.paper_n_heldout_tokens:,}"
    # the run is not in the paper's setting (short contexts, every position): the page says how to get it
    assert dm.paper_positions is None
    assert any("--context-len 1024 --paper-positions 1:1022" in c.value for c in at.caption)
    err_hist, ce_hist = plotly(at)
    assert [t["name"] for t in err_hist["data"]] == ["‖e‖", "linear part", "nonlinear part"]
    assert len(values(err_hist["data"][0]["x"])) == dm.n_token_rows
    assert ce_hist["layout"]["yaxis"]["type"] == "log"
    at.slider(key="dm_worst").set_value(3).run()
    worst = store.worst_contexts(3)
    bodies = [b for b in htmls(at) if "saescope-tokens" in b]
    assert len(bodies) == 3 and all(b.count("<span") == len(c.tokens) for b, c in zip(bodies, worst, strict=True))
    table = at.dataframe[0].value
    assert table["ΔCE"].is_monotonic_decreasing
    assert table["ΔCE"].iloc[0] == pytest.approx(store.token_rows("ce_delta", 1)[0].ce_delta)


# --- steering ------------------------------------------------------------------------------------
def test_steering_streams_baseline_and_steered_from_one_seed(tiny_runs, open_app, store):
    prompt = "The quick brown fox"
    at = open_app(tiny_runs["topk"], STEER, latents="5:20,9:-6", prompt=prompt, seed=3, max_new=12, temp=0.9)
    no_crash(at)  # a link with a prompt generates straight away
    assert [s.value for s in at.slider if s.key and s.key.startswith("steer_s_")] == [20.0, -6.0]
    bodies = [b for b in htmls(at) if "saescope-generation" in b]
    assert len(bodies) == 2
    man = store.manifest()
    lm = load_model(man["model"]["name"], device="cpu", dtype="float32")
    sae = load_sae(man["sae"]["path"])
    max_acts = {i: store.feature(i).max_act for i in (5, 9)}
    factory = steering_intervention(lm, sae, SteeringSpec({5: 20.0, 9: -6.0}), max_acts)
    pairs = list(compare(lm, lm.tokenizer(prompt)["input_ids"], factory, max_new_tokens=12, temperature=0.9, seed=3))
    base = str(lm.tokenizer.decode([a for a, _ in pairs if a is not None]))
    steered = str(lm.tokenizer.decode([b for _, b in pairs if b is not None]))
    assert html.escape(base, quote=True) in bodies[0] and html.escape(steered, quote=True) in bodies[1]
    assert base != steered


def test_app_steering_suppresses_a_concept_and_measures_its_removal(tiny_runs, open_app, store, tmp_path):
    from engine.analysis.concepts import read_concepts
    from engine.live.app import app_intervention, fit_concept, removal_report

    concepts = tmp_path / "concepts.jsonl"
    texts = {"code": "def f(x): return x + 1", "prose": "The river runs past the old mill in spring"}
    concepts.write_text("\n".join(json.dumps({"text": f"{t} {i}", "label": label})
                                  for i in range(6) for label, t in texts.items()))
    prompt = "The quick brown fox"
    at = open_app(tiny_runs["topk"], STEER, mode="app", concepts=str(concepts), concept="prose", prompt=prompt, seed=3,
                  max_new=10, temp=0.9)
    no_crash(at)
    assert at.selectbox(key="steer_concept").value == "prose" and at.query_params["mode"] == "app"
    man = store.manifest()
    lm = load_model(man["model"]["name"], device="cpu", dtype="float32")
    sae = load_sae(man["sae"]["path"])
    dens = fit_concept(lm, sae, read_concepts(concepts), "prose")
    header = next(m.value for m in at.markdown if m.value.startswith("**Steered**"))
    assert f"suppress prose ({len(dens.exclusive)} latents set to 0, {len(dens.shared)} scaled)" in header
    pairs = list(compare(lm, lm.tokenizer(prompt)["input_ids"], app_intervention(lm, sae, dens), max_new_tokens=10,
                         temperature=0.9, seed=3))
    steered = str(lm.tokenizer.decode([b for _, b in pairs if b is not None]))
    assert html.escape(steered, quote=True) in [b for b in htmls(at) if "saescope-generation" in b][1]
    next(b for b in at.button if b.key == "steer_measure").click().run()
    no_crash(at)
    table = at.dataframe[0].value
    rows = removal_report(lm, sae, read_concepts(concepts), dens)
    assert list(table["method"]) == ["clean", "APP", "zero-ablation"]
    assert list(table["loss on prose texts"]) == [fmt(r.concept_loss, 4) for r in rows]
    assert list(table["perplexity on others"]) == [fmt(r.other_ppl, 4) for r in rows]
    at.text_input(key="steer_concepts").input(str(tmp_path / "missing.jsonl")).run()
    assert any("no concepts file" in e.value for e in at.error)
    at.radio(key="steer_mode").set_value("add").run()
    at.radio(key="steer_mode").set_value("app").run()  # back in APP mode: a file is named again
    no_crash(at)
    assert at.text_input(key="steer_concepts").value


def test_steering_settings_live_in_the_url(tiny_runs, open_app):
    at = open_app(tiny_runs["topk"], STEER, add=7)
    no_crash(at)
    at.slider(key="steer_s_7").set_value(-2.5)
    at.radio(key="steer_mode").set_value("clamp")
    at.number_input(key="steer_seed").set_value(11)
    at.text_area(key="steer_prompt").input("a <b> c").run()
    no_crash(at)
    q = at.query_params
    assert (q["latents"], q["mode"], q["seed"], q["prompt"]) == ("7:-2.5", "clamp", "11", "a <b> c")
    assert "add" not in q
    next(b for b in at.button if b.key == "steer_rm_7").click().run()
    assert at.query_params["latents"] == "" and not [s for s in at.slider if (s.key or "").startswith("steer_s_")]


def test_steering_messages(tiny_runs, open_app):
    at = open_app(tiny_runs["topk"], STEER, latents="3:2,99999:1")
    no_crash(at)
    assert "99999" in at.warning[0].value
    at.text_area(key="steer_prompt").input("   ").run()
    next(b for b in at.button if b.label == "Generate").click().run()
    no_crash(at)
    assert "prompt is empty" in errors(at)
    at = open_app(tiny_runs["topk"], STEER, latents="x:y")
    no_crash(at)
    assert "Ignored the steering settings" in at.warning[0].value
    at = open_app(tiny_runs["topk"], STEER)
    at.text_input(key="steer_query").input("4").run()
    next(b for b in at.button if b.key == "steer_add_4").click().run()
    assert at.slider(key="steer_s_4").value == 4.0


# --- state across pages ---------------------------------------------------------------------------
def test_settings_survive_a_visit_to_another_page(tiny_runs, open_app):
    at = open_app(tiny_runs["topk"].parent, LENS, **{"run": "topk"})
    at.text_area(key="lens_text").input("kept text").run()
    at.slider(key="lens_top_k").set_value(3).run()
    at.switch_page(STEER).run()
    at.text_input(key="steer_query").input("4").run()
    next(b for b in at.button if b.key == "steer_add_4").click().run()
    at.slider(key="steer_s_4").set_value(-3.0)
    at.number_input(key="steer_seed").set_value(5).run()
    at.switch_page(FEATURES).run()
    at.query_params["feature"] = "9"
    at.run()
    next(b for b in at.button if b.label == "Steer with this latent").click().run()
    no_crash(at)
    assert not at.warning, [w.value for w in at.warning]
    assert at.slider(key="steer_s_4").value == -3.0 and at.slider(key="steer_s_9").value == 4.0
    assert at.number_input(key="steer_seed").value == 5
    assert at.query_params["latents"] == "4:-3,9:4" and at.query_params["run"] == "topk"
    at.switch_page(LENS).run()
    assert at.text_area(key="lens_text").value == "kept text" and at.slider(key="lens_top_k").value == 3
    assert at.sidebar.selectbox[0].value == "topk"


def _as_snapshot(run, tmp_path, **snapshot):
    """A copy of ``run`` whose manifest says it is snapshot 2 of a run still being computed."""
    import json
    import shutil

    copy = tmp_path / "live"
    shutil.copytree(run, copy)
    man = json.loads((copy / "manifest.json").read_text())
    man["snapshot"] = {"final": False, "index": 2, "seen_tokens": 2048, "target_tokens": 8192, **snapshot}
    (copy / "manifest.json").write_text(json.dumps(man))
    return copy


def test_a_run_still_being_computed_says_how_far_it_is(tiny_runs, open_app, tmp_path):
    import os
    import socket

    live = _as_snapshot(tiny_runs["topk"], tmp_path, host=socket.gethostname(), pid=os.getpid())
    for page in (None, "views/features.py", "views/dark_matter.py"):
        at = open_app(live, page)
        no_crash(at)
        notes = " ".join(i.value for i in at.info)
        assert "Still computing" in notes and "2,048 of 8,192 tokens (25%, snapshot 2)" in notes


def test_a_partial_run_whose_writer_stopped_says_so(tiny_runs, open_app, tmp_path):
    import socket

    live = _as_snapshot(tiny_runs["topk"], tmp_path, host=socket.gethostname(), pid=2**22 + 4321)
    at = open_app(live)
    no_crash(at)
    warnings = " ".join(w.value for w in at.warning)
    assert "partial" in warnings and "has stopped" in warnings and not at.info


def test_a_run_before_its_first_snapshot_waits_for_it(tmp_path, open_app):
    (tmp_path / "run" / ".partial").mkdir(parents=True)
    at = open_app(tmp_path / "run")
    no_crash(at)
    assert "first snapshot" in " ".join(i.value for i in at.info) and not at.error
