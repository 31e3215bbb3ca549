"""CE loss clean / with the SAE spliced in / zero-ablated, CE loss recovered and KL, recomputed by hand.

Nothing here calls the engine to get a reference: the model is run as a plain ``transformers`` module, the SAE's
reconstruction is computed from its weight tensors with the TopK formula, it is put in place by a plain torch
forward hook on the Hugging Face module of the hook point, and log-softmax, cross-entropy and KL are written out
in float64. The results are compared with ``engine.analysis.metrics.ce_metrics`` and with what a real
``precompute`` writes (manifest metrics, ``tokens.parquet`` per-token losses).

Which positions count (docs/run-format.md, "Which tokens count"; engine/precompute/activations.py): a position
counts unless it is position 0 of its context, or its token is a special token (here the tokenizer's only
special token, ``<|endoftext|>``, id 0: BOS = EOS = PAD), or its activation at the hook is massive: norm
``>= 10 x`` the median norm over the counted (not first, not special) positions of its batch of ``batch_size``
contexts. The SAE's reconstruction replaces the activation (and zero ablation zeroes it) at counted positions only;
every other position keeps its clean activation. A prediction (of token ``p + 1``, made at position ``p``) counts
when position ``p`` counts; its target may be any token. The CE metrics are means over counted predictions of the
CE sample: with ``ce_every=1`` and a reservoir larger than the held-out contexts, that is every held-out context
(id % 10 == 0).

To make the massive-activation rule matter, one token's input embedding is scaled by 100 (the LM head is untied
first, so the logits keep their scale): at ``blocks.0.hook_resid_post`` and ``blocks.1.hook_resid_pre`` its
activation norm is far above 10x the median, and the test checks that including it would change the metrics.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from engine.analysis.metrics import ce_metrics
from engine.data.corpus import iter_contexts
from engine.model.tiny import tiny_model
from engine.precompute.pipeline import precompute
from engine.saes import SAEConfig, build_sae
from tests.engine.runs_util import write_corpus

CTX, BATCH, N_CONTEXTS, K = 24, 8, 60, 8
TRAIN_STEPS = 40
D_SAE = 256
SPECIAL = 0  # <|endoftext|>
MASSIVE_WORD = " word"
HOOKS = ("blocks.0.hook_resid_post", "blocks.1.hook_resid_pre", "blocks.0.hook_mlp_out")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("ce") / "corpus.jsonl", n_docs=30, seed=1)


@pytest.fixture(scope="module")
def lm(corpus):
    """A tiny llama trained for a few steps on the corpus (a random one predicts every token about equally badly,
    clean or ablated, which leaves CE loss recovered a ratio of two near-zero differences), then altered."""
    lm = tiny_model("llama", seed=3)
    hf = lm.hf_model
    contexts = torch.tensor(list(iter_contexts(lm.tokenizer, corpus, CTX)))
    gen = torch.Generator().manual_seed(0)
    hf.train().requires_grad_(True)
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-2)
    for _ in range(TRAIN_STEPS):
        batch = contexts[torch.randint(0, len(contexts), (16,), generator=gen)]
        loss = hf(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    hf.eval().requires_grad_(False)
    assert hf.lm_head.weight is hf.model.embed_tokens.weight  # tied: untie before touching the embedding
    hf.lm_head.weight = torch.nn.Parameter(hf.lm_head.weight.detach().clone(), requires_grad=False)
    (word,) = lm.tokenizer(MASSIVE_WORD, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        hf.model.embed_tokens.weight[word] *= 100.0
    assert lm.special_token_ids == {SPECIAL}
    return lm


def _weights(acts: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
    """A TopK SAE whose dictionary is ``D_SAE`` centred activations (unit rows): a crude but working SAE."""
    gen = torch.Generator().manual_seed(seed)
    b_dec = acts.mean(0)
    W_dec = acts[torch.randperm(len(acts), generator=gen)[:D_SAE]] - b_dec
    W_dec /= W_dec.norm(dim=-1, keepdim=True)
    # codes are projections on K non-orthogonal atoms: scaled down so that they do not overshoot much
    return {"W_dec": W_dec, "W_enc": 0.3 * W_dec.T.contiguous(), "b_enc": torch.zeros(D_SAE), "b_dec": b_dec}


def _hand_reconstruction(x: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
    """TopK SAE with b_dec subtracted from the input: relu of the k largest pre-activations, decoded densely."""
    pre = (x.float() - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    values, indices = pre.topk(K, dim=-1)
    codes = torch.zeros_like(pre).scatter(-1, indices, values.relu())
    return codes @ w["W_dec"] + w["b_dec"]


def _hf_module(lm, hook: str) -> tuple[torch.nn.Module, bool]:
    """The Hugging Face module at ``hook`` and whether the hook point is its input (True) or output."""
    _, layer, kind = hook.split(".")
    block = lm.hf_model.model.layers[int(layer)]
    return {"hook_resid_post": (block, False), "hook_resid_pre": (block, True), "hook_mlp_out": (block.mlp, False)}[kind]


class HandHook:
    """A plain torch hook that records the activation at the hook point and optionally replaces it."""

    def __init__(self, lm, hook: str):
        self.module, self.reads_input = _hf_module(lm, hook)
        self.replace: Callable[[torch.Tensor], torch.Tensor] | None = None  # activation -> its replacement
        self.seen: torch.Tensor | None = None

    def _swap(self, act: torch.Tensor) -> torch.Tensor | None:
        self.seen = act.detach().clone()
        return None if self.replace is None else self.replace(act).to(act.dtype)

    def __enter__(self):
        if self.reads_input:

            def pre(module, args, kwargs):
                hidden = args[0] if args else kwargs["hidden_states"]
                new = self._swap(hidden)
                if new is None:
                    return None
                return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new})

            self.handle = self.module.register_forward_pre_hook(pre, with_kwargs=True)
        else:

            def post(module, args, output):
                hidden = output[0] if isinstance(output, tuple) else output
                new = self._swap(hidden)
                if new is None:
                    return None
                return (new, *output[1:]) if isinstance(output, tuple) else new

            self.handle = self.module.register_forward_hook(post)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _log_softmax64(logits: torch.Tensor) -> torch.Tensor:
    z = logits.double()
    z = z - z.max(dim=-1, keepdim=True).values
    return z - z.exp().sum(-1, keepdim=True).log()


def _capture(lm, hook: str, ids: torch.Tensor) -> torch.Tensor:
    """Clean activations at ``hook`` ``[n, pos, d]`` from plain forwards."""
    with HandHook(lm, hook) as hh, torch.no_grad():
        lm.hf_model(input_ids=ids)
    assert hh.seen is not None
    return hh.seen


def _counted(lm, hook: str, ids: torch.Tensor, include_massive: bool = False) -> tuple[torch.Tensor, int]:
    """The counting rule of the module docstring, batch by batch; returns the mask and the massive tokens dropped."""
    masks, n_massive = [], 0
    for start in range(0, len(ids), BATCH):
        batch = ids[start : start + BATCH]
        norms = _capture(lm, hook, batch).double().norm(dim=-1)
        mask = batch != SPECIAL
        mask[:, 0] = False
        if not include_massive:
            massive = mask & (norms >= 10 * norms[mask].median())
            n_massive += int(massive.sum())
            mask &= ~massive
        masks.append(mask)
    return torch.cat(masks), n_massive


def _hand_ce(lm, hook: str, w: dict, ids: torch.Tensor, mask: torch.Tensor) -> dict:
    """Per-prediction losses and KL ``[n, ctx-1]`` (float64) and their means over counted predictions."""
    out = {k: [] for k in ("clean", "sae", "zero", "kl", "kl_zero")}
    for row in range(len(ids)):
        one, keep = ids[row : row + 1], mask[row : row + 1, :, None]
        logp = {}
        with HandHook(lm, hook) as hh, torch.no_grad():
            logp["clean"] = _log_softmax64(lm.hf_model(input_ids=one).logits[0, :-1])
            hh.replace = lambda a, keep=keep: torch.where(keep, _hand_reconstruction(a, w), a.float())
            logp["sae"] = _log_softmax64(lm.hf_model(input_ids=one).logits[0, :-1])
            hh.replace = lambda a, keep=keep: torch.where(keep, torch.zeros_like(a), a)
            logp["zero"] = _log_softmax64(lm.hf_model(input_ids=one).logits[0, :-1])
        target = one[0, 1:, None]
        for key in ("clean", "sae", "zero"):
            out[key].append(-logp[key].gather(-1, target)[:, 0])
        out["kl"].append((logp["clean"].exp() * (logp["clean"] - logp["sae"])).sum(-1))
        out["kl_zero"].append((logp["clean"].exp() * (logp["clean"] - logp["zero"])).sum(-1))
    rows = {k: torch.stack(v) for k, v in out.items()}
    pred = mask[:, :-1]
    means = {k: float(v[pred].mean()) for k, v in rows.items()}
    clean, sae, zero = means["clean"], means["sae"], means["zero"]
    increase = (rows["sae"] - rows["clean"])[pred]
    return {
        "rows": rows,
        "pred": pred,
        "ce_loss_clean": clean,
        "ce_loss_with_sae": sae,
        "ce_loss_zero_ablation": zero,
        "ce_loss_recovered": (zero - sae) / (zero - clean),
        "kl_div": means["kl"],
        "n_predictions": int(pred.sum()),
        "ce_loss_increase": float(increase.mean()),
        "ce_loss_increase_ci95": 1.96 * float(increase.std(unbiased=True)) / len(increase) ** 0.5,
        "kl_div_with_ablation": means["kl_zero"],
        "kl_score": 1 - means["kl"] / means["kl_zero"],
    }


METRICS = ("ce_loss_clean", "ce_loss_with_sae", "ce_loss_zero_ablation", "ce_loss_recovered", "kl_div",
           "ce_loss_increase", "ce_loss_increase_ci95", "kl_div_with_ablation", "kl_score")


@pytest.fixture(scope="module", params=HOOKS)
def case(request, lm, corpus, tmp_path_factory):
    hook = request.param
    train = torch.tensor(list(iter_contexts(lm.tokenizer, corpus, CTX))[N_CONTEXTS : N_CONTEXTS + 32])
    train_mask, _ = _counted(lm, hook, train)
    w = _weights(_capture(lm, hook, train)[train_mask].float())
    sae = build_sae(SAEConfig(architecture="topk", d_in=lm.d_model, d_sae=D_SAE, k=K, hook_name=hook), dict(w))
    out = tmp_path_factory.mktemp("run") / "run"
    manifest = precompute(lm, sae, corpus, out, context_len=CTX, batch_size=BATCH, tokens=N_CONTEXTS * CTX,
                          sample_contexts=32, ce_every=1, progress=False)
    ids = torch.tensor(pq.read_table(out / "contexts.parquet").sort_by("context_id").column("token_ids").to_pylist())
    assert ids.shape == (N_CONTEXTS, CTX)
    mask, n_massive = _counted(lm, hook, ids)
    heldout = torch.arange(N_CONTEXTS)[torch.arange(N_CONTEXTS) % 10 == 0]
    hand = _hand_ce(lm, hook, w, ids[heldout], mask[heldout])
    return {"hook": hook, "sae": sae, "w": w, "out": out, "manifest": manifest, "ids": ids, "mask": mask,
            "n_massive": n_massive, "heldout": heldout, "hand": hand}


def test_the_counting_rule_is_exercised(case):
    """The run's statistic-token count is the rule's; massive tokens exist where the embedding was scaled."""
    mask = case["mask"]
    assert case["manifest"]["metrics"]["n_tokens"] == int(mask.sum())
    assert (case["ids"] == SPECIAL).any() and not mask[:, 0].any()
    if "mlp_out" in case["hook"]:
        assert case["n_massive"] == 0
    else:
        assert case["n_massive"] >= 5, case["n_massive"]


def test_ce_metrics_match_the_hand_computation(case, lm):
    got = ce_metrics(lm, case["sae"], case["ids"][case["heldout"]], case["mask"][case["heldout"]])
    hand = case["hand"]
    assert got.n_predictions == hand["n_predictions"]
    for key in METRICS:
        assert getattr(got, key) == pytest.approx(hand[key], rel=1e-5, abs=1e-6), key
    # sanity of the setting itself: ablation hurts, the SAE sits in between, KL is positive
    assert hand["ce_loss_zero_ablation"] > hand["ce_loss_clean"] and hand["kl_div"] > 0


def test_precompute_manifest_ce_metrics_match_the_hand_computation(case, lm):
    metrics, hand = case["manifest"]["metrics"], case["hand"]
    assert metrics["n_predictions"] == hand["n_predictions"]
    for key in METRICS:
        assert metrics[key] == pytest.approx(hand[key], rel=1e-5, abs=1e-6), key
    # the training report's computation (ce_metrics) on the same contexts and tokens records the same CE keys
    report = ce_metrics(lm, case["sae"], case["ids"][case["heldout"]], case["mask"][case["heldout"]]).to_dict(extended=True)
    assert set(report) <= set(metrics)
    for key, value in report.items():
        assert metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    if case["n_massive"]:
        # the rule matters: counting the massive tokens gives other metrics than the run's
        loose, _ = _counted(lm, case["hook"], case["ids"], include_massive=True)
        other = _hand_ce(lm, case["hook"], case["w"], case["ids"][case["heldout"]], loose[case["heldout"]])
        assert other["n_predictions"] > hand["n_predictions"]
        assert max(abs(other[k] - metrics[k]) / max(abs(metrics[k]), 1e-3) for k in METRICS) > 1e-3


def test_precompute_tokens_rows_match_the_hand_computation(case):
    """tokens.parquet: one row per counted token of every held-out context, with the hand-computed losses."""
    rows = pq.read_table(case["out"] / "tokens.parquet").to_pandas()
    hand, mask, ids = case["hand"], case["mask"], case["ids"]
    assert sorted(rows["context_id"].unique()) == case["heldout"].tolist()
    for i, context_id in enumerate(case["heldout"].tolist()):
        group = rows[rows["context_id"] == context_id].sort_values("position")
        positions = group["position"].to_numpy().astype(np.int64)
        np.testing.assert_array_equal(positions, np.nonzero(mask[context_id].numpy())[0])
        np.testing.assert_array_equal(group["token_id"].to_numpy(), ids[context_id, positions].numpy())
        scored = positions < CTX - 1
        np.testing.assert_allclose(group["ce_clean"].to_numpy()[scored], hand["rows"]["clean"][i, positions[scored]].numpy(),
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(group["ce_sae"].to_numpy()[scored], hand["rows"]["sae"][i, positions[scored]].numpy(),
                                   rtol=1e-5, atol=1e-5)
        delta = hand["rows"]["sae"][i] - hand["rows"]["clean"][i]
        np.testing.assert_allclose(group["ce_delta"].to_numpy()[scored], delta[positions[scored]].numpy(), atol=1e-5)
        assert group["ce_clean"][~scored].isna().all() and group["ce_sae"][~scored].isna().all()



def test_precompute_reconstruction_metrics_match_the_hand_computation(case, lm):
    """Explained variance, MSE, cosine and L0 over the counted tokens of the whole run, by the docs' formulas."""
    x = _capture(lm, case["hook"], case["ids"]).double()[case["mask"]]
    x_hat = _hand_reconstruction(x.float(), case["w"]).double()
    pre = (x.float() - case["w"]["b_dec"]) @ case["w"]["W_enc"] + case["w"]["b_enc"]
    l0 = (pre.topk(K, dim=-1).values > 0).sum(-1).double()
    metrics = case["manifest"]["metrics"]
    ev = 1 - (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert metrics["explained_variance"] == pytest.approx(float(ev), rel=1e-5, abs=1e-6)
    assert metrics["explained_variance_without_massive"] == metrics["explained_variance"]  # the run's default
    # with the massive-activation tokens: every token position 0 and special tokens leave
    loose, _ = _counted(lm, case["hook"], case["ids"], include_massive=True)
    x_all = _capture(lm, case["hook"], case["ids"]).double()[loose]
    x_hat_all = _hand_reconstruction(x_all.float(), case["w"]).double()
    ev_all = 1 - (x_all - x_hat_all).pow(2).sum() / (x_all - x_all.mean(0)).pow(2).sum()
    assert metrics["n_massive_tokens"] == case["n_massive"] == int(loose.sum() - case["mask"].sum())
    assert metrics["explained_variance_with_massive"] == pytest.approx(float(ev_all), rel=1e-5, abs=1e-6)
    if case["n_massive"]:
        assert abs(float(ev_all) - float(ev)) > 1e-3  # the massive tokens move it
    assert metrics["mse"] == pytest.approx(float((x - x_hat).pow(2).sum() / x.numel()), rel=1e-5)
    cos = (x * x_hat).sum(-1) / (x.norm(dim=-1) * x_hat.norm(dim=-1))
    assert metrics["cosine_sim"] == pytest.approx(float(cos.mean()), rel=1e-5)
    assert metrics["l0"] == pytest.approx(float(l0.mean()), rel=1e-9)



def test_precompute_dark_matter_paper_quantities_match_numpy(case, lm):
    """The manifest's ``paper_*`` dark matter: least squares without bias of e and ||e||^2 on x over the run's
    tokens of the random (context, position) split, R^2 per error dimension averaged, recomputed with numpy."""
    from engine.precompute.darkmatter import token_split

    x32 = _capture(lm, case["hook"], case["ids"])[case["mask"]].float()
    e = (x32.double() - _hand_reconstruction(x32, case["w"]).double()).numpy()
    x = x32.double().numpy()
    mask = torch.as_tensor(case["mask"])
    rows, cols = mask.shape
    context = torch.arange(rows)[:, None].expand(rows, cols)[mask]  # contexts are numbered in corpus order
    position = torch.arange(cols)[None].expand(rows, cols)[mask]
    held = token_split(context, position).numpy()
    dm = case["manifest"]["dark_matter"]
    assert dm["paper_n_heldout_tokens"] == held.sum() and dm["paper_n_train_tokens"] == (~held).sum()
    sq = (e**2).sum(1)
    W, *_ = np.linalg.lstsq(x[~held], e[~held], rcond=None)
    w, *_ = np.linalg.lstsq(x[~held], sq[~held], rcond=None)
    r2 = 1 - ((e[held] - x[held] @ W) ** 2).sum(0) / ((e[held] - e[held].mean(0)) ** 2).sum(0)
    r2_sq = 1 - ((sq[held] - x[held] @ w) ** 2).sum() / ((sq[held] - sq[held].mean()) ** 2).sum()
    assert dm["paper_heldout_error_r2_mean_dim"] == pytest.approx(float(r2.mean()), abs=1e-4)
    assert dm["paper_heldout_norm_sq_r2"] == pytest.approx(float(r2_sq), abs=1e-4)
