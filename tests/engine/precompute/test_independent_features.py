"""Logit effects, decoder-cosine neighbours and corpus packing, re-derived by brute force.

* Logit effects (docs/run-format.md, features.parquet): each latent's decoder row times the final norm's
  elementwise scale, through the unembedding; the 10 largest and 10 smallest logits. Here: the full dense
  ``[d_sae, vocab]`` matrix in float64 numpy from the Hugging Face module's own tensors (``lm_head.weight``; the
  final norm's scale read off the module itself: an RMSNorm fed an all-ones vector, whose RMS is 1, returns its
  scale, which is ``w`` for Llama and ``1 + w`` for Gemma; GPT-2's LayerNorm scale is its ``weight``, its bias is
  not part of the definition). The final norm's weight is randomised first: a fresh model's is all ones (Gemma:
  zeros, i.e. scale 1), which would hide a missing scale.
* Neighbours: the 10 other latents with the highest cosine between decoder rows, from the full dense cosine
  matrix; the decoder has planted parallel (cosine 1, different norms) and anti-parallel rows.
* Corpus packing: documents read with plain ``json``/``gzip``/``lzma`` (each JSONL line's ``text``, each text
  file whole; files of a directory in sorted path order), each tokenized without special tokens, followed by EOS,
  concatenated, cut into consecutive ``context_len`` windows, the incomplete tail dropped; no BOS anywhere.

Rankings are compared tie-robustly: the engine's values must equal the brute-force sorted values, and the
brute-force values at the engine's ids must equal the engine's values (a near-tie may swap two ids, nothing else).
"""

from __future__ import annotations

import gzip
import json
import lzma
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from engine.data.corpus import iter_contexts
from engine.model.tiny import TINY_TEXT, tiny_model, tiny_tokenizer
from engine.precompute.features import decoder_neighbors, latent_logit_effects, logit_effects
from engine.precompute.pipeline import precompute
from engine.saes import SAEConfig, build_sae
from tests.engine.runs_util import write_corpus

N, D_SAE, CTX, BATCH, N_CONTEXTS = 10, 200, 16, 8, 24
PARALLEL = {5: (7, 3.0), 9: (11, -1.0)}  # row r = factor * row s


def _model(family: str):
    lm = tiny_model(family, seed=11)
    weight = lm.final_norm().weight
    assert isinstance(weight, torch.nn.Parameter)
    with torch.no_grad():
        weight.copy_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(5)) * 0.5 + 1.0)
    return lm


