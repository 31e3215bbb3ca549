import json
import shutil
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from tests.dashboard.tinyrun import build_tiny_run

APP = Path(__file__).resolve().parents[2] / "dashboard" / "app.py"


@pytest.fixture(scope="session", autouse=True)
def _release_cached_resources():
    """Close the run stores the app cached (DuckDB complains about connections still open at exit)."""
    yield
    import streamlit as st

    st.cache_resource.clear()


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory) -> dict[str, Path]:
    """Two precomputed runs of one tiny model: a TopK SAE and a matching-pursuit SAE (under ``<root>/runs``)."""
    root = tmp_path_factory.mktemp("tiny")
    return {"topk": build_tiny_run(root, "topk"), "mp": build_tiny_run(root, "matching_pursuit")}


@pytest.fixture(scope="session")
def tiny_attn_run(tmp_path_factory) -> Path:
    """A precomputed run of a TopK SAE on the tiny model's ``blocks.1.attn.hook_z`` (head attribution included)."""
    root = tmp_path_factory.mktemp("tiny_attn")
    return build_tiny_run(root, "topk", hook="blocks.1.attn.hook_z", name="attn")


@pytest.fixture(scope="session")
def broken_model_run(tiny_runs, tmp_path_factory) -> Path:
    """A copy of the TopK run whose manifest names a model that is not there."""
    run = tmp_path_factory.mktemp("broken") / "run"
    shutil.copytree(tiny_runs["topk"], run)
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["model"]["name"] = manifest["model"]["path"] = str(run / "no-such-model")
    (run / "manifest.json").write_text(json.dumps(manifest))
    return run


@pytest.fixture
def open_app(monkeypatch):
    """``open_app(run_path, page=None, **query)``: an AppTest of the whole app on ``run``, already run once."""

    def make(run_path: Path | None, page: str | None = None, /, **query) -> AppTest:
        if run_path is None:
            monkeypatch.delenv("SAESCOPE_RUN", raising=False)
        else:
            monkeypatch.setenv("SAESCOPE_RUN", str(run_path))
        at = AppTest.from_file(str(APP), default_timeout=120)
        at.query_params.update({k: str(v) for k, v in query.items()})
        at.run()
        if page:
            at.query_params.update({k: str(v) for k, v in query.items()})
            at.switch_page(page).run()
        return at

    return make
