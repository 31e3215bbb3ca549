"""Precompute on a tiny model, checked against brute force; refusals, bad inputs and a SIGKILLed run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from engine.precompute.pipeline import precompute
from engine.precompute.sampling import HELDOUT_EVERY
from tests.engine.runs_util import brute_force, top_contexts, write_corpus
from tests.engine.saes_util import random_sae

CTX, BATCH, TOP_K = 16, 8, 5
DEAD = [0, 1, 2]


def _sae(seed=0, hook="blocks.0.hook_resid_post"):
    sae = random_sae("standard", seed=seed, hook=hook)
    with torch.no_grad():
        sae.b_enc[DEAD] = -100.0  # never fires: must be listed as dead, not dropped
    return sae


@pytest.fixture(scope="module")
def run(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("precompute")
    corpus = write_corpus(root / "corpus.jsonl", n_docs=30)
    sae = _sae()
    out = root / "run"
    manifest = precompute(tiny_llama, sae, corpus, out, context_len=CTX, batch_size=BATCH, top_k=TOP_K,
                          sample_contexts=6, ce_every=1, progress=False)
    ref = brute_force(tiny_llama, sae, out, BATCH)
    features = pq.read_table(out / "features.parquet").to_pylist()
    examples = pq.read_table(out / "examples.parquet").to_pylist()
    return {"out": out, "corpus": corpus, "sae": sae, "manifest": manifest, "ref": ref, "features": features,
            "examples": examples}


def test_schema_contract_names(run):
    out = run["out"]
    assert {"feature_id", "fire_count", "density", "max_act", "mean_act"} <= set(pq.read_schema(out / "features.parquet").names)
    assert {"feature_id", "kind", "rank", "context_id", "acts"} <= set(pq.read_schema(out / "examples.parquet").names)
    assert {"context_id", "token_ids"} <= set(pq.read_schema(out / "contexts.parquet").names)
    manifest = json.loads((out / "manifest.json").read_text())
    for key in ("l0", "explained_variance", "ce_loss_recovered", "n_tokens"):
        assert isinstance(manifest["metrics"][key], (int, float)), key
    assert manifest["model"]["hash"] and manifest["sae"]["hash"] and manifest["corpus"]["hash"]
    assert not (out / ".partial").exists()


def test_feature_statistics_match_brute_force(run):
    ref, rows = run["ref"], run["features"]
    assert [r["feature_id"] for r in rows] == list(range(len(rows)))
    assert run["manifest"]["metrics"]["n_tokens"] == ref["n_tokens"]
    np.testing.assert_array_equal([r["fire_count"] for r in rows], ref["fire_count"])
    np.testing.assert_allclose([r["density"] for r in rows], ref["fire_count"] / ref["n_tokens"])
    np.testing.assert_array_equal(np.array([r["max_act"] for r in rows], np.float32), ref["max_act"])
    codes = ref["codes"].reshape(-1, ref["codes"].shape[-1])
    for r in rows[:40]:
        fired = codes[:, r["feature_id"]][codes[:, r["feature_id"]] > 0]
        assert r["mean_act"] == pytest.approx(float(fired.mean()) if len(fired) else 0.0, rel=1e-5)
    assert run["manifest"]["metrics"]["explained_variance"] == pytest.approx(ref["explained_variance"], rel=1e-6)


def test_histograms_count_every_firing_token(run):
    codes = run["ref"]["codes"].reshape(-1, run["ref"]["codes"].shape[-1])
    for r in run["features"]:
        acts = codes[:, r["feature_id"]]
        acts = acts[acts > 0]
        if not len(acts):
            assert r["hist_counts"] == []
            continue
        counts, _ = np.histogram(acts, bins=np.array(r["hist_edges"], np.float32))
        np.testing.assert_array_equal(counts, r["hist_counts"])
        assert r["hist_edges"][0] == 0 and r["hist_edges"][-1] >= r["max_act"]


def test_top_examples_are_exact(run):
    ref, examples = run["ref"], run["examples"]
    by_feature = {}
    for e in examples:
        by_feature.setdefault(e["feature_id"], []).append(e)
    for latent in range(ref["codes"].shape[-1]):
        top = [e for e in by_feature.get(latent, []) if e["kind"] == "top"]
        assert [e["context_id"] for e in top] == top_contexts(ref["context_max"], latent, TOP_K)
        assert [e["rank"] for e in top] == list(range(len(top)))
        for e in top:
            want = ref["codes"][e["context_id"], :, latent]
            assert e["start"] == 0 and len(e["acts"]) == CTX
            np.testing.assert_allclose(e["acts"], want, rtol=1e-3, atol=1e-7)
            assert e["max_act"] == pytest.approx(float(want.max()), rel=1e-6)
            assert e["max_pos"] == int(want.argmax())


def test_quantile_examples_span_the_range(run):
    ref, bins = run["ref"], 10
    seen_low = 0
    for latent in range(ref["codes"].shape[-1]):
        quantile = [e for e in run["examples"] if e["feature_id"] == latent and e["kind"] == "quantile"]
        peak = float(ref["max_act"][latent])
        if peak == 0:
            assert not quantile
            continue
        counts = np.zeros(bins, int)
        for e in quantile:
            value = float(ref["context_max"][e["context_id"], latent])
            assert e["max_act"] == pytest.approx(value, rel=1e-6)
            assert e["quantile_bin"] == min(int(value / peak * bins), bins - 1)
            counts[e["quantile_bin"]] += 1
        assert counts.max() <= 5
        assert counts[-1] >= 1  # the interval holding the maximum is never empty
        seen_low += int(counts[: bins // 2].sum() > 0)
    assert seen_low > 50  # most latents show examples from the lower half of their range, not only the top


def test_excluded_tokens_count_nowhere(run, tiny_llama):
    ref = run["ref"]
    ids = ref["ids"]
    special = list(tiny_llama.special_token_ids)
    for e in run["examples"]:
        acts = np.array(e["acts"])
        assert acts[0] == 0
        assert not acts[np.isin(ids[e["context_id"]], special)].any()
    tokens = pq.read_table(run["out"] / "tokens.parquet").to_pylist()
    assert tokens and all(t["position"] > 0 and t["token_id"] not in special for t in tokens)
    assert all(t["context_id"] % HELDOUT_EVERY == 0 for t in tokens)


def test_include_flags_count_every_token(tiny_llama, tmp_path, run):
    m = precompute(tiny_llama, run["sae"], run["corpus"], tmp_path / "all", context_len=CTX, batch_size=BATCH,
                   include_special=True, include_first=True, tokens=CTX * 12, progress=False)
    assert m["metrics"]["n_tokens"] == 12 * CTX == m["corpus"]["n_tokens"]


def test_dead_latents_are_listed(run):
    assert run["manifest"]["dead_latents"][: len(DEAD)] == DEAD
    rows = {r["feature_id"]: r for r in run["features"]}
    assert all(rows[i]["dead"] and rows[i]["fire_count"] == 0 for i in DEAD)
    assert not any(e["feature_id"] in DEAD for e in run["examples"])
    assert run["manifest"]["metrics"]["n_dead"] == sum(r["dead"] for r in run["features"])


def test_linear_error_map_matches_numpy_least_squares(run):
    ref, sae = run["ref"], run["sae"]
    # x and e on statistic tokens, split by context like precompute
    from engine.model.tiny import tiny_model

    lm = tiny_model("llama")
    ids = torch.tensor(ref["ids"])
    x = torch.cat([lm.capture(ids[i : i + BATCH], sae.cfg.hook_name)[sae.cfg.hook_name] for i in range(0, len(ids), BATCH)])
    err = sae(x).error
    mask = torch.tensor(ref["mask"])
    held = (torch.arange(len(ids)) % HELDOUT_EVERY == 0)[:, None].expand_as(mask)
    X, E = x[mask].double().numpy(), err[mask].double().numpy()
    h = held[mask].numpy()
    A = np.hstack([X, np.ones((len(X), 1))])
    coef, *_ = np.linalg.lstsq(A[~h], E[~h], rcond=None)
    pred = A[h] @ coef
    r2 = 1 - ((E[h] - pred) ** 2).sum() / ((E[h] - E[h].mean(0)) ** 2).sum()
    norms = np.linalg.norm(E, axis=1)
    ncoef, *_ = np.linalg.lstsq(A[~h], norms[~h], rcond=None)
    nr2 = 1 - ((norms[h] - A[h] @ ncoef) ** 2).sum() / ((norms[h] - norms[h].mean()) ** 2).sum()
    dark = run["manifest"]["dark_matter"]
    assert dark["heldout_error_r2"] == pytest.approx(r2, abs=2e-3)
    assert dark["heldout_norm_r2"] == pytest.approx(nr2, abs=2e-3)
    saved = load_file(str(run["out"] / "dark_matter.safetensors"))
    fitted = X[h] @ saved["W"].double().numpy() + saved["b"].double().numpy()
    np.testing.assert_allclose(fitted, pred, atol=2e-3 * np.abs(pred).max())


def test_per_token_rows_split_the_error(run):
    rows = pq.read_table(run["out"] / "tokens.parquet").to_pylist()
    assert len({r["context_id"] for r in rows}) == 6
    for r in rows:
        assert r["err_linear_norm"] >= 0 and r["err_nonlinear_norm"] >= 0
        assert r["err_nonlinear_norm"] <= r["err_norm"] + r["err_linear_norm"] + 1e-5
        if r["position"] < CTX - 1:
            assert r["ce_delta"] == pytest.approx(r["ce_sae"] - r["ce_clean"], abs=1e-5)
        else:
            assert r["ce_clean"] is None
    metrics = run["manifest"]["metrics"]
    assert metrics["ce_loss_clean"] > 0 and "kl_div" in metrics and "ce_loss_zero_ablation" in metrics


def test_ce_rows_match_plain_forwards(run, tiny_llama):
    """The per-token losses (scored from the stored activations through the layers after the hook only) equal
    a plain transformers forward, and one with the SAE's reconstruction put in by hand at counted positions."""
    rows = pq.read_table(run["out"] / "tokens.parquet").to_pandas()
    contexts = pq.read_table(run["out"] / "contexts.parquet").to_pandas().set_index("context_id")
    model, sae, hook = tiny_llama.model, run["sae"], run["sae"].cfg.hook_name
    layer = model.model.layers[int(hook.split(".")[1])]
    for context_id, group in rows.groupby("context_id"):
        ids = torch.tensor(np.asarray(contexts.loc[context_id, "token_ids"]), dtype=torch.long)[None]
        counted = torch.zeros(ids.shape[1], dtype=torch.bool)
        counted[torch.from_numpy(group["position"].to_numpy().astype(np.int64))] = True

        def splice(module, args, output, counted=counted):
            x = output[0] if isinstance(output, tuple) else output
            new = torch.where(counted[None, :, None], sae(x).x_hat.to(x.dtype), x)
            return (new, *output[1:]) if isinstance(output, tuple) else new

        with torch.no_grad():
            clean = model(ids).logits[0, :-1].log_softmax(-1)
            handle = layer.register_forward_hook(splice)
            try:
                spliced = model(ids).logits[0, :-1].log_softmax(-1)
            finally:
                handle.remove()
        target = ids[0, 1:]
        ce_clean = -clean[torch.arange(len(target)), target]
        ce_sae = -spliced[torch.arange(len(target)), target]
        scored = group[group["position"] < ids.shape[1] - 1]
        pos = torch.from_numpy(scored["position"].to_numpy().astype(np.int64))
        np.testing.assert_allclose(scored["ce_clean"], ce_clean[pos].numpy(), atol=1e-4)
        np.testing.assert_allclose(scored["ce_sae"], ce_sae[pos].numpy(), atol=1e-4)


