"""End to end: ``saescope serve`` on a tiny run, driven by Playwright with Debian's Chromium.

Screenshots of each page go to ``test-artifacts/`` (git-ignored). Never downloads a browser: where
``/usr/bin/chromium`` is missing the tests fail and say how to install it (``make test`` does, as root).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.circuits.supervised_files import write_supervised
from tests.dashboard.tinyrun import HOOK, NASTY, build_tiny_run
from tests.engine.circuits.circuit_util import fake_supervised, tiny_circuit

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serving(run: Path, log_dir: Path, *extra_args: str, env: dict[str, str] | None = None,
            host: str = "127.0.0.1") -> Iterator[str]:
    """``saescope serve --run RUN --host HOST`` on a free port, up and healthy; yields the base URL on 127.0.0.1 (its
    output is in ``log_dir/serve.log``)."""
    port = free_port()
    log = (log_dir / "serve.log").open("w+")
    full_env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1", **(env or {})}
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine.cli", "serve", "--run", str(run), "--host", host, "--port", str(port), *extra_args],
        cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                if urllib.request.urlopen(f"{base}/_stcore/health", timeout=2).read() == b"ok":
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                log.seek(0)
                pytest.fail(f"saescope serve did not come up:\n{log.read()}")
            time.sleep(0.3)
        log.seek(0)
        assert f"serving {run} at {base if host == '127.0.0.1' else ''}" in log.read()
        yield base
    finally:
        proc.terminate()  # serve exec'd Streamlit: the signal reaches the server itself
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``saescope serve --run <tiny run>``; yields the base URL."""
    run = build_tiny_run(tmp_path_factory.mktemp("e2e"), "topk")
    tiny_circuit(run)  # a circuit run of the tiny model under run/circuits, for the Circuits page
    write_supervised(run / "circuits", fake_supervised(HOOK), "tiny", "planted")  # its supervised-dictionary panel
    with serving(run, tmp_path_factory.mktemp("log")) as base:
        yield base


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():  # a failure, not a skip: a missing browser must not pass as a green run
        pytest.fail(f"Debian's chromium is not installed at {CHROMIUM}: run `make test` as root (it installs it), or "
                    "`sudo apt-get install chromium chromium-driver`; `make test-fast` runs without the browser tests")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 2600})
    pg = context.new_page()
    pg.set_default_timeout(60_000)
    yield pg
    context.close()


APP_IDLE = """() => document.querySelector('[data-testid="stApp"]')?.dataset.testScriptState === 'notRunning'"""
"""True once the app's script has run and is not running (Streamlit keeps the state on the app's root element)."""
DRAWN = """() => { const shown = s => [...document.querySelectorAll(s)].filter(e => e.checkVisibility());
    return document.fonts.status === 'loaded' && shown('[data-testid="stSkeleton"]').length === 0
        && shown('.js-plotly-plot').every(p => p.querySelector('.main-svg'))
        && shown('[data-testid="stDataFrame"]').every(d => d.querySelector('canvas')); }"""
"""True once the web fonts are in (they set every text's width), no element in view waits for its code (Streamlit
shows a skeleton meanwhile) and every chart and table in view has drawn itself."""


def idle(page) -> None:
    """Wait until the app has finished its script run and drawn what it sent."""
    page.wait_for_function(APP_IDLE)
    page.wait_for_function(DRAWN)


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    idle(page)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def count_runs(page) -> None:
    """From now on count the app's finished script runs in ``window.saescopeRuns`` (a run is finished when the root
    element's state leaves ``running``); arm it before the click that starts a run, so no run goes unseen."""
    page.evaluate("""() => {
        window.saescopeRuns = 0;
        new MutationObserver(records => records.forEach(r => { if (r.oldValue === 'running') window.saescopeRuns++; }))
            .observe(document.querySelector('[data-testid="stApp"]'),
                     {attributes: true, attributeFilter: ['data-test-script-state'], attributeOldValue: true});
    }""")


def generations(page) -> list[str]:
    boxes = page.locator(".saescope-generation")
    return [boxes.nth(i).inner_text() for i in range(boxes.count())]


def settled_generations(page) -> list[str]:
    """The two continuations once the script run that streams them has finished (no cursor left)."""
    page.wait_for_function("""() => document.querySelector('[data-testid="stApp"]').dataset.testScriptState === 'notRunning'
        && [...document.querySelectorAll('.saescope-generation')].filter(b => !b.innerText.includes('▌')).length === 2""",
                           timeout=90_000)
    return generations(page)


