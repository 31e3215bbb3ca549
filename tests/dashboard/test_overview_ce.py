"""The Overview's CE cards: the loss increase in nats beside the ratio."""

import pytest

from dashboard.render import fmt
from engine.run.store import RunStore

from .test_pages import metric, no_crash


@pytest.fixture(scope="module")
def store(tiny_runs):
    with RunStore.open(tiny_runs["topk"]) as s:
        yield s


def test_overview_shows_the_ce_loss_increase_beside_the_ratio(tiny_runs, open_app, store):
    at = open_app(tiny_runs["topk"])
    no_crash(at)
    m = store.manifest()["metrics"]
    assert metric(at, "CE loss increase") == f"{fmt(m['ce_loss_with_sae'] - m['ce_loss_clean'])} nats"
    assert metric(at, "CE loss recovered") == fmt(m["ce_loss_recovered"])