def test_refuses_a_run_of_another_sae_unless_forced(tiny_llama, run, tmp_path):
    kw = dict(context_len=CTX, batch_size=BATCH, tokens=CTX * 4, progress=False)
    out = tmp_path / "r"
    precompute(tiny_llama, run["sae"], run["corpus"], out, **kw)
    precompute(tiny_llama, run["sae"], run["corpus"], out, **kw)  # same model and SAE: rerun allowed
    other = _sae(seed=1)
    with pytest.raises(FileExistsError, match="--force"):
        precompute(tiny_llama, other, run["corpus"], out, **kw)
    from engine.model.tiny import tiny_model

    with pytest.raises(FileExistsError, match="holds a run of model"):
        precompute(tiny_model("llama", seed=1), run["sae"], run["corpus"], out, **kw)
    assert (out / "manifest.json").is_file()  # the refused call touched nothing
    m = precompute(tiny_llama, other, run["corpus"], out, force=True, **kw)
    assert json.loads((out / "manifest.json").read_text())["sae"]["hash"] == m["sae"]["hash"]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a saescope run"):
        precompute(tiny_llama, other, run["corpus"], foreign, **kw)


def test_bad_inputs_fail_fast(tiny_llama, run, tmp_path):
    start = time.perf_counter()
    with pytest.raises(ValueError, match="unknown hook point 'blocks.7.hook_resid_post'"):
        precompute(tiny_llama, _sae(hook="blocks.7.hook_resid_post"), run["corpus"], tmp_path / "a", progress=False)
    short = write_corpus(tmp_path / "short.jsonl", n_docs=1)
    with pytest.raises(ValueError, match="shorter than one context of 250 tokens"):
        precompute(tiny_llama, run["sae"], short, tmp_path / "b", context_len=250, progress=False)
    with pytest.raises(ValueError, match="exceeds the model's maximum of 256"):
        precompute(tiny_llama, run["sae"], run["corpus"], tmp_path / "c", context_len=1000, progress=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        precompute(tiny_llama, run["sae"], tmp_path / "missing.txt", tmp_path / "d", progress=False)
    assert time.perf_counter() - start < 5
    assert not any((tmp_path / name).exists() for name in "abcd")


CHILD = """
import sys, time
from pathlib import Path
import engine.precompute.pipeline  # noqa: F401  (engine.precompute is also the function's name)
from engine.model.tiny import tiny_model
from engine.saes import load_sae

P = sys.modules["engine.precompute.pipeline"]
flag = Path(sys.argv[4])
real = P.iter_activations
def slow(*args, **kwargs):
    for i, batch in enumerate(real(*args, **kwargs)):
        if i == 2:
            flag.touch()
        time.sleep(0.2)
        yield batch
P.iter_activations = slow
P.precompute(tiny_model("llama"), load_sae(sys.argv[1]), sys.argv[2], sys.argv[3], context_len=16, batch_size=4, progress=False)
"""


def test_sigkill_leaves_no_manifest_and_rerun_completes(tiny_llama, run, tmp_path):
    sae_dir = run["sae"].save(tmp_path / "sae")
    out, flag = tmp_path / "killed", tmp_path / "started"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[3])}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(sae_dir), str(run["corpus"]), str(out), str(flag)], env=env)
    try:
        deadline = time.time() + 60
        while not flag.exists():
            assert child.poll() is None, "child exited before it was killed"
            assert time.time() < deadline
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
    assert (out / ".partial").is_dir() and not (out / "manifest.json").exists()
    m = precompute(tiny_llama, run["sae"], run["corpus"], out, context_len=16, batch_size=4, progress=False)
    assert (out / "manifest.json").is_file() and not (out / ".partial").exists()
    assert m["corpus"]["n_contexts"] == run["manifest"]["corpus"]["n_contexts"]


