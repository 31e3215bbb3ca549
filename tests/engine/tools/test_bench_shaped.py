"""The shaped synthetic run (scripts/gpu_check.sh's Gemma-2-2B-shaped run) at toy shapes on a CPU, and on CUDA."""

from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from engine.tools.bench_shaped import GEMMA2_2B, shaped_model, shaped_run, token_corpus

TOY = {"vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
       "head_dim": 16, "intermediate_size": 128}


def test_token_corpus_is_whole_contexts_of_valid_ids(tmp_path):
    path = token_corpus(tmp_path / "t.parquet", 1000, 512, 64)
    ids = np.array(pq.read_table(path).column("input_ids").to_pylist())
    assert ids.shape == (1000 // 64, 64) and ids.min() >= 1 and ids.max() < 512


def test_shaped_model_has_the_asked_shapes():
    lm = shaped_model(TOY, torch.device("cpu"), torch.float32)
    cfg: Any = lm.model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.head_dim, cfg.vocab_size) == (64, 2, 16, 512)
    assert lm.unembed_matrix().shape == (512, 64)
    assert GEMMA2_2B["hidden_size"] == 2304 and GEMMA2_2B["num_hidden_layers"] == 26  # Gemma-2-2B's config.json


def test_shaped_run_on_cpu_counts_its_tokens(tmp_path):
    out = shaped_run(shapes=TOY, d_sae=128, k=4, tokens=2048, context_len=64, batch_size=8, device="cpu",
                     dtype="float32", work_dir=tmp_path)
    assert out["tokens"] == 2048 and out["device"] == "cpu"
    assert out["precompute_tokens_per_s"] == pytest.approx(2048 / out["precompute_seconds"])
    assert out["forward_seconds"] == pytest.approx(sum(out["forward_seconds_before_after"]) / 2)
    assert out["hook"] == "blocks.1.hook_resid_post"


@pytest.mark.cuda
def test_shaped_run_on_cuda(tmp_path):
    out = shaped_run(shapes=TOY, d_sae=256, k=8, tokens=4096, context_len=64, batch_size=16, device="cuda", work_dir=tmp_path)
    assert out["dtype"] in ("bfloat16", "float16") and out["gpu_peak_mb"] > 0
