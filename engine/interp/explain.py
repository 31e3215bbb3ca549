"""``saescope explain``: explanations and delphi-style scores for a run's latents, resumable (docs/explanations.md).

Per batch of latents: the explainer reads each latent's shown excerpts and answers one phrase (junk answers are
recorded as failed, latents without examples as skipped); each requested scorer tests the explanation on
held-out excerpts; the explanation is embedded for search by meaning; the batch is written as one part
(``storage``). A rerun skips latents whose explanation and requested scores exist for the same explainer and
prompt version, and re-scores those whose explanation exists but some score is missing.

Baselines (``--baselines``) score, for the same latents and excerpts, the explanations shuffled across latents
(explainer ``baseline:shuffled``) and a top-token label built from the excerpts the explainer saw, never the
held-out ones the scorers test on (``baseline:top-tokens``, ``top_token_label``).
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from .. import lock
from ..model.tokens import short_token
from ..run import rundir
from ..run import schema as run_schema
from ..run.manifest import sections
from . import intruder, parts, prompts, schema, scorers
from .backends import ChatBackend, SentenceEmbedder
from .data import SAMPLINGS, LatentData, QuietPool, RunExamples
from .scorers import Excerpt

SHUFFLED, LABELS = "baseline:shuffled", "baseline:top-tokens"
_SPEC = re.compile(r"^(densest|active|random):(\d+)$")


def parse_features(spec: str, n_features: int, densities: np.ndarray, max_acts: np.ndarray, seed: int = 0) -> list[int]:
    """``all``; ids and ranges (``3,10-20``); ``densest:N`` (highest density); ``active:N`` (highest max
    activation); ``random:N`` (N live latents at random). Dead latents are left out of the ranked forms."""
    spec = spec.strip()
    if spec == "all":
        return list(range(n_features))
    m = _SPEC.match(spec)
    if m:
        n, live = int(m.group(2)), np.flatnonzero(densities > 0)
        if m.group(1) == "densest":
            order = live[np.argsort(-densities[live], kind="stable")]
        elif m.group(1) == "active":
            order = live[np.argsort(-max_acts[live], kind="stable")]
        else:
            order = np.sort(np.random.default_rng(seed).permutation(live)[:n])
        return [int(i) for i in order[:n]]
    ids: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        if re.fullmatch(r"\d+", part):
            ids.append(int(part))
        elif re.fullmatch(r"\d+-\d+", part):
            lo, hi = (int(x) for x in part.split("-"))
            if hi < lo:
                raise ValueError(f"--features range {part!r} runs backwards")
            ids.extend(range(lo, hi + 1))
        else:
            raise ValueError(f"--features {spec!r}: use all, ids and ranges like 3,10-20, densest:N, active:N or random:N")
    bad = [i for i in ids if i >= n_features]
    if bad:
        raise ValueError(f"--features: latent {bad[0]} does not exist (the SAE has {n_features} latents)")
    return list(dict.fromkeys(ids))


@dataclass
class ExplainConfig:
    features: str = "random:200"
    """Which latents: all; ids and ranges (3,10-20); densest:N; active:N (highest max activation); random:N."""
    scorers: tuple[str, ...] = scorers.SCORERS
    """Comma-separated: detection,fuzzing,embedding,intruder ('' for none)."""
    batch_size: int = 8
    """Latents per batch (one resumable part each)."""
    sampling: str = "quantiles"
    """quantiles: explainer and scorers both see excerpts across the activation quantiles (delphi); top: the
    explainer sees the even-ranked top examples, the scorers odd ranks and one per quantile (saescope's earlier)."""
    n_shown: int = 8
    """Excerpts the explainer is shown per latent."""
    n_heldout: int = 10
    """Activating excerpts per scorer (with sampling=top: half top, half quantile); as many non-activating ones."""
    judge_budget: int = 32
    """Tokens a judge whose first token is not an answer may take for a second reply whose final digit is read
    (reasoning models need hundreds); 0: such an answer is a failed judgement at once."""
    pool_contexts: int = 256
    """Random run contexts the SAE is run on once to find non-activating excerpts."""
    max_tokens: int = 32
    """Tokens an explanation may take."""
    before: int = 12
    """Excerpt window: tokens before the maximum."""
    after: int = 4
    """Excerpt window: tokens after the maximum."""
    baselines: bool = False
    """Also score the explanations shuffled across latents and the top-token labels (quality check)."""
    seed: int = 0
    device: str = "auto"
    """Where a local explainer and the run's model run: auto, cpu, cuda, mps."""
    dtype: str = "auto"
    """The dtype they run in: auto (the fastest here), float32, bfloat16, float16."""
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"--sampling {self.sampling!r}: use {' or '.join(SAMPLINGS)}")
        if self.judge_budget < 0:
            raise ValueError(f"--judge-budget must be >= 0, got {self.judge_budget}")


