"""End to end: explanations in a real browser on ``saescope serve --explainer``: the feature page's explanation
(escaped), its scores, "Explain this latent now" streaming into the page and stored, and search by meaning."""

from __future__ import annotations

import pytest

from engine.interp.embed import Embedder
from engine.interp.explain import ExplainConfig, explain_run
from engine.interp.store import InterpStore
from tests.dashboard.test_explain_pages import HOSTILE, answer
from tests.dashboard.tinyrun import build_tiny_run
from tests.engine.interp_util import ScriptedChat, save_chat_model, save_embedder

from .test_browser import browser, page, serving, shot  # noqa: F401  (fixtures)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def explained_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e-explain")
    run = build_tiny_run(root, "topk")
    embedder = save_embedder(root / "embedder")
    chat = ScriptedChat(answer)
    explain_run(run, chat, judge=chat, embedder=Embedder(embedder),
                cfg=ExplainConfig(features="0-39", device="cpu", dtype="float32"), progress=False)
    chat_model = save_chat_model(root / "chat")
    with serving(run, root, "--explainer", str(chat_model), env={"SAESCOPE_EMBEDDER": str(embedder)}) as base:
        yield base, run, chat_model


def test_explanation_scores_and_explain_now_in_the_browser(explained_server, page):  # noqa: F811
    base, run, chat_model = explained_server
    with InterpStore.open(run) as store:
        best = store.best()
    fid = next(f for f, e in best.items() if HOSTILE in (e.text or ""))
    page.goto(f"{base}/features?feature={fid}")
    page.get_by_role("heading", name=f"Feature #{fid}").wait_for()
    heading = page.get_by_role("heading", level=4).first
    heading.wait_for()
    assert HOSTILE in heading.inner_text()  # markup and markdown shown as the text they are
    assert page.locator("img[src='x']").count() == 0
    for scorer in ("Detection", "Fuzzing", "Embedding"):
        page.get_by_text(scorer, exact=True).first.wait_for()
    page.get_by_text("What the scorers got wrong").click()
    page.get_by_role("tab", name="embedding").wait_for()
    shot(page, "explanation_feature")

    page.goto(f"{base}/features?feature=200")  # no explanation yet
    page.get_by_text("No written explanation yet").wait_for()
    page.get_by_role("button", name="Explain this latent now").click()
    page.locator('[data-testid="stAlert"]').first.wait_for(timeout=120_000)  # stored, or recorded as junk
    with InterpStore.open(run) as store:
        rows = [e for e in store.explanations(200) if e.explainer == f"local:{chat_model.name}"]
    assert len(rows) == 1
    if rows[0].status == "ok":
        assert rows[0].text in page.get_by_role("heading", level=4).first.inner_text()
        page.get_by_role("button", name="Explain again now").wait_for()
    shot(page, "explain_now")


def test_search_by_meaning_in_the_browser(explained_server, page):  # noqa: F811
    base, run, _ = explained_server
    with InterpStore.open(run) as store:
        text = next(e.text for e in store.best().values() if HOSTILE not in (e.text or ""))
    page.goto(f"{base}/features")
    search = page.locator('input[aria-label="Search"]')
    search.fill(text)
    search.press("Enter")
    page.get_by_text("latents closest in meaning to").wait_for()
    page.locator('[data-testid="stDataFrame"]').first.wait_for(state="visible")
    shot(page, "search_by_meaning")
