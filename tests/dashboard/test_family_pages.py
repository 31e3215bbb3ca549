"""The SAE families on the app's pages: a Matryoshka run (per-token L0, groups, prefix curve, group filter) and a
g-SAE run (its encoder rule, the gradient admissions in the lens), through AppTest."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from engine.live.gradient_lens import gradient_lens
from engine.live.lens import tokenize_prompt
from engine.model.loading import load_model
from tests.dashboard.test_pages import FEATURES, LENS, no_crash, plotly, values
from tests.dashboard.tinyrun import HOOK, write_corpus

WIDTHS = [32, 96, 256]


def _family_run(root, architecture: str, **cfg_kw):
    from engine.model.tiny import save_tiny_model
    from engine.precompute.pipeline import precompute
    from engine.saes import SAEConfig, build_sae, load_sae

    root.mkdir(parents=True, exist_ok=True)
    save_tiny_model(root / "model")
    gen = torch.Generator().manual_seed(0)
    W_dec = torch.randn(256, 64, generator=gen)
    W_dec = W_dec / W_dec.norm(dim=-1, keepdim=True)
    state = {"W_dec": W_dec, "b_dec": torch.zeros(64), "W_enc": W_dec.T.contiguous(), "b_enc": torch.zeros(256)}
    if architecture in ("jumprelu", "feature_choice"):
        state["threshold"] = torch.full((256,), 0.01)
    cfg = SAEConfig(architecture=architecture, d_in=64, d_sae=256, hook_name=HOOK, **cfg_kw)
    sae_dir = build_sae(cfg, state).save(root / "sae")
    lm = load_model(root / "model", device="cpu", dtype="float32")
    run = root / "runs" / architecture
    precompute(lm, load_sae(sae_dir), write_corpus(root / "corpus.jsonl", 16), run, context_len=32, sae_path=sae_dir,
               progress=False)
    return run


@pytest.fixture(scope="module")
def matryoshka_run(tmp_path_factory):
    return _family_run(tmp_path_factory.mktemp("mat"), "jumprelu", matryoshka_widths=WIDTHS)


@pytest.fixture(scope="module")
def fc_run(tmp_path_factory):
    return _family_run(tmp_path_factory.mktemp("fc"), "feature_choice", k=8, metadata={"batch_tokens": 512})


@pytest.fixture(scope="module")
def gsae_run(tmp_path_factory):
    return _family_run(tmp_path_factory.mktemp("gsae"), "gradient_topk", k=8, gradient_beta=50.0)


def test_overview_of_a_matryoshka_run(matryoshka_run, open_app):
    at = open_app(matryoshka_run)
    no_crash(at)
    l0 = pq.read_table(matryoshka_run / "tokens.parquet").column("l0").to_numpy()
    assert l0.std() > 0  # a variable number of latents per token
    hist = plotly(at)[0]  # the per-token L0 histogram comes before the densities
    assert sorted(values(hist["data"][0]["x"]).tolist()) == sorted(l0.tolist())
    assert any("group g holds latents 1: 0–31 · 2: 32–95 · 3: 96–255" in c.value for c in at.caption)
    next(b for b in at.button if b.key == "mat_curve").click().run()
    no_crash(at)
    table = at.dataframe[-1].value
    assert table["width"].tolist() == WIDTHS and table["groups"].tolist() == [1, 2, 3]
    assert np.isfinite(table["explained variance"]).all() and table["L0 in prefix"].is_monotonic_increasing


def test_features_filtered_by_matryoshka_group(matryoshka_run, open_app):
    at = open_app(matryoshka_run, FEATURES)
    no_crash(at)
    at.selectbox(key="feat_group").set_value(2).run()
    no_crash(at)
    assert at.dataframe, ([i.value for i in at.info], [e.value for e in at.error], [e.value for e in at.exception])
    ids = at.dataframe[0].value["id"].tolist()
    rows = pq.read_table(matryoshka_run / "features.parquet").to_pylist()
    group = sorted((r for r in rows if 32 <= r["feature_id"] < 96 and not r["dead"]),
                   key=lambda r: (-r["density"], r["feature_id"]))  # the list's default order: density, descending
    assert ids == [r["feature_id"] for r in group][:50] and ids
    page = open_app(matryoshka_run, FEATURES, feature=40)
    assert any("Matryoshka group 2 of 3 (latents 32–95)" in c.value for c in page.caption)


def test_gradient_sae_rule_and_lens(gsae_run, open_app):
    at = open_app(gsae_run)
    no_crash(at)
    assert any("plain TopK over z" in i.value for i in at.info)
    assert not any("L0" in str(p["layout"].get("xaxis", {}).get("title", "")) for p in plotly(at))  # fixed k: no L0 plot
    at = open_app(gsae_run, LENS)
    text = "The quick brown fox jumps over the lazy dog."
    at.text_area(key="lens_text").input(text).run()
    no_crash(at)
    table = at.dataframe[-1].value
    lm = load_model(json.loads((gsae_run / "manifest.json").read_text())["model"]["name"], device="cpu", dtype="float32")
    from engine.saes import load_sae

    ids = tokenize_prompt(lm, text)
    want = gradient_lens(lm, load_sae(gsae_run.parent.parent / "sae"), ids, top_k=5)
    assert table["pos"].tolist() == list(range(len(ids)))
    got = table["admitted by the gradient (#latent z / gradient term)"].tolist()
    assert [len(s.split(", ")) if s else 0 for s in got] == [len(w.admitted) for w in want]
    assert sum(len(w.admitted) for w in want) > 0 and table["gradient"].tolist()[-1] is False


def test_feature_choice_density_against_its_cap(fc_run, open_app):
    man = json.loads((fc_run / "manifest.json").read_text())
    cap = (8 * 512 // 256) / 512  # m = floor(k N / d_sae) tokens of a training batch of N = 512
    assert man["sae"]["capacity_density"] == cap and "threshold" in man["sae"]["inference_rule"]
    at = open_app(fc_run)
    no_crash(at)
    dens = np.array([r["density"] for r in pq.read_table(fc_run / "features.parquet").to_pylist()])
    assert any(f"{int((dens > cap).sum()):,} latents fire more often than that" in c.value for c in at.caption)
    shapes = plotly(at)[-1]["layout"]["shapes"]
    assert any(abs(sh["x0"] - np.log10(cap)) < 1e-9 for sh in shapes)


def test_gradient_only_share_on_the_feature_page_and_the_features_table(gsae_run, open_app):
    rows = {r["feature_id"]: r for r in pq.read_table(gsae_run / "features.parquet").to_pylist()}
    fid = max(rows, key=lambda i: rows[i]["gradient_only_count"] or 0)
    row = rows[fid]
    assert row["gradient_only_count"] > 0
    page = open_app(gsae_run, FEATURES, feature=fid)
    no_crash(page)
    shown = next(m for m in page.metric if m.label == "Admitted by gradient alone")
    assert shown.value == f"{row['gradient_only_count'] / row['fire_count']:.1%}"
    at = open_app(gsae_run, FEATURES)
    no_crash(at)
    table = at.dataframe[0].value
    want = [rows[i]["gradient_only_count"] / rows[i]["fire_count"] for i in table["id"]]
    np.testing.assert_allclose(table["gradient only"].to_numpy(dtype=float), want)


def test_family_table_on_the_compare_page(gsae_run, open_app, tmp_path):
    """The family table (``saescope family-table --out`` in the served directory) heads the Compare page, even
    with one run served; its numbers are the Parquet file's."""
    from engine.model.tiny import tiny_model
    from engine.train.family_table import FamilyTableConfig, family_table

    root = gsae_run.parent  # <root>/runs: the served directory
    corpus = write_corpus(tmp_path / "heldout.jsonl", 12)
    cfg = FamilyTableConfig(eval_corpus=str(corpus), eval_contexts=3, ce_contexts=2, context_len=32, steer_latents=1,
                            steer_contexts=1, steer_len=16, steer_prompt=4)
    table = family_table(tiny_model("llama"), [gsae_run.parent.parent / "sae"], cfg, root / "families",
                         names=["g<b>sae"])
    at = open_app(root, "views/compare.py")
    no_crash(at)
    assert any("Family table: families" in s.value for s in at.subheader)
    shown = at.dataframe[0].value
    assert shown["SAE"].tolist() == ["g<b>sae"] and shown["family"].tolist() == ["gradient_topk"]
    assert shown["L0 mean"].tolist() == pytest.approx(table["l0_mean"].tolist())
    assert shown["explained variance"].tolist() == pytest.approx(table["explained_variance"].tolist())
    assert any("| g<b>sae | gradient_topk |" in c.value for c in at.code)