def finished_manifest(run_dir: Path) -> dict:
    """The manifest of a finished run; a clear error for anything else (a snapshot, a precompute under way, no run)."""
    manifest = rundir.read_manifest(run_dir)
    if manifest is None and (run_dir / rundir.PARTIAL).is_dir():
        raise FileNotFoundError(f"{run_dir} has no finished run yet (a precompute is writing it, or was stopped before "
                                "its first snapshot): explain it once precompute has finished")
    if manifest is None:
        raise FileNotFoundError(f"{run_dir} is not a run directory (no {run_schema.MANIFEST}): run saescope precompute first")
    if manifest.get("data_dir") or not sections(manifest).snapshot.final:
        raise ValueError(f"{run_dir} is still being computed (a snapshot): explain it once precompute has finished")
    return manifest


EMPTY_POOL = QuietPool(np.zeros(0, np.int64), 1, np.zeros(0, np.int32), np.zeros(0, np.int32), 0)


def quiet_pool(run_dir: Path, manifest: dict, examples: RunExamples, cfg: ExplainConfig) -> QuietPool:
    """Where each latent fires on a pool of random run contexts, from one run of the run's own model and SAE
    (cached in ``.interp/pool.npz``): the source of non-activating excerpts."""
    cache = run_dir / schema.INTERP_DIR / "pool.npz"
    key = f"{manifest['sae']['hash']}:{manifest['model']['hash']}:{cfg.pool_contexts}:{cfg.seed}"
    if cache.is_file():
        with np.load(cache) as z:
            if str(z["key"]) == key:
                return QuietPool(z["ids"], int(z["ctx_len"]), z["latents"], z["where"], int(z["d_sae"]))
    from ..data.activations import iter_activations
    from ..run.loaded import load_run_model, load_run_sae

    all_ids = examples.context_ids()
    rng = np.random.default_rng(cfg.seed)
    ids = np.sort(rng.choice(all_ids, size=min(cfg.pool_contexts, len(all_ids)), replace=False))
    contexts = examples.contexts([int(i) for i in ids])
    try:
        lm = load_run_model(manifest, f"run {run_dir}", device=cfg.device, dtype=cfg.dtype)
        sae = load_run_sae(manifest, f"run {run_dir}", device=lm.device)
    except (OSError, ValueError) as err:
        raise ValueError(f"explain needs the run's model and SAE to find contexts where a latent is silent: {err}") from err
    s = manifest["settings"]
    ctx_len = len(contexts[int(ids[0])])
    latents, where, row = [], [], 0
    with torch.inference_mode():
        for batch in iter_activations(lm, manifest["sae"]["hook"], [contexts[int(i)] for i in ids], 8,
                                      include_special=s.get("include_special", False),
                                      include_first=s.get("include_first", False),
                                      include_massive=s.get("include_massive", False)):
            codes = sae.encode(batch.acts.to(sae.dtype)) * batch.mask.unsqueeze(-1)
            b, pos, lat = (codes > 0).nonzero(as_tuple=True)
            latents.append(lat.cpu().numpy().astype(np.int32))
            where.append(((b + row) * ctx_len + pos).cpu().numpy().astype(np.int32))
            row += codes.shape[0]
    lat_all, where_all = np.concatenate(latents), np.concatenate(where)
    order = np.argsort(lat_all, kind="stable")
    pool = QuietPool(ids, ctx_len, lat_all[order], where_all[order], int(sae.cfg.d_sae))
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name("pool.tmp.npz")
    np.savez(tmp, key=np.array(key), ids=ids, ctx_len=np.array(ctx_len), latents=pool.latents, where=pool.where,
             d_sae=np.array(pool.d_sae))
    tmp.replace(cache)
    return pool


