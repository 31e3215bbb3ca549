"""The app's explanation views on a run explained by ``explain_run`` (scripted explainer and judge, a tiny real
embedder): feature page, search by meaning, lens and steering labels."""

from __future__ import annotations

import html
import shutil

import pandas as pd
import pytest

from dashboard import render
from dashboard.render import fmt
from engine.interp import parts, schema
from engine.interp.embed import Embedder
from engine.interp.explain import ExplainConfig, explain_run
from engine.interp.store import InterpStore
from tests.dashboard.tinyrun import NASTY
from tests.engine.interp_util import ScriptedChat, save_embedder

from .test_pages import errors, htmls, no_crash

HOSTILE = "<img src=x onerror=alert(1)> *stars* _under_ `tick`"


def answer(prompt: str) -> str:
    """Explanations that differ per latent, some with markup that must show as text."""
    import hashlib

    digest = hashlib.sha1(prompt.encode()).hexdigest()
    words = ["light", "fox", "model", "word", "def"]
    text = f"the {words[int(digest[0], 16) % 5]} tokens {digest[:4]}"
    return text + (" " + HOSTILE if int(digest[1], 16) % 3 == 0 else "")


@pytest.fixture(scope="module")
def explained(tiny_runs, tmp_path_factory):
    """A copy of the tiny TopK run with explanations, detection/fuzzing/embedding scores and baselines for 0-39."""
    root = tmp_path_factory.mktemp("explained")
    run = root / "run"
    shutil.copytree(tiny_runs["topk"], run)
    embedder_dir = save_embedder(root / "embedder")
    chat = ScriptedChat(answer)
    cfg = ExplainConfig(features="0-39", baselines=True, device="cpu", dtype="float32")
    explain_run(run, chat, judge=chat, embedder=Embedder(embedder_dir), cfg=cfg, progress=False)
    with InterpStore.open(run) as store:
        best = store.best()
    assert len(best) >= 20
    return {"run": run, "embedder": embedder_dir, "best": best}


@pytest.fixture
def app(explained, open_app, monkeypatch):
    monkeypatch.setenv("SAESCOPE_EMBEDDER", str(explained["embedder"]))
    return lambda *args, **query: open_app(explained["run"], *args, **query)


def markdown(at) -> str:
    return "\n".join(m.value for m in at.markdown) + "\n".join(c.value for c in at.caption)


def test_feature_page_shows_the_best_explanation_its_scores_and_what_the_scorers_got_wrong(explained, app):
    fid, best = next((f, e) for f, e in explained["best"].items() if HOSTILE in (e.text or ""))
    at = app("views/features.py", feature=fid)
    no_crash(at)
    page = markdown(at)
    # the explanation is shown escaped for markdown: no live image tag, the stars kept literal
    assert "\\<img src=x onerror=alert\\(1\\)\\>" in page and "\\*stars\\*" in page
    assert "scripted" in page  # who explained it
    with InterpStore.open(explained["run"]) as store:
        details = store.scores(fid, best.explainer, best.prompt_version)
    shown = {m.label: m.value for m in at.metric}
    for d in details:
        assert shown[d.scorer.capitalize()] == fmt(d.score)
    assert {d.scorer for d in details} == {"detection", "fuzzing", "embedding", "intruder"}
    # every wrong excerpt is drawn (escaped token boxes); the counts in the confusion tables add up
    wrong = sum(len(d.wrong) for d in details)
    boxes = [h for h in htmls(at) if "saescope-tokens" in h]
    assert len(boxes) >= min(wrong, 1)
    assert all("<script>" not in h and "<img" not in h for h in htmls(at))
    tables = [t.value for t in at.dataframe if "judged: fires" in t.value.columns]
    assert len(tables) == 2  # detection and fuzzing
    for table, d in zip(tables, [d for d in details if d.scorer in ("detection", "fuzzing")], strict=True):
        assert int(table.to_numpy().sum()) == d.n_examples
        assert int(table.loc["fires (held out)", "judged: does not"]) == len(d.missed)
        assert int(table.loc["does not fire", "judged: fires"]) == len(d.false_alarms)
    # the scores per activation quantile, as stored
    (per_q,) = [t.value for t in at.dataframe if "quantile 0 (highest)" in t.value.index]
    for d in details:
        for q, v in d.by_quantile.items():
            row = "non-activating" if q < 0 else f"quantile {q}" + (" (highest)" if q == 0 else "")
            assert per_q.loc[row, d.scorer] == pytest.approx(round(v, 3)), (d.scorer, q)
    # the other explanations (the two baselines) are listed with theirs
    listed = [t.value for t in at.dataframe if "explainer" in t.value.columns]
    assert listed and {"baseline:shuffled", "baseline:top-tokens"} <= set(listed[0]["explainer"])


def test_a_latent_without_explanation_says_how_to_get_one(explained, app):
    at = app("views/features.py", feature=200)
    no_crash(at)
    assert "saescope explain RUN --features 200" in markdown(at)