def test_overview(server, page):
    page.goto(server)
    page.get_by_role("heading", name="Latent densities").wait_for()
    page.locator(".js-plotly-plot").first.wait_for()
    assert page.get_by_text("256", exact=True).count() >= 1  # SAE width
    for label in ("Explained variance", "EV without massive tokens", "CE loss increase (nats)"):
        assert page.get_by_text(label, exact=True).is_visible()
    shot(page, "overview")


def test_search_and_open_a_feature(server, page):
    page.goto(f"{server}/features")
    search = page.locator('input[aria-label="Search"]')  # not the table toolbar's search button
    search.fill("the")
    search.press("Enter")
    page.get_by_text("for 'the' by label").wait_for()
    grid = page.locator('[data-testid="stDataFrame"]').first
    grid.wait_for(state="visible")
    # the grid canvas lays out after the element appears
    page.wait_for_function("""() => document.querySelector('[data-testid="stDataFrame"]').getBoundingClientRect().height >= 60""")
    box = grid.bounding_box()
    assert box is not None, "the search results table never rendered"
    page.mouse.click(box["x"] + 18, box["y"] + 35 + 17)  # the first row's selection cell
    page.get_by_role("heading", name="Feature #").wait_for()
    assert "feature=" in page.url
    page.get_by_text("Top activations").wait_for()
    tinted = page.locator(".saescope-tokens span[title]")
    tinted.first.wait_for()
    assert tinted.count() > 10
    shot(page, "feature")


def test_prompt_lens(server, page):
    page.goto(f"{server}/lens")
    text = page.get_by_label("Text", exact=True)
    text.fill(f"In the beginning was the word. {NASTY}\ndef add(a, b):\n    return a + b")
    text.press("Control+Enter")
    tokens = page.locator(".saescope-tokens").first
    tokens.wait_for()
    shown = tokens.inner_text()
    assert "<script>" in shown and "</div>" in shown  # markup shows as text
    assert page.locator("script:has-text('alert')").count() == 0
    assert tokens.locator("span[title]").count() > 20
    page.get_by_role("heading", name="Per token").wait_for()
    shot(page, "prompt_lens")


def test_steering_slider_changes_the_continuation(server, page):
    page.goto(f"{server}/steering?latents=5:0&prompt=The%20quick%20brown&max_new=16&seed=1")
    baseline, steered = settled_generations(page)  # a link with a prompt generates at once
    assert baseline == steered  # strength 0
    slider = page.get_by_role("slider", name="Strength of #5")
    slider.focus()
    slider.press("End")  # the maximum strength
    page.wait_for_function("() => location.search.includes('latents=5%3A20')")
    page.wait_for_function(APP_IDLE)  # the slider's run is over: the next run to finish is the one Generate starts
    count_runs(page)
    page.get_by_role("button", name="Generate").click()
    page.wait_for_function("() => window.saescopeRuns > 0", timeout=90_000)
    baseline2, steered2 = settled_generations(page)
    assert baseline2 == baseline and steered2 != baseline2
    shot(page, "steering")


def test_deep_link_and_dark_matter(server, page):
    page.goto(f"{server}/features?feature=7")
    page.get_by_role("heading", name="Feature #7").wait_for()
    page.get_by_text("Nearest latents").wait_for()
    shot(page, "deep_link_feature_7")
    page.goto(f"{server}/features?feature=123456")
    page.get_by_text("Feature 123456 does not exist").wait_for()
    page.goto(f"{server}/dark_matter")
    page.get_by_text("Contexts the SAE reconstructs worst").wait_for()
    page.locator(".saescope-tokens").first.wait_for()
    shot(page, "dark_matter")


def test_circuits_page_opens_a_head(server, page):
    page.goto(f"{server}/circuits?task=tiny&head=L1.H2")
    page.get_by_role("heading", name="Head L1.H2").wait_for()
    idle(page)
    assert page.locator(".js-plotly-plot").count() == 3  # heatmaps, ROC, the supervised edits' success curve
    assert page.get_by_text("Positive prompts", exact=False).is_visible()
    assert page.get_by_text("No attention-output SAE at layer 1", exact=False).is_visible()  # the head panel's line
    assert page.get_by_role("heading", name="Supervised dictionary (IOI)").is_visible()
    page.get_by_test_id("stSelectbox").filter(has_text="Head").locator("input").click()
    page.get_by_role("option", name="L0.H1", exact=True).click()
    page.get_by_role("heading", name="Head L0.H1").wait_for()
    page.wait_for_function("() => location.search.includes('head=L0.H1')")
    assert page.get_by_text("And God said, Let there be").first.is_visible()
    shot(page, "circuits")