def top_token_label(excerpts: list[Excerpt], n: int = 3) -> str:
    """The top-token baseline's label from these excerpts only (those the explainer saw): the ``n`` tokens carrying
    most of the latent's activation, as the run labels latents from all its examples (``" / "``-joined)."""
    mass: dict[str, float] = {}
    for e in excerpts:
        for tok, a in zip(e.tokens, e.acts, strict=True):
            if a > 0:
                mass[tok] = mass.get(tok, 0.0) + a
    shown: list[str] = []
    for tok, _ in sorted(mass.items(), key=lambda kv: -kv[1]):
        text = short_token(tok)
        if text not in shown:
            shown.append(text)
        if len(shown) == n:
            break
    return " / ".join(shown)


def _top_tokens(excerpts: list[Excerpt], n: int = 5) -> list[str]:
    mass: dict[str, float] = {}
    for e in excerpts:
        for tok, a in zip(e.tokens, e.acts, strict=True):
            if a > 0:
                mass[tok.strip() or tok] = mass.get(tok.strip() or tok, 0.0) + a
    return [t for t, _ in sorted(mass.items(), key=lambda kv: -kv[1])[:n]]


def explain_messages(latent: LatentData) -> list[dict[str, str]]:
    shown = [prompts.mark(e.tokens, [a > 0 for a in e.acts]) for e in latent.shown]
    return prompts.explain_messages(shown, _top_tokens(latent.shown))


def _done(run_dir: Path, explainer: str, wanted: list[str]) -> tuple[dict[int, str | None], set[int]]:
    """Existing explanations of ``explainer`` (None: failed or skipped) and the latents whose scores are all there."""
    ex = parts.read_all(run_dir, schema.EXPLANATIONS)
    sc = parts.read_all(run_dir, schema.SCORES)
    have: dict[int, str | None] = {}
    for fid, text, who, version in zip(ex["feature_id"].to_pylist(), ex["explanation"].to_pylist(),
                                       ex["explainer"].to_pylist(), ex["prompt_version"].to_pylist(), strict=True):
        if who == explainer and version == prompts.EXPLAIN_VERSION:
            have[fid] = text
    scored: dict[int, set[str]] = {}
    for fid, who, version, scorer in zip(sc["feature_id"].to_pylist(), sc["explainer"].to_pylist(),
                                         sc["prompt_version"].to_pylist(), sc["scorer"].to_pylist(), strict=True):
        if who == explainer and version == prompts.EXPLAIN_VERSION:
            scored.setdefault(fid, set()).add(scorer)
    complete = {f for f, text in have.items() if text is None or set(wanted) <= scored.get(f, set())}
    return have, complete


SKIPPED_REASON = "no examples (dead latent, or none in the run)"


def explanation_rows(feature_ids, texts, explainer, statuses, reasons, now) -> pa.Table:
    """Rows of ``explanations.parquet`` (one per latent, this prompt version)."""
    n = len(feature_ids)
    return pa.table({"feature_id": feature_ids, "explanation": texts, "explainer": [explainer] * n,
                     "prompt_version": [prompts.EXPLAIN_VERSION] * n, "created_at": [now] * n, "status": statuses,
                     "reason": reasons}, schema=schema.EXPLANATIONS_SCHEMA)


def outcome(answer: str) -> tuple[str | None, str, str]:
    """(explanation, status, reason) of an explainer's answer: the cleaned text and ``ok``, or None and ``failed``
    with why (and the start of the answer)."""
    text, reason = prompts.clean_explanation(answer)
    return (text, "ok", "") if text is not None else (None, "failed", f"{reason}: {answer[:80]!r}")


def wanted_scorers(names: tuple[str, ...] | list[str], judge: ChatBackend | None, embedder: SentenceEmbedder | None) -> list[str]:
    """The scorers among ``names`` that can run here (a judge for detection and fuzzing, an embedder for
    embedding); an unknown name is a ``ValueError``."""
    unknown = [s for s in names if s not in scorers.SCORERS]
    if unknown:
        raise ValueError(f"unknown scorer {unknown[0]!r}; use {', '.join(scorers.SCORERS)}")
    return [s for s in names if (embedder if s == "embedding" else judge) is not None]


def feature_stats(examples: RunExamples) -> tuple[np.ndarray, np.ndarray]:
    """Density and maximum activation of every latent of the run, by id."""
    return examples.store.density_and_max()


