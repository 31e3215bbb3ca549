"""Precompute on a CUDA device, in one process and as a 2-task sharded job on a local Ray instance (``num_gpus=1``
per task), against the same run on the CPU (run by scripts/gpu_check.sh; skipped with the reason where torch sees
no CUDA device)."""

from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from engine.model.loading import load_model
from engine.model.tiny import save_tiny_model
from engine.precompute.distributed import precompute_sharded
from engine.precompute.pipeline import precompute
from engine.saes import load_sae
from tests.engine.runs_util import write_corpus
from tests.engine.saes_util import random_sae

pytestmark = pytest.mark.cuda
OPTS: dict[str, Any] = {"context_len": 16, "batch_size": 8, "top_k": 5, "sample_contexts": 6, "ce_every": 1}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuda")
    model = save_tiny_model(root / "model")
    corpus = write_corpus(root / "corpus.jsonl", n_docs=30)
    random_sae("topk", seed=0, d_sae=256).save(root / "sae")
    lm = load_model(model, device="cpu", dtype="float32")
    cpu = precompute(lm, load_sae(root / "sae"), corpus, root / "cpu", progress=False, **OPTS)
    return root, model, corpus, cpu


def _same_statistics(a_dir, b_dir) -> None:
    a = pq.read_table(a_dir / "features.parquet").sort_by("feature_id").to_pydict()
    b = pq.read_table(b_dir / "features.parquet").sort_by("feature_id").to_pydict()
    fire_a, fire_b = np.array(a["fire_count"]), np.array(b["fire_count"])
    assert fire_a.sum() > 0
    # a TopK choice can flip on a near tie between devices' float sums: allow a few counts, not a different run
    assert np.abs(fire_a - fire_b).sum() <= 0.01 * fire_a.sum()
    assert np.allclose(a["max_act"], b["max_act"], rtol=1e-3, atol=1e-3)
    same = [x == y for x, y in zip(a["neighbor_ids"], b["neighbor_ids"], strict=True)]
    assert np.mean(same) >= 0.99


def test_precompute_on_cuda_equals_cpu(setup):
    root, model, corpus, cpu = setup
    lm = load_model(model, device="cuda", dtype="float32")
    manifest = precompute(lm, load_sae(root / "sae", device=lm.device), corpus, root / "gpu", progress=False, **OPTS)
    assert manifest["model"]["device"].startswith("cuda")
    assert manifest["corpus"]["n_tokens"] == cpu["corpus"]["n_tokens"]
    _same_statistics(root / "cpu", root / "gpu")


def test_two_task_sharded_run_on_one_gpu(setup):
    pytest.importorskip("ray", reason="pip install 'saescope[ray]'")
    root, model, corpus, cpu = setup
    manifest = precompute_sharded(str(model), str(root / "sae"), corpus, root / "sharded", shards=2, device="cuda",
                                  dtype="float32", progress=False, **OPTS)
    assert manifest is not None and manifest["corpus"]["n_tokens"] == cpu["corpus"]["n_tokens"]
    assert manifest["model"]["device"].startswith("cuda")
    _same_statistics(root / "cpu", root / "sharded")
