"""``saescope compare`` on two tiny runs of different widths (one model, one hook), checked against independent
computations: pair correlations against numpy's corrcoef, co-firing and matches against brute force, planted
splits found, and the refusals."""

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from engine.cli import main
from engine.data.activations import MASSIVE_FACTOR, stats_mask
from engine.eval import files, schema
from engine.eval.compare import CompareConfig, compare_runs
from engine.eval.pairstats import PairStats
from engine.eval.sample import sample_contexts
from engine.eval.splitting import SplitCriteria, children, split_parents
from engine.model.loading import load_model
from engine.run.store import RunStore
from engine.saes import load_sae
from tests.engine.eval_util import build_width_runs

TOKENS = 2048


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return build_width_runs(tmp_path_factory.mktemp("widths"))


@pytest.fixture(scope="module")
def lm(runs):
    return load_model(runs["model"], device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def compared(runs, lm):
    (folder,) = compare_runs([runs["wide"], runs["narrow"]], cfg=CompareConfig(tokens=TOKENS), lm=lm)
    return folder


def test_pair_stats_match_corrcoef_and_brute_force_counts():
    gen = torch.Generator().manual_seed(0)
    a = torch.relu(torch.randn(300, 12, generator=gen) - 0.8)
    b = torch.relu(torch.randn(300, 20, generator=gen) - 0.8)
    b[:, 3] = a[:, 2] * 2 + torch.relu(torch.randn(300, generator=gen)) * (a[:, 2] > 0)  # correlated with a[:, 2]
    a[:, 7] = 0  # never fires: correlation undefined
    pa, pb = np.array([2, 0, 5, 7, 11]), np.array([3, 19, 5, 1, 0])
    stats = PairStats(pa, pb, 12, 20, chunk=2)
    for start in range(0, 300, 70):  # several batches, chunks of pairs
        stats.update(a[start : start + 70], b[start : start + 70])
    res = stats.result()
    an, bn = a.double().numpy(), b.double().numpy()
    for p, (i, j) in enumerate(zip(pa, pb, strict=True)):
        if i == 7:
            assert np.isnan(res.corr[p])
        else:
            assert res.corr[p] == pytest.approx(np.corrcoef(an[:, i], bn[:, j])[0, 1], abs=1e-9)
        assert res.n_both[p] == int(((an[:, i] > 0) & (bn[:, j] > 0)).sum())
    np.testing.assert_array_equal(res.fires_a, (an > 0).sum(0))
    np.testing.assert_array_equal(res.fires_b, (bn > 0).sum(0))
    assert res.n_tokens == 300 and res.corr[0] > 0.5


def test_split_rule_needs_cosine_cofiring_and_two_children():
    # candidate pairs (all with cosine >= split_cos): parent 0 has 3 candidates, parent 1 one, parent 2 two
    a_ids = np.array([0, 0, 0, 1, 2, 2])
    n_both = np.array([9, 8, 1, 10, 6, 3])
    fires_parent = np.array([40, 40, 40, 12, 30, 30])
    fires_child = np.array([10, 9, 20, 10, 6, 4])
    child = children(n_both, fires_parent, fires_child, SplitCriteria(cofire=0.5, min_fires=5))
    # P(parent | child) = .9, .89, .05, 1.0, 1.0, .75 but the last child fired only 4 times
    np.testing.assert_array_equal(child, [True, True, False, True, True, False])
    assert split_parents(a_ids, child) == {0: 2}  # parent 1 and 2 have a single child: a match, not a split


def brute_sample(lm, sae_a, sae_b, contexts, batch_size=16):
    """Codes of both SAEs on the sample's counted tokens, with the mask computed here."""
    codes_a, codes_b = [], []
    ids = torch.tensor(contexts)
    for start in range(0, len(ids), batch_size):
        batch = ids[start : start + batch_size]
        x = lm.capture(batch, sae_a.cfg.hook_name)[sae_a.cfg.hook_name].float()
        mask = stats_mask(batch, lm.special_token_ids)
        norms = x.norm(dim=-1)
        mask &= norms < MASSIVE_FACTOR * norms[mask].median()
        codes_a.append(sae_a(x[mask]).codes.float())
        codes_b.append(sae_b(x[mask]).codes.float())
    return torch.cat(codes_a).double().numpy(), torch.cat(codes_b).double().numpy()


def test_compare_writes_matches_correlations_and_splits(runs, lm, compared):
    assert compared == runs["narrow"] / "compare" / "wide"  # the narrower run holds it, whatever the order given
    info = json.loads((compared / schema.COMPARISON).read_text())
    assert info["a"]["d_sae"] == 64 and info["b"]["d_sae"] == 256 and info["assignment"]["method"] == "lsa"
    sae_a, sae_b = load_sae(runs["model"].parent / "sae_narrow"), load_sae(runs["model"].parent / "sae_wide")
    matches = pq.read_table(compared / schema.MATCHES).to_pandas()
    wa = sae_a.W_dec.double().numpy()
    wb = sae_b.W_dec.double().numpy()
    cos = (wa / np.linalg.norm(wa, axis=1, keepdims=True)) @ (wb / np.linalg.norm(wb, axis=1, keepdims=True)).T
    np.testing.assert_array_equal(matches["best_b"], cos.argmax(1))
    np.testing.assert_allclose(matches["best_cos"], cos.max(1), atol=1e-5)
    partners = matches["partner_b"].dropna().astype(int)
    assert partners.is_unique and len(partners) == 64

    with RunStore.open(runs["narrow"]) as store:
        contexts = sample_contexts(store, TOKENS)
    ca, cb = brute_sample(lm, sae_a, sae_b, contexts)
    assert info["sample"]["n_tokens"] == len(ca)
    np.testing.assert_array_equal(matches["a_fires"], (ca > 0).sum(0))
    for row in matches.head(20).itertuples():
        if row.a_fires and (cb[:, row.partner_b] > 0).any():
            want = np.corrcoef(ca[:, row.a_id], cb[:, int(row.partner_b)])[0, 1]
            assert row.partner_corr == pytest.approx(want, abs=1e-4)

    pairs = pq.read_table(compared / schema.PAIRS).to_pandas()
    for row in pairs.itertuples():
        assert row.n_both == int(((ca[:, row.a_id] > 0) & (cb[:, row.b_id] > 0)).sum())
    # the wide SAE holds two perturbed copies of each of the narrow one's first 8 latents: each is split in two
    split = matches[matches["n_children"] >= 2]
    assert set(split["a_id"]) >= set(range(8)) and info["summary"]["n_split"] == len(split)
    kids = pairs[pairs["child"] & (pairs["a_id"] < 8)]
    assert sorted(zip(kids["a_id"], kids["b_id"], strict=True)) == [(i, j) for i in range(8) for j in (2 * i, 2 * i + 1)]


def test_comparison_reader_and_lookup(runs, compared):
    found = files.find_comparison(runs["wide"], runs["narrow"])
    assert found == (compared, True)
    comp = files.Comparison(compared)
    assert comp.match(3)["a_id"] == 3 and comp.match(999) is None
    kids = comp.children(0).to_pylist()
    assert [k["b_id"] for k in kids[:2]] in ([0, 1], [1, 0]) and all(k["child"] for k in kids[:2])


def test_compare_refuses_runs_of_other_hooks_or_models(runs, lm, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(runs["wide"], other, ignore=shutil.ignore_patterns("compare"))
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["sae"]["hook"] = "blocks.1.hook_resid_post"
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="not SAEs on the same model and hook point"):
        compare_runs([runs["narrow"], other], lm=lm)
    manifest["sae"]["hook"], manifest["model"]["hash"] = "blocks.0.hook_resid_post", "0123456789abcdef"
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="not SAEs on the same model"):
        compare_runs([runs["narrow"], other], lm=lm)
    with pytest.raises(ValueError, match="two runs or more"):
        compare_runs([runs["narrow"]], lm=lm)


def test_compare_command_and_its_errors(runs, tmp_path, capsys):
    assert main(["compare", str(runs["narrow"]), str(runs["wide"]), "--tokens", "256", "--out", str(tmp_path),
                 "--dtype", "float32", "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report[0]["folder"] == str(tmp_path / "narrow--wide") and report[0]["n_split"] >= 0
    assert (tmp_path / "narrow--wide" / schema.COMPARISON).is_file()
    assert main(["compare", str(runs["narrow"]), str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "saescope compare: error:" in err and "does not exist" in err
