"""The Compare page through AppTest on tiny runs of three widths (one model, one hook): eval cards side by side,
curves across widths, matched latents, splits, deep links (``?a=&b=&latent=``), computing a missing comparison,
the refusal of runs on another hook; and the Overview's Evaluation section."""

import json
import shutil

import pytest

from dashboard.render import fmt
from engine.eval.compare import CompareConfig, compare_runs
from engine.eval.evaluate import EvaluateConfig, evaluate_run
from engine.eval.files import evaluation_summary
from engine.eval.runs import card
from engine.eval.separability import SeparabilityConfig
from engine.model.loading import load_model
from engine.precompute.pipeline import precompute
from engine.run.store import RunStore
from engine.saes import load_sae
from tests.dashboard.tinyrun import make_sae
from tests.engine.eval_util import build_width_runs

from .test_pages import htmls, metric, no_crash, plotly

COMPARE = "views/compare.py"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """narrow (64), mid (128), wide (256) runs; narrow vs wide compared; narrow evaluated (core, separability)."""
    root = tmp_path_factory.mktemp("compare_page")
    out = build_width_runs(root)
    lm = load_model(out["model"], device="cpu", dtype="float32")
    sae_dir = make_sae("topk", d_sae=128, seed=3).save(root / "sae_mid")
    out["mid"] = root / "runs" / "mid"
    precompute(lm, load_sae(sae_dir), root / "corpus.jsonl", out["mid"], context_len=32, sae_path=sae_dir, progress=False)
    compare_runs([out["narrow"], out["wide"]], cfg=CompareConfig(tokens=1024), lm=lm)
    concepts = root / "concepts.jsonl"
    texts = {"code": "def f(x): return x + 1", "prose": "The river runs past the old mill in spring"}
    concepts.write_text("\n".join(json.dumps({"text": f"{t} {i}", "label": label})
                                  for i in range(8) for label, t in texts.items()))
    evaluate_run(out["narrow"], EvaluateConfig(parts=("core", "separability"), tokens=512,
                                               separability=SeparabilityConfig(concepts=str(concepts))), lm=lm)
    out["root"] = root / "runs"
    return out


def text(at) -> str:
    return "\n".join([m.value for m in at.markdown] + [c.value for c in at.caption] + [s.value for s in at.subheader])


def row_of(cards, label: str):
    return cards[cards["metric"] == label].iloc[0]


def test_cards_curves_and_matches_side_by_side(runs, open_app):
    at = open_app(runs["root"], COMPARE, a="narrow", b="wide")
    no_crash(at)
    cards = at.dataframe[0].value
    assert list(cards.columns) == ["metric", "narrow (64)", "wide (256)", "mid (128)"]
    with RunStore.open(runs["wide"]) as store:
        wide = card(store)
    row = cards[cards["metric"] == "Explained variance"].iloc[0]
    assert row["wide (256)"] == fmt(wide["explained_variance"], 4)
    for key, label in (("kl_score", "KL score"), ("ce_loss_increase_ci95", "CE loss increase: ± 95% interval")):
        assert wide[key] is not None and cards[cards["metric"] == label].iloc[0]["wide (256)"] == fmt(wide[key], 4)
    assert cards[cards["metric"] == "L2 ratio ‖x̂‖/‖x‖"].iloc[0]["wide (256)"] == "–"  # only narrow was evaluated
    values, _, _ = evaluation_summary(runs["narrow"])  # type: ignore[misc]
    for key, label in (("separability/mean_js_all", "Concept separability (JS distance): latents"),
                       ("separability/neuron_mean_js_all", "Concept separability: the hook's neurons")):
        assert row_of(cards, label)["narrow (64)"] == fmt(values[key], 4) and row_of(cards, label)["wide (256)"] == "–"
    charts = plotly(at)
    assert len(charts) == 4  # EV and dark-matter curves across the three widths, cosine and correlation histograms
    assert [int(x) for x in charts[0]["data"][0]["x"]] == [64, 128, 256]
    # the dark-matter curves and rows say whose quantity they are
    assert [t["name"] for t in charts[1]["data"]] == ["error variance predicted (saescope)", "‖e‖ predicted (saescope)"]
    assert row_of(cards, "Dark matter (saescope's fit): ‖e‖ predicted")["wide (256)"] == fmt(wide["dm_norm_r2"], 4)
    assert any("not the paper's" in c.value for c in at.caption)
    assert metric(at, "One-to-one pairs") == "64" and metric(at, "Split latents") == "8"
    splits = at.dataframe[2].value
    assert set(splits["narrow"]) >= set(range(8)) and (splits["children"] >= 2).all()
    assert at.query_params["a"] == "narrow" and at.query_params["b"] == "wide"


def test_deep_link_to_a_split_latent_shows_its_children(runs, open_app):
    at = open_app(runs["root"], COMPARE, a="narrow", b="wide", latent=3)
    no_crash(at)
    body = text(at)
    assert "Latent #3 of narrow" in body
    assert body.count("split child") == 2 and "#6" in body and "#7" in body
    assert sum(h.count('class="saescope-tokens"') for h in htmls(at)) >= 3  # examples of the latent and both children


