"""Precompute on a transcoder (reads the MLP input, writes the MLP output) against a hand computation on plain
transformers hooks: codes from the MLP's input, explained variance against the true MLP output, CE loss with the
MLP output replaced by the prediction."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from engine.data.activations import stats_mask
from engine.precompute.pipeline import precompute
from engine.saes import load_sae
from engine.saes.transcoders import read_circuit_tracer, write_circuit_tracer
from tests.engine.runs_util import write_corpus
from tests.engine.saes_util import mlp_io, random_transcoder

CTX, BATCH, LAYER = 16, 8, 1


def hand_predict(sae, x):
    """numpy: TopK (or ReLU) codes and the prediction (+ skip)."""
    W_enc, b_enc, W_dec, b_dec = (getattr(sae, n).detach().double().numpy() for n in ("W_enc", "b_enc", "W_dec", "b_dec"))
    pre = x.numpy() @ W_enc + b_enc
    if sae.cfg.k:
        cut = -np.sort(-pre, axis=-1)[..., sae.cfg.k - 1 : sae.cfg.k]
        codes = np.where(pre >= cut, np.maximum(pre, 0), 0.0)
    else:
        codes = np.maximum(pre, 0)
    y = codes @ W_dec + b_dec
    if sae.cfg.architecture == "skip_transcoder":
        y = y + x.numpy() @ sae.W_skip.double().numpy().T
    return codes, y


@pytest.fixture(scope="module", params=["topk_transcoder", "skip_transcoder"])
def run(request, tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("tc-run")
    corpus = write_corpus(root / "corpus.jsonl", n_docs=12)
    sae = random_transcoder(tiny_llama.d_model, request.param, layer=LAYER)
    out = root / "run"
    manifest = precompute(tiny_llama, sae, corpus, out, context_len=CTX, batch_size=BATCH, top_k=5, sample_contexts=4,
                          ce_every=1, progress=False)
    ids = torch.tensor(pq.read_table(out / "contexts.parquet").sort_by("context_id").column("token_ids").to_pylist())
    x, y = mlp_io(tiny_llama, ids, LAYER)
    codes, y_hat = hand_predict(sae, x)
    mask = stats_mask(ids, tiny_llama.special_token_ids).numpy()
    return {"out": out, "sae": sae, "manifest": manifest, "ids": ids, "x": x, "y": y.numpy(), "codes": codes,
            "y_hat": y_hat, "mask": mask}


def test_manifest_records_both_hooks(run):
    sae = json.loads((run["out"] / "manifest.json").read_text())["sae"]
    assert (sae["hook"], sae["hook_in"], sae["hook_out"], sae["transcoder"]) == (
        f"blocks.{LAYER}.ln2.hook_normalized", f"blocks.{LAYER}.ln2.hook_normalized", f"blocks.{LAYER}.hook_mlp_out", True)


def test_stats_are_the_input_hooks_codes(run):
    codes = np.where(run["mask"][..., None], run["codes"], 0.0)
    features = pq.read_table(run["out"] / "features.parquet").sort_by("feature_id").to_pandas()
    np.testing.assert_array_equal(features["fire_count"], (codes > 0).sum((0, 1)))
    np.testing.assert_allclose(features["max_act"], codes.max((0, 1)), rtol=1e-4, atol=1e-5)


def test_explained_variance_is_against_the_true_mlp_output(run):
    m = run["mask"]
    y, y_hat = run["y"][m], run["y_hat"][m]
    ev = 1 - ((y - y_hat) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()
    assert run["manifest"]["metrics"]["explained_variance"] == pytest.approx(ev, rel=1e-4, abs=1e-4)


def test_ce_is_with_the_mlp_output_replaced(run, tiny_llama):
    rows = pq.read_table(run["out"] / "tokens.parquet").to_pandas()
    mlp = tiny_llama.model.model.layers[LAYER].mlp
    for context_id, group in rows.groupby("context_id"):
        ids = run["ids"][int(context_id)][None]
        keep = torch.from_numpy(run["mask"][int(context_id)])[None, :, None]
        pred = torch.from_numpy(run["y_hat"][int(context_id)])[None].float()

        def replace(module, args, out, keep=keep, pred=pred):
            return torch.where(keep, pred, out)

        def zero(module, args, out, keep=keep):
            return torch.where(keep, torch.zeros_like(out), out)

        losses = {}
        for name, fn in (("ce_sae", replace), ("zero", zero), ("ce_clean", None)):
            handle = mlp.register_forward_hook(fn) if fn is not None else None
            try:
                with torch.no_grad():
                    logp = tiny_llama.model(ids).logits[0, :-1].log_softmax(-1)
            finally:
                if handle is not None:
                    handle.remove()
            losses[name] = -logp[torch.arange(CTX - 1), ids[0, 1:]]
        scored = group[group["position"] < CTX - 1]
        pos = torch.from_numpy(scored["position"].to_numpy().astype(np.int64))
        np.testing.assert_allclose(scored["ce_clean"], losses["ce_clean"][pos].numpy(), atol=1e-4)
        np.testing.assert_allclose(scored["ce_sae"], losses["ce_sae"][pos].numpy(), atol=1e-4)
        assert not np.allclose(losses["ce_sae"].numpy(), losses["ce_clean"].numpy(), atol=1e-5)


def test_error_rows_are_the_output_side_error(run):
    rows = pq.read_table(run["out"] / "tokens.parquet").to_pandas()
    for r in rows.itertuples():
        want = np.linalg.norm(run["y"][r.context_id, r.position] - run["y_hat"][r.context_id, r.position])
        assert r.err_norm == pytest.approx(want, rel=1e-3, abs=1e-5)


def test_a_circuit_tracer_file_loads_as_the_same_transcoder(run, tmp_path):
    from engine.saes.transcoders import Transcoder

    sae = run["sae"]
    if sae.cfg.architecture != "topk_transcoder":
        pytest.skip("one format check is enough")
    tc = Transcoder(sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, sae.hook_in, sae.hook_out, k=sae.cfg.k)
    path = write_circuit_tracer(tc, tmp_path)
    loaded = load_sae(path)
    assert (loaded.hook_in, loaded.hook_out, loaded.cfg.architecture) == (sae.hook_in, sae.hook_out, "topk_transcoder")
    x = run["x"][0].float()
    torch.testing.assert_close(loaded(x).x_hat, sae(x).x_hat)
    assert read_circuit_tracer(path).k == sae.cfg.k


@pytest.mark.slow
def test_demo_transcoder_run_agrees_with_its_training_report(tmp_path):
    """``precompute`` of the demo's layer-5 transcoder on the held-out contexts its training report was evaluated on
    (32 of 128 tokens, float32): the explained variance of the MLP output is the report's, computed by another
    code path (train-transcoders' evaluator); the run opens as a browsable run of 768 latents."""
    from engine.assets import data_dir
    from engine.model.demo import demo_model_dir
    from engine.model.loading import load_model
    from engine.run.store import RunStore

    folder = data_dir() / "demo_transcoders"
    if not demo_model_dir().is_dir():
        pytest.skip("the demo model is not downloaded")
    lm = load_model(demo_model_dir(), device="cpu", dtype="float32")
    sae = load_sae(folder / "layer_5")
    manifest = precompute(lm, sae, data_dir() / "corpus" / "heldout.jsonl.xz", tmp_path / "run", context_len=128,
                          tokens=32 * 128, sample_contexts=1, progress=False, sae_path=folder / "layer_5")
    report = json.loads((folder / "training_report.json").read_text())["heldout"]["layers"]["5"]
    assert manifest["metrics"]["explained_variance"] == pytest.approx(report["explained_variance"], abs=2e-3)
    assert manifest["sae"]["hook_out"] == "blocks.5.hook_mlp_out" and manifest["metrics"]["l0"] == pytest.approx(32, abs=0.01)
    with RunStore.open(tmp_path / "run") as store:
        assert len(store.densities()) == 768