def test_search_by_meaning_finds_a_latent_by_its_explanation_and_filters_by_score(explained, app):
    fid, best = next((f, e) for f, e in explained["best"].items() if HOSTILE not in (e.text or ""))
    at = app("views/features.py")
    assert at.radio(key="feat_by").value == "meaning"  # the default where the run is explained
    at.text_input(key="feat_query").set_value(best.text).run()
    no_crash(at)
    table = next(t.value for t in at.dataframe if "similarity" in t.value.columns)
    assert int(table["id"].iloc[0]) == fid and table["similarity"].iloc[0] == pytest.approx(1.0, abs=1e-5)
    assert table["explanation"].iloc[0] == best.text
    assert list(table["similarity"]) == sorted(table["similarity"], reverse=True)
    cut = float(table["score"].median())
    at.slider(key="feat_score").set_value(round(cut, 2)).run()
    kept = next(t.value for t in at.dataframe if "similarity" in t.value.columns)
    assert len(kept) < len(table) and (kept["score"] >= round(cut, 2) - 1e-9).all()


def test_list_shows_explanations_and_an_unexplained_run_explains_search_by_meaning(explained, tiny_runs, app, open_app):
    at = app("views/features.py")
    table = next(t.value for t in at.dataframe if "explanation" in t.value.columns)
    for fid, text in zip(table["id"], table["explanation"], strict=True):
        assert text == (explained["best"][int(fid)].text if int(fid) in explained["best"] else "")
    # the intruder column: each latent's intruder score as stored (chance 0.2)
    scores = parts.read_all(explained["run"], schema.SCORES).to_pylist()
    intruder = {r["feature_id"]: r["score"] for r in scores if r["scorer"] == "intruder" and r["score"] is not None}
    assert intruder and any(int(f) in intruder for f in table["id"])
    for fid, value in zip(table["id"], table["intruder"], strict=True):
        assert (value == pytest.approx(intruder[int(fid)])) if int(fid) in intruder else pd.isna(value)
    plain = open_app(tiny_runs["topk"], "views/features.py")
    assert plain.radio(key="feat_by").value == "label"
    plain.radio(key="feat_by").set_value("meaning").run()
    plain.text_input(key="feat_query").set_value("light").run()
    no_crash(plain)
    assert "no embedded explanations" in "\n".join(i.value for i in plain.info)
    assert not errors(plain)


def test_lens_and_steering_name_latents_by_their_explanations(explained, app):
    at = app("views/lens.py")
    at.text_area(key="lens_text").input("In the beginning was the word, and the fox " + NASTY).run()
    no_crash(at)
    tint = next(s for s in at.selectbox if s.label == "Tint the text by")
    names = [o for o in tint.options if o.startswith("Latent #")]  # the options as shown
    ids = [int(n.removeprefix("Latent #").split(" ")[0]) for n in names]
    named = [(f, n) for f, n in zip(ids, names, strict=True) if f in explained["best"]]
    assert named and len(named) < len(names) + 1
    for fid, name in named:
        assert name == f"Latent #{fid} · {explained['best'][fid].text}"
    body = htmls(at)[0]
    hover = [f for f in explained["best"] if f"#{f}: " in body]  # explained latents among the tokens' top latents
    assert hover and "<img" not in body
    for fid in hover:  # each named in the hover text, escaped
        assert html.escape(explained["best"][fid].text[:60], quote=True) in body
    fid = next(iter(explained["best"]))
    steer = app("views/steering.py", add=fid)
    no_crash(steer)
    links = [link.proto.label for link in steer.get("page_link")]
    assert any(label.startswith(f"#{fid} · ") and explained["best"][fid].text.split(" ")[1] in label for label in links)


def test_explain_this_latent_now_streams_stores_and_shows_the_new_explanation(explained, app, monkeypatch, tmp_path):
    from tests.engine.interp_util import save_chat_model

    fid = 200  # not explained yet
    at = app("views/features.py", feature=fid)
    assert not [b for b in at.button if b.key == f"explain_now_{fid}"]  # no explainer configured: no button
    assert "saescope serve --explainer demo" in markdown(at)
    chat_dir = save_chat_model(tmp_path / "chat")
    monkeypatch.setenv("SAESCOPE_EXPLAINER", str(chat_dir))
    at = app("views/features.py", feature=fid)
    at.button(key=f"explain_now_{fid}").click().run()
    no_crash(at)
    with InterpStore.open(explained["run"]) as store:
        rows = [e for e in store.explanations(fid) if e.explainer == f"local:{chat_dir.name}"]
    assert len(rows) == 1
    stored = rows[0]
    notes = [s.value for s in at.success] + [w.value for w in at.warning]
    assert len(notes) == 1
    if stored.status == "ok":  # the page now leads with it, its embedding score beside it
        assert "Stored" in notes[0] and set(stored.scores) == {"embedding"}
        assert markdown(at).count(render.md(stored.text)) >= 1
        assert [m.label for m in at.metric if m.label in ("Detection", "Fuzzing", "Embedding")] == ["Embedding"]
    else:  # a tiny random model may answer junk: recorded as failed, and said so
        assert stored.status == "failed" and "not usable" in notes[0]
    again = "Explain again now" if stored.status == "ok" else "Explain this latent now"
    assert at.button(key=f"explain_now_{fid}").label == again