def test_the_wider_run_as_a_links_a_child_to_its_parent(runs, open_app):
    at = open_app(runs["root"], COMPARE, a="wide", b="narrow", latent=7)
    no_crash(at)
    body = text(at)
    assert "Latent #7 of wide" in body and "the latent it splits off" in body and "#3" in body


def test_missing_comparison_is_computed_on_request(runs, open_app, tmp_path):
    at = open_app(runs["root"], COMPARE, a="mid", b="wide")
    no_crash(at)
    assert any("saescope compare" in i.value for i in at.info)
    next(b for b in at.button if b.label == "Compare now").click().run()
    no_crash(at)
    assert (runs["mid"] / "compare" / "wide" / "comparison.json").is_file()
    assert metric(at, "One-to-one pairs") == "128"
    shutil.rmtree(runs["mid"] / "compare")


def _other_hook(runs, root, name="other"):
    """A copy of the wide run whose manifest says it reads another hook: it can be compared with none of the others."""
    shutil.copytree(runs["wide"], root / name)
    manifest = json.loads((root / name / "manifest.json").read_text())
    manifest["sae"]["hook"] = "blocks.1.hook_resid_post"
    (root / name / "manifest.json").write_text(json.dumps(manifest))


def test_runs_of_another_hook_are_not_offered_and_none_comparable_says_so(runs, open_app, tmp_path):
    root = tmp_path / "runs"
    root.mkdir()
    shutil.copytree(runs["narrow"], root / "narrow")
    _other_hook(runs, root)
    at = open_app(root, COMPARE, a="narrow", b="other")
    no_crash(at)
    assert not at.error and not [box for box in at.selectbox if box.key in ("cmp_a", "cmp_b")]
    (note,) = at.info
    assert "No two of these runs can be compared" in note.value
    assert "` narrow ` (on ` blocks.0.hook_resid_post `)" in note.value
    assert "` other ` (on ` blocks.1.hook_resid_post `)" in note.value


def test_the_page_opens_on_a_comparable_pair(runs, open_app, tmp_path):
    """The demo's case: the sidebar's run (or a link) names a run on another hook; the page opens on a pair that can
    be compared instead of an error, and says which runs go together."""
    root = tmp_path / "runs"
    root.mkdir()
    for name in ("narrow", "wide"):
        shutil.copytree(runs[name], root / name)
    _other_hook(runs, root, "attn")  # sorted first: the sidebar's default run
    at = open_app(root, COMPARE)
    no_crash(at)
    assert at.selectbox(key="run_picker").value == "attn" and not at.error
    assert (at.selectbox(key="cmp_a").value, at.selectbox(key="cmp_b").value) == ("narrow", "wide")
    assert at.selectbox(key="cmp_a").options == ["narrow", "wide"] and at.selectbox(key="cmp_b").options == ["wide"]
    assert any("Not offered" in c.value and "` attn `" in c.value for c in at.caption)
    assert metric(at, "One-to-one pairs") == "64"

    at = open_app(root, COMPARE, a="narrow", b="attn")  # a shared link to a pair that cannot be compared
    no_crash(at)
    assert not at.error and "are not SAEs on the same model and hook point" in at.warning[0].value
    assert "` narrow `, ` wide ` (on ` blocks.0.hook_resid_post `)" in at.warning[0].value
    assert (at.selectbox(key="cmp_a").value, at.selectbox(key="cmp_b").value) == ("narrow", "wide")
    assert at.query_params["b"] == "wide"


def test_opening_pair():
    from dashboard.compare_view import opening_pair, peers

    ids = {"attn": ("m", "z"), "narrow": ("m", "r"), "mid": ("m", "r"), "wide": ("m", "r"), "alone": ("n", "r")}
    p = peers(ids)
    assert p["attn"] == [] and p["mid"] == ["narrow", "wide"] and p["alone"] == []
    assert opening_pair(p, None, None, "attn") == ("narrow", "mid")  # the sidebar's run has no peer
    assert opening_pair(p, None, None, "wide") == ("wide", "narrow")
    assert opening_pair(p, "mid", "wide", "narrow") == ("mid", "wide")  # a link wins
    assert opening_pair(p, "mid", "attn", None) == ("mid", "narrow")  # ... where its B can be compared with its A
    assert opening_pair(p, "attn", "alone", None) == ("narrow", "mid")
    assert opening_pair(peers({"a": (1,), "b": (2,)}), "a", "b", "a") is None


def test_one_run_is_not_enough(runs, open_app):
    at = open_app(runs["narrow"], COMPARE)
    no_crash(at)
    assert "needs two runs or more" in at.info[0].value


def test_overview_shows_the_evaluation(runs, open_app):
    at = open_app(runs["root"], run="narrow")
    no_crash(at)
    assert any(s.value == "Evaluation" for s in at.subheader)
    from engine.eval.files import evaluation_summary

    summary = evaluation_summary(runs["narrow"], json.loads((runs["narrow"] / "manifest.json").read_text()))
    assert summary is not None
    values, _, stale = summary
    assert not stale
    assert metric(at, "L2 ratio ‖x̂‖/‖x‖") == fmt(values["core/l2_ratio"])
    assert metric(at, "cos(x, x̂)") == fmt(values["core/cosine"])
    at = open_app(runs["root"], run="wide")
    assert not any(s.value == "Evaluation" for s in at.subheader)