def test_cli_precompute(tmp_path, run, capsys):
    from engine.cli import main
    from engine.model.tiny import save_tiny_model

    model = save_tiny_model(tmp_path / "model")
    sae = run["sae"].save(tmp_path / "sae")
    base = ["precompute", "--model", str(model), "--sae", str(sae), "--corpus", str(run["corpus"]), "--dtype", "float32"]
    assert main([*base, "--out", str(tmp_path / "run"), "--context-len", "16", "--tokens", "160"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_tokens"] > 0 and (tmp_path / "run" / "manifest.json").is_file()
    assert main([*base, "--out", str(tmp_path / "bad"), "--context-len", "4096"]) == 2
    err = capsys.readouterr().err
    assert "saescope precompute: error: context length 4096 exceeds" in err and "Traceback" not in err
    assert main([*base, "--out", str(tmp_path / "bad"), "--tokens", "10", "--context-len", "16"]) == 2
    assert "at least one context" in capsys.readouterr().err


def test_no_ce_sample_still_writes_every_metric_key(tiny_llama, run, tmp_path):
    m = precompute(tiny_llama, run["sae"], run["corpus"], tmp_path / "r", context_len=CTX, batch_size=BATCH,
                   tokens=CTX * 8, sample_contexts=0, progress=False)
    saved = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert saved["metrics"]["ce_loss_recovered"] is None and m["metrics"]["n_tokens"] > 0
    assert pq.read_table(tmp_path / "r" / "tokens.parquet").num_rows == 0


@pytest.mark.parametrize("architecture", ["standard", "topk", "jumprelu", "gated", "matching_pursuit"])
def test_every_architecture(tiny_llama, run, tmp_path, architecture):
    extra = {"max_iterations": 8} if architecture == "matching_pursuit" else {}
    sae = random_sae(architecture, **extra)
    m = precompute(tiny_llama, sae, run["corpus"], tmp_path / "r", context_len=CTX, batch_size=BATCH,
                   tokens=CTX * 24, sample_contexts=2, progress=False)
    rows = pq.read_table(tmp_path / "r" / "features.parquet").to_pylist()
    assert len(rows) == sae.cfg.d_sae and m["sae"]["architecture"] == architecture
    assert m["metrics"]["l0"] == pytest.approx(sum(r["fire_count"] for r in rows) / m["metrics"]["n_tokens"])


def test_paper_positions_restrict_the_paper_fit_to_those_positions(tiny_llama, run, tmp_path):
    """``paper_positions`` reaches the pass: the paper-style ``||e||^2`` fit, against numpy on the tokens at those
    positions, split by a hash of (context, position)."""
    from engine.precompute.darkmatter import token_split

    lo, hi = 2, 9
    out = tmp_path / "run"
    manifest = precompute(tiny_llama, run["sae"], run["corpus"], out, context_len=CTX, batch_size=BATCH, top_k=TOP_K,
                          sample_contexts=0, paper_positions=f"{lo}:{hi}", snapshot_tokens=0, progress=False)
    ref, sae = run["ref"], run["sae"]
    ids = torch.tensor(ref["ids"])
    x = torch.cat([tiny_llama.capture(ids[i : i + BATCH], sae.cfg.hook_name)[sae.cfg.hook_name]
                   for i in range(0, len(ids), BATCH)])
    err = sae(x).error
    ctx = torch.arange(len(ids))[:, None].expand(len(ids), CTX)
    pos = torch.arange(CTX)[None].expand(len(ids), CTX)
    keep = torch.tensor(ref["mask"]) & (pos >= lo) & (pos <= hi)
    held = token_split(ctx[keep], pos[keep]).numpy()
    X = x[keep].double().numpy()
    sq = err[keep].double().pow(2).sum(-1).numpy()
    w, *_ = np.linalg.lstsq(X[~held], sq[~held], rcond=None)
    r2 = 1 - ((sq[held] - X[held] @ w) ** 2).sum() / ((sq[held] - sq[held].mean()) ** 2).sum()
    dark = manifest["dark_matter"]
    assert dark["paper_positions"] == [lo, hi] and manifest["settings"]["paper_positions"] == f"{lo}:{hi}"
    assert dark["paper_n_train_tokens"] == (~held).sum() and dark["paper_n_heldout_tokens"] == held.sum()
    assert dark["paper_heldout_norm_sq_r2"] == pytest.approx(r2, abs=2e-3)


def test_example_windows_are_the_whole_contexts_slices(tiny_llama, run, tmp_path):
    """``example_window`` keeps each example's window around its maximum: the same examples as whole contexts, each
    the slice of the whole run's activations at its ``start``; the store hands out the window's tokens."""
    from engine.run.store import RunStore

    window = 6
    m = precompute(tiny_llama, run["sae"], run["corpus"], tmp_path / "w", context_len=CTX, batch_size=BATCH,
                   top_k=TOP_K, sample_contexts=6, ce_every=1, example_window=window, progress=False)
    assert m["corpus"]["example_window"] == window and run["manifest"]["corpus"]["example_window"] == CTX
    got = pq.read_table(tmp_path / "w" / "examples.parquet").to_pylist()
    assert len(got) == len(run["examples"]) > 0
    before = window - window // 4 - 1
    for whole, win in zip(run["examples"], got, strict=True):
        for name in ("feature_id", "kind", "rank", "context_id", "max_pos", "max_act"):
            assert whole[name] == win[name], name
        start = min(max(whole["max_pos"] - before, 0), CTX - window)
        assert win["start"] == start and len(win["acts"]) == window
        np.testing.assert_array_equal(win["acts"], whole["acts"][start:start + window])
    with RunStore.open(tmp_path / "w") as store, RunStore.open(run["out"]) as ref:
        latent = got[0]["feature_id"]
        e, w = ref.examples(latent)[0], store.examples(latent)[0]
        assert w.token_ids == e.token_ids[w.start:w.start + window] and w.tokens == e.tokens[w.start:w.start + window]
