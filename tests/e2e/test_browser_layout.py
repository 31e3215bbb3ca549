"""End to end at a common laptop width (1366 px, the sidebar open): every metric card shows its whole label and
value on every page that has cards, and Compare opens on runs it can compare when the sidebar's run (as the demo's
attention SAE) has no peer. Screenshots go to ``test-artifacts/laptop_*.png``."""

from __future__ import annotations

import pytest

from engine.eval.compare import CompareConfig, compare_runs
from engine.eval.evaluate import EvaluateConfig, evaluate_run
from engine.model.loading import load_model
from tests.dashboard.tinyrun import build_tiny_run
from tests.engine.eval_util import build_width_runs

from .test_browser import browser, idle, serving, shot  # noqa: F401  (fixtures)

pytestmark = pytest.mark.slow

LAPTOP = {"width": 1366, "height": 2400}  # the width of a laptop; tall, so the screenshots show whole pages
CUT = """() => [...document.querySelectorAll('[data-testid="stMetric"] *')]
    .filter(e => e.children.length === 0 || e.dataset.testid === 'stMarkdownContainer')
    .filter(e => (getComputedStyle(e).overflowX !== 'visible' && e.scrollWidth > e.clientWidth)
                 || e.textContent.trim().endsWith('…'))
    .map(e => e.closest('[data-testid="stMetric"]').innerText.replace(/\\s+/g, ' '))"""
"""The cards with a cut label, value or delta: an element that clips (ellipsis) and holds more than it shows."""
CARDS = """() => document.querySelectorAll('[data-testid="stMetric"]').length"""


@pytest.fixture(scope="module")
def runs_server(tmp_path_factory):
    """A directory of runs: narrow and wide TopK SAEs on one hook (compared; narrow evaluated) and an attention SAE
    on another hook, which sorts first (the sidebar's default run) and has no run to be compared with."""
    root = tmp_path_factory.mktemp("laptop")
    out = build_width_runs(root)
    build_tiny_run(root, "topk", hook="blocks.1.attn.hook_z", name="attn")
    lm = load_model(out["model"], device="cpu", dtype="float32")
    compare_runs([out["narrow"], out["wide"]], cfg=CompareConfig(tokens=1024), lm=lm)
    evaluate_run(out["narrow"], EvaluateConfig(parts=("core",), tokens=512), lm=lm)
    with serving(root / "runs", tmp_path_factory.mktemp("log")) as base:
        yield base


@pytest.fixture
def laptop(browser):  # noqa: F811
    context = browser.new_context(viewport=LAPTOP)
    page = context.new_page()
    page.set_default_timeout(60_000)
    yield page
    context.close()


def test_metric_cards_show_whole_labels_and_values_at_a_laptop_width(runs_server, laptop):
    page, cut = laptop, {}
    pages = {
        "overview": ("/?run=narrow", "Evaluation"),
        "dark_matter": ("/dark_matter?run=narrow", "Error norms"),
        "feature": ("/features?feature=3&run=narrow", "Top activations"),
        "compare": ("/compare?run=narrow&a=narrow&b=wide", "Matched pairs"),
        "lens": ("/lens?run=narrow", "Latents per token"),
    }
    for name, (path, landmark) in pages.items():
        page.goto(runs_server + path)
        page.get_by_text(landmark, exact=True).first.wait_for()
        if name == "lens":
            text = page.get_by_label("Text", exact=True)
            text.fill("In the beginning was the word, and the word was with the model.")
            text.press("Control+Enter")
            page.get_by_role("heading", name="Per token").wait_for()
        shot(page, f"laptop_{name}")  # waits for the fonts (they set the widths) and the charts
        assert page.evaluate(CARDS) >= 4, f"{name}: the cards did not render"
        cut[name] = page.evaluate(CUT)
    assert cut == {name: [] for name in pages}


def test_compare_opens_on_runs_it_can_compare(runs_server, laptop):
    page = laptop
    page.goto(f"{runs_server}/compare")
    page.get_by_role("heading", name="Matched latents").wait_for()
    idle(page)
    chosen = [box.locator("input").input_value() for box in page.get_by_test_id("stSelectbox").all()]
    assert chosen == ["attn", "narrow", "wide"]  # the sidebar's run; runs A and B
    assert page.url.endswith("/compare?run=attn&a=narrow&b=wide")
    assert page.get_by_text("cannot be compared").count() == 0
    assert "attn" in page.get_by_text("Not offered").inner_text()
    shot(page, "laptop_compare_opening")