def load_latents(examples: RunExamples, ids: list[int], cfg: ExplainConfig) -> list[LatentData]:
    """What the explainer sees and what the scorers test on, for each latent (``data.RunExamples.latents``)."""
    return examples.latents(ids, n_shown=cfg.n_shown, n_top_heldout=cfg.n_heldout // 2,
                            n_quantile_heldout=cfg.n_heldout - cfg.n_heldout // 2, sampling=cfg.sampling, seed=cfg.seed)


def quiet_for(examples: RunExamples, pool: QuietPool, lat: LatentData, cfg: ExplainConfig) -> list[Excerpt]:
    """Non-activating excerpts for a latent's scorers: as many as its held-out ones, from none of the contexts the
    explainer saw."""
    return examples.quiet_excerpts(pool, lat.feature_id, len(lat.heldout), cfg.seed,
                                   exclude={e.context_id for e in lat.shown})


def score_and_embed(lat: LatentData, quiet: list[Excerpt], text: str, name: str, wanted: list[str],
                    judge: ChatBackend | None, embedder: SentenceEmbedder | None, seed: int, budget: int = 0
                    ) -> tuple[list[scorers.Score], list[dict], dict | None]:
    """Score one explanation on the latent's held-out and ``quiet`` excerpts and embed it: (scores, their rows, the
    embedding row or None without an embedder)."""
    vector = embedder.encode([text])[0] if embedder is not None else None
    emb_row = None
    if vector is not None:
        emb_row = {"feature_id": lat.feature_id, "explainer": name, "prompt_version": prompts.EXPLAIN_VERSION,
                   "model": getattr(embedder, "name", "embedder"), "embedding": vector.astype(np.float32).tolist()}
    scores = score_one(lat, quiet, text, wanted, judge, embedder, vector, seed, budget)
    return scores, _score_rows(lat.feature_id, name, scores), emb_row


def write_rows(run_dir: Path, explanations: pa.Table, score_rows: list[dict], emb_rows: list[dict]) -> Path:
    """One part folder holding these explanation, score and embedding rows."""
    return parts.write_part(run_dir, {
        schema.EXPLANATIONS: explanations,
        schema.SCORES: pa.Table.from_pylist(score_rows, schema=schema.SCORES_SCHEMA),
        schema.EMBEDDINGS: pa.Table.from_pylist(emb_rows, schema=schema.EMBEDDINGS_SCHEMA),
    })


def score_one(latent: LatentData, quiet: list[Excerpt], explanation: str, wanted: list[str], judge: ChatBackend | None,
              embedder: SentenceEmbedder | None, vector: np.ndarray | None, seed: int, budget: int = 0
              ) -> list[scorers.Score]:
    """Each scorer in ``wanted`` on one explanation (the intruder check, which needs none, on the latent's top and
    ``quiet`` excerpts)."""
    excerpts = latent.heldout + quiet
    out = []
    for name in wanted:
        if name == "detection" and judge is not None:
            out.append(scorers.detection(judge, explanation, excerpts, budget=budget))
        elif name == "fuzzing" and judge is not None:
            out.append(scorers.fuzzing(judge, explanation, excerpts, seed=seed + latent.feature_id, budget=budget))
        elif name == "embedding" and embedder is not None:
            out.append(scorers.embedding(embedder, explanation, excerpts, vector))
        elif name == "intruder" and judge is not None:
            out.append(intruder.intruder(judge, latent.top, quiet, seed=[seed, latent.feature_id], budget=budget))
    return out


def _score_rows(fid: int, explainer: str, scores: list[scorers.Score]) -> list[dict]:
    return [{"feature_id": fid, "explainer": explainer, "prompt_version": prompts.EXPLAIN_VERSION, "scorer": s.scorer,
             "score": None if not np.isfinite(s.score) else float(s.score), "n_examples": s.n_examples,
             "details": json.dumps(_finite(s.details), allow_nan=False)} for s in scores]


def _finite(value):
    """NaN (e.g. an AUROC with one class missing) becomes null: JSON has no NaN."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


@dataclass
class ExplainSession:
    """One explain pass over a run, passed whole to the batches: where, who explains and judges, what is scored,
    the settings, and the run's examples and silent-context pool."""

    run_dir: Path
    explainer: ChatBackend | None
    judge: ChatBackend | None
    embedder: SentenceEmbedder | None
    wanted: list[str]
    """The scorers that run here."""
    cfg: ExplainConfig
    examples: RunExamples
    pool: QuietPool
    on_explanation: Callable[[int, str | None], None] | None = None


def explain_run(run_dir: str | Path, explainer: ChatBackend | None, *, judge: ChatBackend | None = None,
                embedder: SentenceEmbedder | None = None, cfg: ExplainConfig | None = None, progress: bool = True,
                on_explanation: Callable[[int, str | None], None] | None = None) -> dict:
    """Explain and score the latents ``cfg.features`` of a finished run; returns counts and the throughput.

    ``judge`` (default: the explainer) answers the detection and fuzzing questions; ``embedder`` (an
    ``Embedder``) scores embedding and makes explanations searchable. Either may be None to skip those scorers.
    """
    with lock.hold(run_dir, shared=True), lock.hold(run_dir, "saescope explain", name=".saescope-explain.lock"):
        cfg = cfg or ExplainConfig()
        run_dir = Path(run_dir)
        manifest = finished_manifest(run_dir)
        parts.consolidate(run_dir)
        judge = judge or explainer
        # only the scorers that can run here are waited for: with --no-embed, a missing embedding score would make a
        # rerun take every latent for unfinished and ask the scorer model everything again
        wanted = wanted_scorers(cfg.scorers, judge, embedder)
        examples = RunExamples(run_dir, before=cfg.before, after=cfg.after)
        try:
            density, max_act = feature_stats(examples)
            ids = parse_features(cfg.features, len(density), density, max_act, cfg.seed)
            name = explainer.name if explainer is not None else "none"
            have, complete = _done(run_dir, name, wanted)
            todo = [i for i in ids if i not in complete]
            stats: dict[str, object] = {"features": len(ids), "already_done": len(ids) - len(todo), "explained": 0, "failed": 0,
                                        "skipped": 0}
            if not todo and not cfg.baselines:
                return stats
            # no scorer, no non-activating excerpt needed: the run's model and SAE are not run
            pool = quiet_pool(run_dir, manifest, examples, cfg) if wanted else EMPTY_POOL
            session = ExplainSession(run_dir, explainer, judge, embedder, wanted, cfg, examples, pool, on_explanation)
            started = time.perf_counter()
            bar = tqdm(total=len(todo), desc="explain", unit="latent", disable=not progress, file=sys.stderr)
            for i in range(0, len(todo), cfg.batch_size):
                batch = load_latents(examples, todo[i : i + cfg.batch_size], cfg)
                _explain_batch(session, batch, have, stats)
                bar.update(len(batch))
            bar.close()
            elapsed = time.perf_counter() - started
            stats["seconds"] = round(elapsed, 2)
            stats["latents_per_minute"] = round(60 * len(todo) / elapsed, 2) if todo and elapsed > 0 else None
            if cfg.baselines:
                stats["baselines"] = score_baselines(session, ids, name)
            parts.consolidate(run_dir)
            return stats
        finally:
            examples.close()


def _explain_batch(session: ExplainSession, batch: list[LatentData], have: dict, stats: dict) -> None:
    run_dir, explainer, judge, embedder, wanted = (session.run_dir, session.explainer, session.judge, session.embedder,
                                                   session.wanted)
    cfg, examples, pool, on_explanation = session.cfg, session.examples, session.pool, session.on_explanation
    name = explainer.name if explainer is not None else "none"
    now = datetime.now(UTC)
    need = [lat for lat in batch if lat.shown and lat.feature_id not in have]
    answers = explainer.chat([explain_messages(lat) for lat in need], max_tokens=cfg.max_tokens) if need and explainer else []
    texts: dict[int, tuple[str | None, str, str]] = {lat.feature_id: outcome(answer)
                                                       for lat, answer in zip(need, answers, strict=True)}
    for lat in batch:
        if not lat.shown:
            texts[lat.feature_id] = (None, "skipped", SKIPPED_REASON)
    new_ex = [(f, *v) for f, v in texts.items()]
    rows_ex = explanation_rows([r[0] for r in new_ex], [r[1] for r in new_ex], name, [r[2] for r in new_ex],
                               [r[3] for r in new_ex], now)
    score_rows: list[dict] = []
    emb_rows: list[dict] = []
    for lat in batch:
        text = texts[lat.feature_id][0] if lat.feature_id in texts else have.get(lat.feature_id)
        if on_explanation is not None and lat.feature_id in texts:
            on_explanation(lat.feature_id, text)
        if text is None:
            continue
        _, rows, emb_row = score_and_embed(lat, quiet_for(examples, pool, lat, cfg), text, name, wanted, judge, embedder,
                                           cfg.seed, cfg.judge_budget)
        score_rows += rows
        if emb_row is not None:
            emb_rows.append(emb_row)
    for status in ("ok", "failed", "skipped"):
        key = {"ok": "explained", "failed": "failed", "skipped": "skipped"}[status]
        stats[key] += sum(1 for v in texts.values() if v[1] == status)
    write_rows(run_dir, rows_ex, score_rows, emb_rows)


def score_baselines(session: ExplainSession, ids: list[int], name: str) -> dict:
    """Score the shuffled explanations and the top-token labels (of the excerpts the explainer saw) on the same
    latents and excerpts. The intruder check needs no explanation: baselines do not repeat it."""
    run_dir, judge, embedder = session.run_dir, session.judge, session.embedder
    wanted = [w for w in session.wanted if w != "intruder"]
    cfg, examples, pool = session.cfg, session.examples, session.pool
    ex = parts.read_all(run_dir, schema.EXPLANATIONS)
    mine = {f: t for f, t, who, v in zip(ex["feature_id"].to_pylist(), ex["explanation"].to_pylist(), ex["explainer"].to_pylist(),
                                         ex["prompt_version"].to_pylist(), strict=True)
            if who == name and v == prompts.EXPLAIN_VERSION and t is not None and f in set(ids)}
    order = sorted(mine)
    rng = np.random.default_rng(cfg.seed)
    perm = list(order)
    while len(perm) > 1 and any(a == b for a, b in zip(perm, order, strict=True)):  # a derangement: no latent keeps its own
        rng.shuffle(perm)
    shuffled = {f: mine[g] for f, g in zip(order, perm, strict=True)}
    labels = {lat.feature_id: top_token_label(lat.shown) for lat in load_latents(examples, order, cfg)}
    counts = {}
    for baseline, texts in ((SHUFFLED, shuffled), (LABELS, {f: labels.get(f) or None for f in order})):
        _, complete = _done(run_dir, baseline, wanted)
        todo = [f for f in order if f not in complete]
        now = datetime.now(UTC)
        for i in range(0, len(todo), cfg.batch_size):
            batch = load_latents(examples, todo[i : i + cfg.batch_size], cfg)
            score_rows, fids, txts, sts = [], [], [], []
            for lat in batch:
                text = texts[lat.feature_id]
                fids.append(lat.feature_id)
                txts.append(text)
                sts.append("ok" if text else "failed")
                if text is None:
                    continue
                scores = score_one(lat, quiet_for(examples, pool, lat, cfg), text, wanted, judge, embedder, None, cfg.seed,
                                   cfg.judge_budget)
                score_rows += _score_rows(lat.feature_id, baseline, scores)
            reasons = ["" if t else "empty label" for t in txts]
            parts.write_part(run_dir, {
                schema.EXPLANATIONS: explanation_rows(fids, txts, baseline, sts, reasons, now),
                schema.SCORES: pa.Table.from_pylist(score_rows, schema=schema.SCORES_SCHEMA),
            })
        counts[baseline] = len(todo)
    return counts


def summary(run_dir: str | Path, feature_ids: list[int] | None = None) -> dict[str, dict[str, float]]:
    """Mean score per explainer and scorer (over latents with a defined score), e.g. for the table in
    docs/explanations.md."""
    sc = parts.read_all(Path(run_dir), schema.SCORES)
    acc: dict[str, dict[str, list[float]]] = {}
    wanted = set(feature_ids) if feature_ids is not None else None
    for fid, who, scorer, score in zip(sc["feature_id"].to_pylist(), sc["explainer"].to_pylist(), sc["scorer"].to_pylist(),
                                       sc["score"].to_pylist(), strict=True):
        if score is None or (wanted is not None and fid not in wanted):
            continue
        acc.setdefault(who, {}).setdefault(scorer, []).append(score)
    return {who: {s: round(float(np.mean(v)), 4) for s, v in d.items()} | {"n": max(len(v) for v in d.values())}
            for who, d in acc.items()}
