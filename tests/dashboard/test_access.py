"""The app beyond loopback, through AppTest: the access token asked once per session (link or form) before any page
or run name shows, read-only mode turning off the buttons that write into runs, and file- and URL-controlled text
escaped in markdown (run names, manifest fields, query parameters)."""

import json
import shutil

import pytest

from dashboard import access, render

from .test_pages import no_crash

TOKEN = "a-long-enough-test-token"
FEATURES, STEER, COMPARE = "views/features.py", "views/steering.py", "views/compare.py"
HOSTILE = "*b* _i_ [x](javascript:alert(1)) <img src=x onerror=alert(1)> $m^2$ `t` :smile: :material/home:"
"""Markdown, a link, HTML, math and icon codes: each must show as these characters."""


def body(at) -> str:
    """Every markdown string the run sent (the page's text, alerts and titles), for checks on what reaches markdown."""
    parts = [e.value for kind in ("markdown", "caption", "title", "subheader", "error", "warning", "info")
             for e in getattr(at, kind)]
    return "\n".join(parts)


def test_without_the_token_a_session_sees_only_the_form(tiny_runs, open_app, monkeypatch):
    monkeypatch.setenv(access.TOKEN_ENV, TOKEN)
    at = open_app(tiny_runs["topk"].parent)
    no_crash(at)
    assert [t.label for t in at.text_input] == ["Access token"] and not at.metric and not at.selectbox
    assert "topk" not in body(at)  # no run name, no page
    at.text_input[0].input("wrong")
    at.button[0].click().run()
    assert "Wrong access token" in body(at) and not at.metric
    at.text_input[0].input(TOKEN)
    at.button[0].click().run()
    no_crash(at)
    assert at.metric and at.selectbox(key="run_picker").value == "matching_pursuit"  # in: the first run's Overview


def test_the_token_in_the_link_opens_the_session_and_leaves_the_address(tiny_runs, open_app, monkeypatch):
    monkeypatch.setenv(access.TOKEN_ENV, TOKEN)
    at = open_app(tiny_runs["topk"], FEATURES, feature=3, token=TOKEN + "x")
    assert "wrong" in body(at) and not at.title[0].value.startswith("Feature")
    at = open_app(tiny_runs["topk"], FEATURES, feature=3, token=TOKEN)
    no_crash(at)
    assert at.title[0].value == "Feature #3" and "token" not in at.query_params
    at.switch_page("views/dark_matter.py").run()  # once per session: other pages need nothing more
    assert at.title[0].value == "Dark matter"


def test_loopback_without_a_token_stays_open(tiny_runs, open_app, monkeypatch):
    monkeypatch.delenv(access.TOKEN_ENV, raising=False)
    at = open_app(tiny_runs["topk"])
    no_crash(at)
    assert at.title[0].value == "Overview" and not at.text_input


def test_token_comparison():
    assert access.token_matches(TOKEN, TOKEN) and not access.token_matches(TOKEN[:-1], TOKEN)
    assert not access.token_matches("", TOKEN) and access.token_matches("é", "é")


@pytest.fixture(scope="module")
def uncompared(tiny_runs, tmp_path_factory):
    """Two runs that can be compared and are not yet."""
    root = tmp_path_factory.mktemp("uncompared")
    for name in ("one", "two"):
        shutil.copytree(tiny_runs["topk"], root / name)
    return root


@pytest.mark.parametrize("read_only", [False, True])
def test_read_only_turns_off_the_buttons_that_write_into_runs(tiny_runs, uncompared, open_app, monkeypatch, read_only):
    monkeypatch.setenv(access.READ_ONLY_ENV, "1" if read_only else "")
    monkeypatch.setenv("SAESCOPE_EXPLAINER", "demo")  # configured: the feature page offers to explain (nothing loads)
    at = open_app(tiny_runs["topk"], FEATURES, feature=3)
    no_crash(at)
    (explain,) = [b for b in at.button if b.key == "explain_now_3"]
    assert explain.disabled == read_only
    assert ("read-only" in " ".join(c.value for c in at.caption)) == read_only
    at = open_app(uncompared, COMPARE, a="one", b="two")
    no_crash(at)
    (compare,) = [b for b in at.button if b.label == "Compare now"]
    assert compare.disabled == read_only
    assert ("read-only" in " ".join(c.value for c in at.caption)) == read_only
    assert not (uncompared / "one" / "compare").exists()


@pytest.fixture(scope="module")
def hostile_runs(tiny_runs, tmp_path_factory):
    """A directory of runs: one named with markup, whose manifest names its model, SAE, hook and corpus with markup."""
    root = tmp_path_factory.mktemp("hostile")
    run = root / HOSTILE.replace("/", "|")
    shutil.copytree(tiny_runs["topk"], run)
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["model"].update(name=HOSTILE, path=HOSTILE, dtype=HOSTILE, hash=HOSTILE)
    manifest["sae"].update(architecture=HOSTILE, hook=HOSTILE)
    manifest["corpus"]["name"] = HOSTILE
    (run / "manifest.json").write_text(json.dumps(manifest))
    shutil.copytree(tiny_runs["topk"], root / "plain")
    return root, run


def test_run_names_and_manifest_fields_are_escaped(hostile_runs, open_app):
    root, run = hostile_runs
    at = open_app(root, None, run=run.name)
    no_crash(at)
    text = body(at)
    assert render.code(run) in text  # the run's path, whole, in one code span
    assert text.count(render.code(HOSTILE)) == 3 and text.count(render.md(HOSTILE)) == 3  # model, hook, corpus; the rest
    assert "*b*" not in text.replace(render.code(HOSTILE), "").replace(render.code(run), "")  # no bare markup
    at = open_app(root, COMPARE)
    no_crash(at)
    assert render.code(run.name) in body(at) and render.code(HOSTILE) in body(at)  # not comparable: named as it is
    at = open_app(root, FEATURES, run=run.name, feature=3)  # the heads panel names the hook it does not apply to
    no_crash(at)
    assert f"this SAE reads {render.code(HOSTILE)}." in body(at)
    at = open_app(root, "views/lens.py", run=run.name)  # a model that cannot load, named in the error
    no_crash(at)
    assert f"Could not load the model {render.code(HOSTILE)}: " in body(at)


def test_url_parameters_are_escaped(tiny_runs, open_app):
    at = open_app(tiny_runs["topk"], FEATURES, feature=HOSTILE)
    assert render.code(HOSTILE) in " ".join(e.value for e in at.error)
    at = open_app(tiny_runs["topk"], STEER, mode=HOSTILE)
    no_crash(at)
    (warning,) = at.warning
    assert render.md(repr(HOSTILE)) in warning.value and "*b*" not in warning.value
