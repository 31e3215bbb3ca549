"""``saescope explain`` on a transcoder run: its latents are explained and scored, and the contexts it takes as
non-activating come from the transcoder's encoder on its input hook (checked by a hand encode of the MLP input)."""

import numpy as np
import pyarrow.parquet as pq
import torch

from engine.interp import parts, schema
from engine.interp.explain import ExplainConfig, explain_run
from tests.engine.interp_util import ScriptedChat
from tests.engine.runs_util import write_corpus
from tests.engine.saes_util import mlp_io, random_transcoder


def test_explain_a_transcoder_run(tmp_path):
    from engine.model.loading import load_model
    from engine.model.tiny import save_tiny_model
    from engine.precompute.pipeline import precompute
    from engine.saes import load_sae

    lm = load_model(save_tiny_model(tmp_path / "model"), device="cpu", dtype="float32")
    sae_dir = random_transcoder(lm.d_model, layer=1).save(tmp_path / "tc")
    run = tmp_path / "run"
    precompute(lm, load_sae(sae_dir), write_corpus(tmp_path / "corpus.jsonl", n_docs=16), run, context_len=32,
               sae_path=sae_dir, progress=False)
    features = [0, 1, 2]
    explain_run(run, ScriptedChat(), cfg=ExplainConfig(features=",".join(map(str, features)), scorers=("detection",),
                                                       batch_size=4, n_shown=4, n_heldout=4, pool_contexts=8),
                progress=False)
    ex = parts.read_all(run, schema.EXPLANATIONS)
    assert sorted(ex["feature_id"].to_pylist()) == features

    with np.load(run / schema.INTERP_DIR / "pool.npz") as pool:
        ids, ctx_len, latents, where = pool["ids"], int(pool["ctx_len"]), pool["latents"], pool["where"]
    table = pq.read_table(run / "contexts.parquet").to_pandas().set_index("context_id")
    tokens = torch.tensor(np.stack([table.loc[int(i), "token_ids"] for i in ids]), dtype=torch.long)
    x, _ = mlp_io(lm, tokens, 1)
    sae = load_sae(sae_dir)
    pre = x @ sae.W_enc.double() + sae.b_enc.double()
    codes = torch.where(pre >= pre.topk(sae.cfg.k, dim=-1).values[..., -1:], pre.clamp_min(0), 0.0)
    codes[:, 0] = 0  # position 0 is not counted
    for f in features:
        hand = set(torch.nonzero(codes[..., f].flatten() > 0).flatten().tolist())
        assert set(where[latents == f].tolist()) == hand
    assert ctx_len == 32
