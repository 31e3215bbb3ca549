"""The attention-head panel of the feature page and the lens's live DFA, through AppTest on tiny runs."""

import html
import json
import re
import shutil

import pyarrow.parquet as pq
import pytest

from engine.analysis.dfa import dfa
from engine.live.lens import tokenize_prompt
from engine.model.loading import load_model
from engine.run.store import RunStore
from engine.saes import load_sae

from .test_pages import FEATURES, LENS, htmls, no_crash, plotly, values

HOSTILE = 'Hello <script>alert("x")</script> </div> & <b>bold</b> world, and the word was with the model'


@pytest.fixture(scope="module")
def store(tiny_attn_run):
    with RunStore.open(tiny_attn_run) as s:
        yield s


def _titles(body: str) -> list[str]:
    return [html.unescape(t) for t in re.findall(r'title="([^"]*)"', body)]


def _dfa_boxes(at) -> list[str]:
    return [b for b in htmls(at) if "· destination" in html.unescape(b)]


def test_feature_page_shows_head_shares_and_source_tokens(tiny_attn_run, open_app, store):
    # a latent whose top examples hold markup (the corpus has <script> and </div>)
    fid = next(i for i in range(store.n_features())
               if store.attribution(i) and any("<" in "".join(e.tokens) for e in store.examples(i, "top")))
    row, attributed = store.feature(fid), store.attribution(fid)
    at = open_app(tiny_attn_run, FEATURES, feature=fid)
    no_crash(at)
    assert any(s.value == "Attention heads" for s in at.subheader)
    shares = next(spec for spec in plotly(at) if spec["data"][0].get("name") == "decoder norm")
    names = ["L1.H0", "L1.H1", "L1.H2", "L1.H3"]
    norm, weights, data = shares["data"]
    assert list(weights["x"]) == names and weights["name"] == "decoder norm²" and data["name"] == "top examples"
    assert values(norm["y"]) == pytest.approx(row.head_norm_shares)
    assert values(weights["y"]) == pytest.approx(row.head_weight_shares)
    assert values(data["y"]) == pytest.approx(row.head_data_shares)
    boxes = _dfa_boxes(at)
    assert sum(b.count('class="saescope-tokens"') for b in boxes) == len(attributed)  # 6 shown, the rest expanded
    first, example = attributed[0], next(e for e in row.examples if e.kind == "top" and e.rank == 0)
    titles = _titles(boxes[0])[: len(example.tokens)]  # the first example's tokens
    assert len(titles) == len(example.tokens)
    # the largest contribution is named on its source token's hover, with its head
    head, source, value = first.dfa_heads[0], first.dfa_sources[0], first.dfa_values[0]
    assert f"{names[head]}: {value:+.3f}" in titles[source - example.start]
    assert "destination" in titles[first.max_pos - example.start]
    assert f"pre-activation {_fmt(first.pre())}" in html.unescape(boxes[0])
    body = "".join(boxes)
    assert "&lt;" in body and "<script" not in body and "<b>" not in body


def _fmt(value):
    from dashboard.render import fmt

    return fmt(value)


def test_feature_page_of_a_residual_sae_says_heads_need_an_attention_sae(tiny_runs, open_app):
    at = open_app(tiny_runs["topk"], FEATURES, feature=5)
    no_crash(at)
    assert any("Head attribution applies to attention-output SAEs" in c.value for c in at.caption)
    assert not any(s.value == "Attention heads" for s in at.subheader) and not _dfa_boxes(at)


def test_feature_page_of_an_older_attention_run_says_to_recompute(tiny_attn_run, open_app, store, tmp_path):
    fid = next(i for i in range(store.n_features()) if store.attribution(i))
    old = tmp_path / "old"
    shutil.copytree(tiny_attn_run, old)
    features = pq.read_table(old / "features.parquet")
    pq.write_table(features.drop_columns(["head_weight_shares", "head_data_shares"]), old / "features.parquet")
    (old / "attribution.parquet").unlink()
    (old / "index.duckdb").unlink()
    at = open_app(old, FEATURES, feature=fid)
    no_crash(at)
    assert any("precomputed without head attribution" in c.value for c in at.caption)
    assert not _dfa_boxes(at)


def test_lens_attributes_a_latent_at_the_inspected_token(tiny_attn_run, open_app):
    at = open_app(tiny_attn_run, LENS)
    at.text_area(key="lens_text").input(HOSTILE).run()
    no_crash(at)
    manifest = json.loads((tiny_attn_run / "manifest.json").read_text())
    lm = load_model(manifest["model"]["name"], device="cpu", dtype="float32")
    sae = load_sae(manifest["sae"]["path"])
    ids = tokenize_prompt(lm, HOSTILE)
    pos = 9
    next(b for b in at.selectbox if b.label == "Inspect a token").set_value(pos).run()
    no_crash(at)
    pick = next(b for b in at.selectbox if b.label == "Attribute latent")
    latent = pick.options[1]  # the second strongest latent here
    pick.set_value(int(latent.split()[0].lstrip("#"))).run()
    no_crash(at)
    latent = int(latent.split()[0].lstrip("#"))
    (box,) = _dfa_boxes(at)
    assert box.count("<span") == pos + 1
    expected = dfa(lm, sae, ids, latent, pos)
    titles = _titles(box)
    source = int(expected.by_source().abs().argmax())
    head = int(expected.contributions[:, source].abs().argmax())
    assert f"L1.H{head}: {float(expected.contributions[head, source]):+.3f}" in titles[source]
    assert f"latent #{latent} at position {pos}" in html.unescape(box)
    assert "&lt;" in box and "<script" not in box and "<b>" not in box


def test_lens_of_a_residual_sae_has_no_attribution(tiny_runs, open_app):
    at = open_app(tiny_runs["topk"], LENS)
    at.text_area(key="lens_text").input("The quick brown fox jumps over the lazy dog.").run()
    next(b for b in at.selectbox if b.label == "Inspect a token").set_value(3).run()
    no_crash(at)
    assert all(b.label != "Attribute latent" for b in at.selectbox) and not _dfa_boxes(at)
