"""Feature absorption on the first-letter task, as SAEBench defines it (``sae_bench/evals/absorption``; Chanin et
al. 2024, "A is for Absorption").

Data: the model's own vocabulary. Every token that is letters only (one leading space allowed) is a word; a
sample of ``words`` of them is split 80/20 into train and test words. Each word gets a prompt of ``icl_examples``
in-context examples and itself, ``"\\n{ex} has the first letter: {X}" ... "\\n{word} has the first letter:"``,
built from token ids (so the word is one token at a known position: SAEBench reads position -6 of the same
text), and the activation at the hook is read at the word.

1. A linear probe per letter (one-vs-rest logistic regression, positives weighted by negatives/positives) on the
   train words' activations: the ground truth. SAEBench trains one 26-way probe with Adam, weight decay 1e-4 on a
   BCE averaged over samples *and the 26 letters*; per letter that is an L2 of ``26 * 1e-4`` per sample, which
   ``probe_l2`` is (solved exactly here, where SAEBench runs 50 Adam epochs).
2. k-sparse probing of the SAE: one L1-regularised 26-way probe on the train words' latents (Adam, L1 0.01, as
   SAEBench) for as many steps as SAEBench's 50 epochs of 4096-word batches take over the model's *whole*
   letter vocabulary (``l1_steps``), whether or not ``words`` subsamples it, the learning rate decaying once per
   such epoch; per letter and k = 1..``max_k``, its k largest-weight latents get a class-balanced
   logistic regression; F1 on the test words. The letter's *main latents* are those of the last k whose F1
   beat the previous best by more than ``f1_jump`` (0.03): more than one is feature splitting.
3. Letters whose probe has test F1 > ``min_probe_f1`` (0.6) are evaluated, if there are ``min_letters`` (20) of
   them. For each test word of the letter that the probe gets right, with a fresh prompt: the probe projection
   ``p = x . u`` (``u`` the probe's unit direction), each latent's projection ``a_i * cos(u, W_dec[i])``;
   *absorption fraction*: 0 if the main latents' projection is at least ``p`` or the top three other latents
   with cosine >= 0.1 and positive projection explain less than 40% of ``p``; 1 if the main latents'
   projection is <= 0; otherwise the absorbed share ``min(others, p - main) / (that + main)``. *Full
   absorption*: no main latent fires, the top-projecting latent has cosine >= 0.025 and explains >= 40% of
   ``p > 0``. Per letter both are averaged over its correct test words; the scores average the letters, and their
   spread over letters is reported as SAEBench does (``std_dev_*``: the sample standard deviation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from ..analysis.interventions import compute_copy
from ..model.loading import LoadedModel
from ..saes import SAE
from .probe import balanced_weights, f1, fit_logistic
from .sparse_probing import Row

LETTERS = "abcdefghijklmnopqrstuvwxyz"
TEMPLATE = " has the first letter:"
EPS = 1e-8
FULL_COS, FRACTION_COS, PROJECTION_SHARE, MAX_ABSORBERS, TOP_FEATURES = 0.025, 0.1, 0.4, 3, 10
"""SAEBench's thresholds (``feature_absorption.py``, ``FeatureAbsorptionCalculator``)."""


@dataclass
class AbsorptionConfig:
    words: int = 4000
    """Vocabulary words sampled (0: all of them, as SAEBench)."""
    icl_examples: int = 10
    max_k: int = 10
    f1_jump: float = 0.03
    min_probe_f1: float = 0.6
    min_letters: int = 20
    probe_l2: float = 26 * 1e-4
    """L2 of each letter's ground-truth probe, per sample: SAEBench's weight decay (1e-4) on a loss averaged over
    the 26 letters too, so 26 times it per letter."""
    l1: float = 0.01
    l1_epochs: int = 50
    """Epochs of the L1 probe over the model's whole letter vocabulary (``l1_steps``), as SAEBench."""
    l1_batch: int = 4096
    l1_lr: float = 0.01
    l1_end_lr: float = 1e-5
    batch_size: int = 32
    seed: int = 0


class Prompts(NamedTuple):
    ids: list[list[int]]
    position: list[int]
    """Where each prompt's word is."""


