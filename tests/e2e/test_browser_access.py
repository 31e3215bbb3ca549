"""End to end: ``saescope serve --host 0.0.0.0 --read-only`` for real, in Chromium. Without the token the page shows
only a form (no page, no run name); the generated token opens it, from the link or the form; the buttons that write
into runs are disabled; run names, manifest fields and URL parameters with markup show as the characters they are."""

from __future__ import annotations

import json
import re
import shutil
from urllib.parse import quote

import pytest

from tests.dashboard.tinyrun import build_tiny_run

from .test_browser import browser, idle, page, serving, shot  # noqa: F401  (fixtures)

pytestmark = pytest.mark.slow

HOSTILE = "*b* _i_ [x](javascript:alert(1)) <img src=x onerror=alert(1)> $m^2$ `t` :smile: :material/home:"
"""Markdown, a link, HTML, math and icon codes: each must show as these characters."""
HOSTILE_RUN = HOSTILE.replace("/", "|")  # a directory name
JOINER = "\u2060"  # the zero-width character render.md puts after a colon, so that Streamlit makes no icon


@pytest.fixture(scope="module")
def access_server(tmp_path_factory):
    """A directory of runs (plain, plain2: comparable, not compared; one named with markup and markup in its
    manifest) served on 0.0.0.0, read-only, with an explainer configured; yields (base URL, token, runs, log)."""
    root = tmp_path_factory.mktemp("access")
    plain = build_tiny_run(root, "topk", name="plain")
    shutil.copytree(plain, plain.parent / "plain2")
    hostile = plain.parent / HOSTILE_RUN
    shutil.copytree(plain, hostile)
    manifest = json.loads((hostile / "manifest.json").read_text())
    manifest["model"].update(name=HOSTILE, dtype=HOSTILE, hash=HOSTILE)
    manifest["sae"].update(architecture=HOSTILE, hook=HOSTILE)
    manifest["corpus"]["name"] = HOSTILE
    (hostile / "manifest.json").write_text(json.dumps(manifest))
    logs = tmp_path_factory.mktemp("log")
    with serving(plain.parent, logs, "--read-only", "--explainer", "demo", host="0.0.0.0") as base:
        log = (logs / "serve.log").read_text()
        match = re.search(r"\?token=([A-Za-z0-9_-]+)", log)
        assert match, log
        yield base, match.group(1), plain.parent, log


def main_text(page) -> str:  # noqa: F811
    return page.get_by_test_id("stMain").inner_text().replace(JOINER, "")


def test_beyond_loopback_each_session_gives_the_token(access_server, page):  # noqa: F811
    base, token, _, log = access_server
    assert "warning: 0.0.0.0 is not a loopback address" in log and "access token (generated" in log
    page.goto(f"{base}/features?feature=3&run=plain")
    field = page.get_by_label("Access token", exact=True)
    field.wait_for()
    idle(page)
    assert "plain" not in page.locator("body").inner_text() and page.get_by_test_id("stSidebarNav").count() == 0
    assert page.get_by_role("heading", name="Feature #3").count() == 0
    shot(page, "access_form")
    field.fill("not-the-token-at-all")
    page.get_by_role("button", name="Open").click()
    page.get_by_text("Wrong access token").wait_for()
    page.get_by_label("Access token", exact=True).fill(token)
    page.get_by_role("button", name="Open").click()
    page.get_by_role("heading", name="Feature #3").wait_for()  # the page the link named
    page.get_by_role("link", name="Dark matter").click()  # once per session
    page.get_by_role("heading", name="Dark matter").wait_for()

    page.goto(f"{base}/?token={token}x")
    page.get_by_text("The access token in the link is wrong").wait_for()
    assert page.get_by_role("heading", name="Overview").count() == 0
    page.goto(f"{base}/?run=plain&token={token}")  # the link serve printed
    page.get_by_role("heading", name="Overview").wait_for()
    idle(page)
    assert "token" not in page.url and "run=plain" in page.url  # the token leaves the address bar


def test_read_only_disables_the_buttons_that_write_into_runs(access_server, page):  # noqa: F811
    base, token, runs, _ = access_server
    page.goto(f"{base}/features?feature=3&run=plain&token={token}")
    explain = page.get_by_role("button", name="Explain this latent now")
    explain.wait_for()
    assert explain.is_disabled() and "read-only" in main_text(page)
    page.goto(f"{base}/compare?run=plain&a=plain&b=plain2&token={token}")
    compare = page.get_by_role("button", name="Compare now")
    compare.wait_for()
    idle(page)
    assert compare.is_disabled() and "read-only" in main_text(page)
    shot(page, "read_only_compare")
    assert not (runs / "plain" / "compare").exists() and not (runs / "plain2" / "compare").exists()


def test_markup_in_run_names_manifests_and_links_shows_as_text(access_server, page):  # noqa: F811
    base, token, _, _ = access_server
    dialogs = []
    page.on("dialog", lambda d: dialogs.append(d.message) or d.dismiss())
    injected = 'img[src="x"], a[href^="javascript"], .katex, [aria-label="home icon"]'

    page.goto(f"{base}/?run={quote(HOSTILE_RUN)}&token={token}")
    page.get_by_role("heading", name="Overview").wait_for()
    idle(page)
    shown = main_text(page)
    assert HOSTILE_RUN in shown  # the run's path
    assert shown.count(HOSTILE) == 6  # model name, dtype and hash; architecture; hook; corpus
    assert page.locator(injected).count() == 0 and "😄" not in shown
    shot(page, "hostile_overview")

    page.goto(f"{base}/compare?token={token}")  # the run cannot be compared with the others: named as it is
    page.get_by_text("Not offered").wait_for()
    idle(page)
    offered = page.get_by_text("Not offered").inner_text().replace(JOINER, "")
    assert HOSTILE_RUN in offered and HOSTILE in offered

    page.goto(f"{base}/features?run=plain&feature={quote(HOSTILE)}&token={token}")
    page.get_by_text("is not a feature id").wait_for()
    assert HOSTILE in main_text(page)
    page.goto(f"{base}/steering?run=plain&mode={quote(HOSTILE)}&token={token}")
    page.get_by_text("Ignored the steering settings in the link").wait_for()
    assert repr(HOSTILE) in main_text(page)
    assert page.locator(injected).count() == 0 and not dialogs
