"""Runs that survive what goes wrong: a snapshot that cannot be written, NaN or infinite values, a run replaced by
one of another SAE (its explanations set aside), a run browsed from another directory (paths resolved,
fingerprints checked)."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from engine.precompute import runwriter
from engine.precompute.pipeline import precompute
from engine.run import loaded, rundir
from engine.saes import build_sae, load_sae
from tests.engine.runs_util import write_corpus
from tests.engine.saes_util import random_sae

OPTIONS = {"context_len": 16, "batch_size": 4, "tokens": 16 * 32, "progress": False}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "c.jsonl", n_docs=20)


def sae(seed: int = 0):
    return random_sae("topk", d_in=64, seed=seed, hook="blocks.1.hook_resid_post")


def tables(run: Path) -> dict:
    return {n: pq.read_table(run / n).to_pylist() for n in ("features.parquet", "examples.parquet", "contexts.parquet")}


def test_a_failed_snapshot_is_logged_and_the_pass_goes_on(tiny_llama, corpus, tmp_path, monkeypatch, capsys):
    options = {**OPTIONS, "tokens": None, "sample_contexts": 4, "ce_every": 1}
    reference = precompute(tiny_llama, sae(), corpus, tmp_path / "ref", **options)
    real = runwriter.RunWriter._write
    calls = []

    def disk_full_once(self, state, folder, *, final, timings):
        calls.append(final)
        if not final and len(calls) == 1:  # the first snapshot: the disk is full
            (folder / "features.parquet").write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, state, folder, final=final, timings=timings)

    monkeypatch.setattr(runwriter.RunWriter, "_write", disk_full_once)
    monkeypatch.setattr(runwriter, "SNAPSHOT_MIN_REMAINING", 0.0)
    monkeypatch.setattr(runwriter, "SNAPSHOT_COST_FACTOR", 0.0)
    manifest = precompute(tiny_llama, sae(), corpus, tmp_path / "run", snapshot_tokens=128, **options)
    assert "a snapshot failed (OSError: [Errno 28] No space left on device)" in capsys.readouterr().err
    assert calls.count(False) >= 2 and manifest["timings"]["snapshots_failed"] == 1
    assert tables(tmp_path / "run") == tables(tmp_path / "ref")
    assert manifest["metrics"] == reference["metrics"] and reference["timings"]["snapshots_failed"] == 0
    assert not (tmp_path / "run" / ".snapshots").exists()


def test_nan_weights_and_nan_activations_stop_at_once(tiny_llama, corpus, tmp_path):
    good = sae()
    state = {k: v.clone() for k, v in good.state_dict().items()}
    state["W_enc"][3, 7] = float("nan")
    with pytest.raises(ValueError, match=r"tensor W_enc of the topk SAE holds 1 NaN or infinite value\(s\)"):
        build_sae(good.cfg, state)
    bad = sae()
    with torch.no_grad():
        bad.W_dec[0, 0] = float("inf")
    with pytest.raises(ValueError, match="the SAE's W_dec holds NaN or infinite values"):
        precompute(tiny_llama, bad, corpus, tmp_path / "w", **OPTIONS)
    layer = tiny_llama.model.model.layers[0]

    def overflow(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden[1, 5] = float("inf")  # the second context of each batch (attention spreads it to every position)

    handle = layer.register_forward_hook(overflow)
    try:
        with pytest.raises(ValueError, match="batch of contexts 0-3, first at context 1 position 0"):
            precompute(tiny_llama, sae(), corpus, tmp_path / "a", **OPTIONS)
    finally:
        handle.remove()
    assert not (tmp_path / "a" / "manifest.json").exists()


def test_a_replaced_run_sets_its_explanations_aside(tiny_llama, corpus, tmp_path):
    run = tmp_path / "run"
    precompute(tiny_llama, sae(0), corpus, run, **OPTIONS)
    (run / "explanations.parquet").write_bytes(b"explanations of the old latents")
    (run / ".interp").mkdir()
    precompute(tiny_llama, sae(0), corpus, run, force=True, **OPTIONS)  # the same run again: they still apply
    assert (run / "explanations.parquet").is_file()
    old = rundir.read_manifest(run)
    precompute(tiny_llama, sae(1), corpus, run, force=True, **OPTIONS)  # another SAE: they no longer do
    assert not (run / "explanations.parquet").exists() and not (run / ".interp").exists()
    moved = run / "stale" / f"{old['sae']['hash']}-{old['corpus']['hash']}"
    assert (moved / "explanations.parquet").read_bytes() == b"explanations of the old latents"


def test_paths_are_resolved_and_fingerprints_checked(tiny_llama, corpus, tmp_path, monkeypatch):
    from engine.model.tiny import save_tiny_model

    save_tiny_model(tmp_path / "models" / "tiny")
    sae().save(tmp_path / "sae")
    monkeypatch.chdir(tmp_path)
    lm = loaded.load_model("models/tiny", device="cpu", dtype="float32")
    manifest = precompute(lm, load_sae("sae"), corpus, tmp_path / "run", sae_path="sae", **OPTIONS)
    assert manifest["model"]["path"] == str(tmp_path / "models" / "tiny") and manifest["model"]["name"] == "models/tiny"
    assert manifest["sae"]["path"] == str(tmp_path / "sae")
    monkeypatch.chdir(tmp_path / "run")  # as `saescope serve` does: a relative path would now name nothing
    saved = json.loads(Path("manifest.json").read_text())
    assert loaded.load_run_model(saved, "run").name == str(tmp_path / "models" / "tiny")
    assert loaded.load_run_sae(saved, "run").cfg.d_sae == 256
    retrained = sae(5)
    retrained.save(tmp_path / "sae")
    with pytest.raises(loaded.FingerprintMismatch, match="is not the one run was computed with"):
        loaded.load_run_sae(saved, "run")
    with pytest.raises(loaded.FingerprintMismatch, match="is not the one run was computed on"):
        loaded.load_run_model(saved, "run", lm=tiny_llama)
    assert os.getcwd() == str(tmp_path / "run")