def _sae(lm, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    d = lm.d_model
    W_dec = torch.randn(D_SAE, d, generator=gen) * torch.rand(D_SAE, 1, generator=gen).add(0.2)  # rows of varied norm
    for row, (src, factor) in PARALLEL.items():
        W_dec[row] = factor * W_dec[src]
    state = {"W_dec": W_dec, "W_enc": torch.randn(d, D_SAE, generator=gen) * 0.3,
             "b_enc": torch.zeros(D_SAE), "b_dec": torch.zeros(d)}
    return build_sae(SAEConfig(architecture="topk", d_in=d, d_sae=D_SAE, k=8, hook_name="blocks.0.hook_resid_post"), state)


def _final_scale(lm) -> np.ndarray:
    norm = lm.final_norm()
    if isinstance(norm, torch.nn.LayerNorm):
        return norm.weight.detach().double().numpy()  # LayerNorm: the scale is its weight
    with torch.no_grad():
        return norm(torch.ones(1, lm.d_model)).double().numpy()[0]


def _brute_logits(lm, sae) -> np.ndarray:
    W_U = lm.hf_model.lm_head.weight.detach().double().numpy()
    W_dec = sae.W_dec.detach().double().numpy()
    return (W_dec * _final_scale(lm)) @ W_U.T  # [d_sae, vocab]


def _brute_neighbors(sae) -> np.ndarray:
    W = sae.W_dec.detach().double().numpy()
    unit = W / np.linalg.norm(W, axis=1, keepdims=True)
    cos = unit @ unit.T
    np.fill_diagonal(cos, -np.inf)
    return cos


def _check_ranking(full: np.ndarray, ids, values, *, largest: bool, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """``ids, values [rows, N]`` are each row's N largest (or smallest) entries of ``full``, in order."""
    ids, values = np.asarray(ids, dtype=np.int64), np.asarray(values, dtype=np.float64)
    assert ids.shape == values.shape == (full.shape[0], N)
    ordered = -np.sort(-full, axis=1)[:, :N] if largest else np.sort(full, axis=1)[:, :N]
    np.testing.assert_allclose(values, ordered, rtol=rtol, atol=atol)
    np.testing.assert_allclose(np.take_along_axis(full, ids, axis=1), values, rtol=rtol, atol=atol)
    assert all(len(set(row)) == N for row in ids.tolist())


FAMILIES = ("llama", "gemma", "gpt2")


@pytest.fixture(scope="module", params=FAMILIES)
def case(request, tmp_path_factory):
    lm = _model(request.param)
    sae = _sae(lm)
    root = tmp_path_factory.mktemp(f"features-{request.param}")
    corpus = write_corpus(root / "corpus.jsonl", n_docs=12, seed=2)
    out = root / "run"
    precompute(lm, sae, corpus, out, context_len=CTX, batch_size=BATCH, tokens=N_CONTEXTS * CTX, progress=False)
    features = pq.read_table(out / "features.parquet").sort_by("feature_id").to_pydict()
    return {"family": request.param, "lm": lm, "sae": sae, "corpus": corpus, "out": out, "features": features}


def test_final_norm_scale_is_randomised_and_read_as_documented(case):
    lm, scale = case["lm"], _final_scale(case["lm"])
    weight = torch.as_tensor(lm.final_norm().weight).detach().double().numpy()
    assert np.abs(scale - 1).max() > 0.1  # a missing scale would change the logit effects
    expected = 1 + weight if case["family"] == "gemma" else weight
    np.testing.assert_allclose(scale, expected, rtol=1e-5)


def test_logit_effects_match_the_dense_product(case):
    full = _brute_logits(case["lm"], case["sae"])
    got = logit_effects(case["lm"], case["sae"], n=N)
    _check_ranking(full, got.top_ids, got.top_values, largest=True)
    _check_ranking(full, got.bottom_ids, got.bottom_values, largest=False)
    # without the norm's scale the ranking is another one: the check above can tell
    unscaled = case["sae"].W_dec.double().numpy() @ case["lm"].hf_model.lm_head.weight.double().numpy().T
    assert (np.argsort(-unscaled, axis=1)[:, :N] != got.top_ids).any()


def test_one_latents_logit_effects_on_demand_match_the_dense_product(case):
    full = _brute_logits(case["lm"], case["sae"])
    for latent in (0, D_SAE - 1):
        got = latent_logit_effects(case["lm"], case["sae"], latent, n=N)
        _check_ranking(full[latent : latent + 1], got.top_ids, got.top_values, largest=True)
        _check_ranking(full[latent : latent + 1], got.bottom_ids, got.bottom_values, largest=False)
    with pytest.raises(ValueError, match="out of range"):
        latent_logit_effects(case["lm"], case["sae"], D_SAE, n=N)


def test_features_parquet_logit_effects_match_the_dense_product(case):
    full, f = _brute_logits(case["lm"], case["sae"]), case["features"]
    assert f["feature_id"] == list(range(D_SAE))
    _check_ranking(full, f["top_logit_ids"], f["top_logit_values"], largest=True)
    _check_ranking(full, f["bottom_logit_ids"], f["bottom_logit_values"], largest=False)


def test_neighbors_match_the_dense_cosine_matrix(case):
    cos = _brute_neighbors(case["sae"])
    ids, values = decoder_neighbors(case["sae"], n=N)
    f = case["features"]
    for got_ids, got_cos in ((ids, values), (f["neighbor_ids"], f["neighbor_cos"])):
        got_ids = np.asarray(got_ids)
        _check_ranking(cos, got_ids, got_cos, largest=True)
        assert not (got_ids == np.arange(D_SAE)[:, None]).any()  # never its own neighbour
        # planted pairs: a row 3x another is its nearest neighbour at cosine 1 (both ways); an anti-parallel
        # pair (cosine -1) is not among the nearest
        assert got_ids[5, 0] == 7 and got_ids[7, 0] == 5
        assert np.asarray(got_cos)[5, 0] == pytest.approx(1.0, abs=1e-5)
        assert 11 not in got_ids[9].tolist() and 9 not in got_ids[11].tolist()


def test_contexts_parquet_is_the_packing_rederived(case):
    lm = case["lm"]
    packed = _pack(lm.tokenizer, _documents(case["corpus"]), CTX, lm.tokenizer.eos_token_id)
    table = pq.read_table(case["out"] / "contexts.parquet").sort_by("context_id").to_pydict()
    assert table["context_id"] == list(range(N_CONTEXTS))
    assert table["token_ids"] == packed[:N_CONTEXTS]


# --- corpus packing -------------------------------------------------------------------------------------------------


def _documents(path: Path) -> list[str]:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    docs: list[str] = []
    for file in files:
        opener = gzip.open if file.name.endswith(".gz") else lzma.open if file.name.endswith(".xz") else open
        with opener(file, "rt", encoding="utf-8") as f:
            if ".jsonl" in file.name:
                docs += [json.loads(line)["text"] for line in f if line.strip()]
            else:
                docs.append(f.read())
    return docs


def _pack(tokenizer, docs: list[str], context_len: int, separator: int) -> list[list[int]]:
    stream: list[int] = []
    for doc in docs:
        stream += tokenizer.encode(doc, add_special_tokens=False) + [separator]
    return [stream[i : i + context_len] for i in range(0, len(stream) - context_len + 1, context_len)]


def _bos_tokenizer():
    """The tiny BPE with a separate ``<s>`` BOS that the tokenizer adds by default (``add_special_tokens=True``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=["<|endoftext|>", "<s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TINY_TEXT] * 4, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|endoftext|>", pad_token="<|endoftext|>")


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    """A directory mixing every supported file kind, in an order that sorting changes."""
    root = tmp_path_factory.mktemp("corpus")
    lines = [line for line in TINY_TEXT.splitlines() if line.strip()]
    (root / "b.txt").write_text("\n".join(lines[:3]) + "\n")
    with (root / "a.jsonl").open("w") as f:
        for i, line in enumerate(lines):
            f.write(json.dumps({"text": line, "id": i}) + "\n")
            if i == 1:
                f.write("\n")  # blank lines are no documents
    (root / "sub").mkdir()
    (root / "sub" / "c.txt.gz").write_bytes(gzip.compress(" ".join(reversed(lines)).encode()))
    jsonl = "".join(json.dumps({"text": line.upper()}) + "\n" for line in lines[::-1] * 3)
    (root / "d.jsonl.xz").write_bytes(lzma.compress(jsonl.encode()))
    return root


@pytest.mark.parametrize("context_len", [2, 7, 64])
def test_iter_contexts_is_the_packing_rederived(corpus_dir, context_len):
    tok = _bos_tokenizer()
    bos, eos = int(tok.bos_token_id), int(tok.eos_token_id)  # pyright: ignore[reportArgumentType]
    assert bos != eos and tok("x")["input_ids"][0] == bos  # the tokenizer would add a BOS if asked
    docs = _documents(corpus_dir)
    assert len(docs) == 1 + len([ln for ln in TINY_TEXT.splitlines() if ln.strip()]) * 4 + 1
    expected = _pack(tok, docs, context_len, eos)
    got = list(iter_contexts(tok, corpus_dir, context_len))
    assert got == expected and len(got) >= 3
    assert all(len(c) == context_len for c in got)
    assert not any(bos in c for c in got)  # no BOS is inserted
    # every document is followed by exactly one EOS: one per document in the stream the windows cover
    covered = sum(context_len for _ in got)
    stream = [t for c in got for t in c]
    assert stream.count(eos) == sum(1 for pos in np.cumsum([len(tok.encode(d, add_special_tokens=False)) + 1 for d in docs])
                                    if pos <= covered)


def test_iter_contexts_separator_and_short_tail(corpus_dir, tmp_path):
    tok = tiny_tokenizer()
    docs = _documents(corpus_dir)
    sep = 7
    assert list(iter_contexts(tok, corpus_dir, 32, separator_id=sep)) == _pack(tok, docs, 32, sep)
    # a corpus shorter than one context yields nothing; exactly one context yields it
    one = tmp_path / "one.txt"
    one.write_text("a b")
    n = len(tok.encode("a b", add_special_tokens=False)) + 1
    assert list(iter_contexts(tok, one, n + 1)) == []
    assert list(iter_contexts(tok, one, n)) == [tok.encode("a b", add_special_tokens=False) + [tok.eos_token_id]]


def _sae_with_decoder(W_dec: torch.Tensor):
    from tests.engine.saes_util import random_sae

    sae = random_sae("topk", d_in=W_dec.shape[1], d_sae=W_dec.shape[0])
    sae.W_dec.data = W_dec.float()
    return sae


@pytest.mark.parametrize("kind", ["random", "near_ties"])
def test_bf16_candidate_search_gives_the_fp32_neighbours(kind):
    """bf16 candidates ranked in fp32 (with the margin check) equal the dense fp32 ranking: on random directions,
    and on directions whose cosines crowd within bf16's error (where the check must send rows back to fp32)."""
    gen = torch.Generator().manual_seed(3)
    if kind == "random":
        W = torch.randn(3000, 48, generator=gen)
    else:  # one shared direction plus noise: cosines crowd within bf16's error yet differ in fp32 (without the
        # margin check this case fails: the bf16 candidates miss true neighbours)
        W = torch.randn(1, 48, generator=gen) + 0.05 * torch.randn(600, 48, generator=gen)
    sae = _sae_with_decoder(W)
    cos = _brute_neighbors(sae)
    ids, values = decoder_neighbors(sae, n=N, chunk=256, search_dtype=torch.bfloat16)
    _check_ranking(cos, ids, values, largest=True, rtol=1e-6, atol=2e-7)
    plain_ids, _ = decoder_neighbors(sae, n=N, chunk=256)
    agree = (ids == plain_ids).mean()
    assert agree > 0.99, agree  # same ids as the fp32 search (ties aside)