def first_letter(word: str) -> int:
    return LETTERS.index(next(c for c in word.lower() if c.isalpha()))


def alpha_vocab(tokenizer, special_ids=()) -> list[tuple[int, str]]:
    """``(token id, text)`` of every token that is ASCII letters only, one leading space allowed."""
    out = []
    for tid in range(len(tokenizer)):
        if tid in special_ids:
            continue
        text = tokenizer.decode([tid])
        bare = text[1:] if text.startswith(" ") else text
        if bare and bare.isascii() and bare.isalpha():
            out.append((tid, text))
    return out


def build_prompts(tokenizer, words: list[tuple[int, str]], pool: list[tuple[int, str]], n_examples: int,
                  rng: np.random.Generator) -> Prompts:
    """One prompt per word, its examples drawn from ``pool`` (never the word itself)."""
    def enc(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    sep, template = enc("\n"), enc(TEMPLATE)
    answers = {c: enc(" " + c.upper()) for c in LETTERS}
    ids, positions = [], []
    for tid, _ in words:
        choice = [pool[j] for j in rng.choice(len(pool), size=min(n_examples + 1, len(pool)), replace=False)]
        examples = [e for e in choice if e[0] != tid][:n_examples]
        seq = list(sep)
        for eid, etext in examples:
            seq += [eid, *template, *answers[LETTERS[first_letter(etext)]], *sep]
        positions.append(len(seq))
        ids.append(seq + [tid, *template])
    return Prompts(ids, positions)


@torch.inference_mode()
def word_activations(lm: LoadedModel, sae: SAE, prompts: Prompts, batch_size: int) -> torch.Tensor:
    """``[n, d_in]`` float32: what ``sae`` reads at each prompt's word (right-padded batches of similar length)."""
    hook = sae.cfg.hook_name
    order = sorted(range(len(prompts.ids)), key=lambda i: len(prompts.ids[i]))
    out = torch.zeros(len(order), sae.cfg.d_in)
    pad = next((v for v in (lm.tokenizer.pad_token_id, lm.tokenizer.eos_token_id) if isinstance(v, int)), 0)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = max(len(prompts.ids[i]) for i in rows)
        batch = torch.full((len(rows), width), pad, dtype=torch.long)
        for r, i in enumerate(rows):
            batch[r, : len(prompts.ids[i])] = torch.tensor(prompts.ids[i])
        acts = sae.select_input(lm.capture(batch, hook)[hook])
        acts = acts.flatten(-2) if acts.ndim == 4 else acts  # hook_z, all heads
        pos = torch.tensor([prompts.position[i] for i in rows])
        out[torch.tensor(rows)] = acts[torch.arange(len(rows)), pos.to(acts.device)].float().cpu()
    return out


@torch.inference_mode()
def encode(sae: SAE, x: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    return torch.cat([sae(x[i : i + batch].to(sae.device)).codes.float().cpu() for i in range(0, len(x), batch)])


def l1_steps(n_train_full: int, cfg: AbsorptionConfig) -> tuple[int, int]:
    """(Adam steps of the L1 probe, steps per epoch): the steps SAEBench's ``l1_epochs`` epochs of ``l1_batch``-word
    batches take over ``n_train_full`` train words (those of the model's whole letter vocabulary)."""
    per_epoch = max(1, math.ceil(n_train_full / cfg.l1_batch))
    return cfg.l1_epochs * per_epoch, per_epoch


def l1_probe(codes: torch.Tensor, labels: np.ndarray, cfg: AbsorptionConfig, n_train_full: int | None = None) -> torch.Tensor:
    """SAEBench's L1-regularised 26-way probe on latents: ``[26, d_sae]`` weights, after ``l1_steps(n_train_full)``
    Adam steps over shuffled batches of ``codes`` (reshuffled at each pass; ``n_train_full`` defaults to their count,
    which is SAEBench's ``l1_epochs`` epochs)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    y = torch.nn.functional.one_hot(torch.as_tensor(labels), len(LETTERS)).float()
    n_pos = y.sum(0)
    pos_weight = torch.where(n_pos > 0, (len(y) - n_pos) / n_pos.clamp_min(1), torch.ones_like(n_pos))
    weight = torch.zeros(len(LETTERS), codes.shape[1], requires_grad=True)
    bias = torch.zeros(len(LETTERS), requires_grad=True)
    opt = torch.optim.Adam([weight, bias], lr=cfg.l1_lr, weight_decay=1e-6)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=math.exp(math.log(cfg.l1_end_lr / cfg.l1_lr) / cfg.l1_epochs))
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    steps, per_epoch = l1_steps(len(y) if n_train_full is None else n_train_full, cfg)
    done = 0
    with torch.enable_grad():
        while done < steps:
            for idx in torch.randperm(len(y), generator=gen).split(cfg.l1_batch):
                opt.zero_grad()
                loss = loss_fn(codes[idx] @ weight.T + bias, y[idx]) + cfg.l1 * weight.abs().sum(-1).mean()
                loss.backward()
                opt.step()
                done += 1
                if done % per_epoch == 0:
                    sched.step()  # once per epoch of the whole vocabulary, as SAEBench's per-epoch decay
                if done == steps:
                    break
    return weight.detach()


def main_latents(f1s: list[float], feats_by_k: list[list[int]], jump: float) -> list[int]:
    """A letter's main latents: those of the k-sparse probe at the last k (from 1 up) whose F1 beat the best so far
    by more than ``jump``; the first k that does not stops the search (SAEBench's feature-split rule)."""
    best, main = -100.0, []
    for score, feats in zip(f1s, feats_by_k, strict=True):
        if score <= best + jump:
            break
        best, main = score, feats
    return main


def absorption_scores(x: torch.Tensor, codes: torch.Tensor, direction: torch.Tensor, cos: torch.Tensor,
                      main: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Absorption fraction and full absorption (bool) of each word (see the module docstring): ``x [n, d]``,
    ``codes [n, d_sae]``, the probe's unit ``direction [d]``, ``cos [d_sae]`` of it with each decoder row."""
    fractions, full = np.zeros(len(x)), np.zeros(len(x), dtype=bool)
    main_t = torch.as_tensor(main, dtype=torch.long)
    for w in range(len(x)):
        proj = codes[w] * cos
        p = float(x[w] @ direction)
        main_proj = float(proj[main_t].sum())
        candidates = torch.ones(len(proj), dtype=torch.bool)
        candidates[main_t] = False
        candidates &= (cos >= FRACTION_COS) & (proj > 0)
        others = float(proj[candidates].topk(min(MAX_ABSORBERS, int(candidates.sum()))).values.sum())
        if main_proj >= p or others / p < PROJECTION_SHARE:
            fractions[w] = 0.0
        elif main_proj <= 0:
            fractions[w] = 1.0
        else:
            absorbed = min(others, p - main_proj)
            fractions[w] = float(np.clip(absorbed / (absorbed + main_proj), 0.0, 1.0))
        top = int(proj.topk(min(TOP_FEATURES, len(proj))).indices[0])
        full[w] = bool((codes[w][main_t] < EPS).all() and float(cos[top]) >= FULL_COS and p >= 0
                       and float(proj[top]) / p >= PROJECTION_SHARE)
    return fractions, full


def absorption(lm: LoadedModel, sae: SAE, cfg: AbsorptionConfig | None = None) -> list[Row]:
    """The first-letter absorption metrics of ``sae`` (see the module docstring) as result rows."""
    cfg = cfg or AbsorptionConfig()
    rng = np.random.default_rng(cfg.seed)
    run = compute_copy(sae, lm)
    vocab = alpha_vocab(lm.tokenizer, lm.special_token_ids)
    n_train_full = int(0.8 * len(vocab))  # SAEBench trains on 80% of the whole vocabulary
    if cfg.words and len(vocab) > cfg.words:
        vocab = [vocab[i] for i in sorted(rng.choice(len(vocab), cfg.words, replace=False))]
    if len(vocab) < 10 * cfg.icl_examples:
        raise ValueError(f"the model's vocabulary has only {len(vocab)} letter-only tokens: too few for the first-letter task")
    shuffled = [vocab[i] for i in rng.permutation(len(vocab))]
    cut = int(0.8 * len(shuffled))
    train, test = shuffled[:cut], shuffled[cut:]
    x_tr = word_activations(lm, sae, build_prompts(lm.tokenizer, train, train, cfg.icl_examples, rng), cfg.batch_size)
    x_te = word_activations(lm, sae, build_prompts(lm.tokenizer, test, test, cfg.icl_examples, rng), cfg.batch_size)
    y_tr = np.array([first_letter(t) for _, t in train])
    y_te = np.array([first_letter(t) for _, t in test])
    c_tr, c_te = encode(run, x_tr), encode(run, x_te)
    weights = l1_probe(c_tr, y_tr, cfg, n_train_full)
    dec = sae.decoder_directions().detach().float().cpu()
    dec = dec / dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    rows: list[Row] = []
    scores: dict[str, tuple[float, float, int]] = {}
    for li, letter in enumerate(LETTERS):
        pos_tr, pos_te = y_tr == li, y_te == li
        if pos_tr.sum() < 2 or pos_te.sum() < 1 or pos_tr.all():
            continue
        neg = len(y_tr) - int(pos_tr.sum())
        probe = fit_logistic(x_tr.numpy(), pos_tr, C=1 / (cfg.probe_l2 * len(y_tr)),
                             sample_weight=np.where(pos_tr, neg / pos_tr.sum(), 1.0))
        score = probe.decision(x_te.numpy())
        probe_f1 = f1(score > 0, pos_te)
        rows.append(Row("absorption", "probe_f1", letter, None, probe_f1, int(pos_te.sum())))
        f1s, feats_by_k = [], []
        for k in range(1, cfg.max_k + 1):
            feats = weights[li].topk(k).indices.tolist()
            sparse = fit_logistic(c_tr[:, feats].numpy(), pos_tr, sample_weight=balanced_weights(pos_tr))
            f1s.append(f1(sparse.decision(c_te[:, feats].numpy()) > 0, pos_te))
            feats_by_k.append(feats)
            rows.append(Row("absorption", "sparse_probe_f1", letter, k, f1s[-1], int(pos_te.sum()), feats))
        main = main_latents(f1s, feats_by_k, cfg.f1_jump)
        rows.append(Row("absorption", "num_split_features", letter, None, float(len(main)), None, main))
        if probe_f1 <= cfg.min_probe_f1:
            continue
        words = [w for w, s, p in zip(test, score, pos_te, strict=True) if p and s > 0]
        if not words:
            continue
        fresh = build_prompts(lm.tokenizer, words, vocab, cfg.icl_examples, rng)
        x = word_activations(lm, sae, fresh, cfg.batch_size)
        direction = torch.as_tensor(probe.coef, dtype=torch.float32)
        direction = direction / direction.norm()
        fractions, full = absorption_scores(x, encode(run, x), direction, dec @ direction, main)
        scores[letter] = (float(fractions.mean()), float(full.mean()), len(main))
        rows.append(Row("absorption", "mean_absorption_fraction", letter, None, float(fractions.mean()), len(words)))
        rows.append(Row("absorption", "full_absorption_rate", letter, None, float(full.mean()), len(words)))
    rows.append(Row("absorption", "letters_evaluated", None, None, float(len(scores)), len(scores)))
    if len(scores) >= cfg.min_letters:
        rows += summary_rows(list(scores.values()))
    return rows


SUMMARY = ("mean_absorption_fraction", "mean_full_absorption", "mean_num_split_features")
SPREAD = ("std_dev_absorption_fraction", "std_dev_full_absorption", "std_dev_num_split_features")
"""SAEBench's mean metrics and their spread over letters (``statistics.stdev``: ddof 1; NaN for one letter)."""


def summary_rows(per_letter: list[tuple[float, float, int]]) -> list[Row]:
    """The means over evaluated letters of (absorption fraction, full absorption rate, split features) and their
    sample standard deviations."""
    values = np.array(per_letter, dtype=np.float64).reshape(-1, 3)
    n = len(values)
    rows = [Row("absorption", m, None, None, float(values[:, i].mean()), n) for i, m in enumerate(SUMMARY)]
    return rows + [Row("absorption", m, None, None, float(values[:, i].std(ddof=1)) if n > 1 else float("nan"), n)
                   for i, m in enumerate(SPREAD)]
