"""One latent explained now: the explainer's words as they arrive, then scored and stored as ``saescope explain`` does.

``explain_latent`` checks its arguments and prepares the latent's excerpts when called, and returns a generator:
iterating it streams the explainer's reply (the pieces it yields), then scores the cleaned explanation and writes
one part folder (``parts.write_part``) with its explanations, scores and embedding rows; the generator's return
value is a ``LiveResult`` (``result = yield from ...``, or wrap it in ``Streamed`` for a consumer that only
iterates, such as ``st.write_stream``). Same prompt and prompt version, junk filter, excerpt split and row schema
as ``explain_run``, under the explainer's own name: a later ``saescope explain`` with that explainer takes the
latent for explained and only adds the scores it lacks.

**Replacing.** Rows are keyed by (latent, explainer name, prompt version); the newest row of a key wins. A usable
(``ok``) new explanation replaces the stored one of its key, and every score stored for that key is computed again
on the new text (detection and fuzzing with the judge, by default the explainer; the embedding with the embedder,
which is then required), so no score or embedding of the old text survives beside the new one. A failed answer
does not replace a usable stored explanation: it is returned, and nothing is written.

Nothing is written when the endpoint fails (``EndpointError``) or the generator is closed before its end.
The part is written without consolidating: a ``saescope explain`` running meanwhile may be writing parts too.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import numpy as np

from .. import lock
from ..run.store import memory_limit
from . import explain, prompts, schema
from .backends import ChatBackend, SentenceEmbedder
from .data import LatentData, RunExamples
from .explain import ExplainConfig
from .index import source_files
from .scorers import Excerpt

_KEY = "feature_id = $feature_id AND explainer = $explainer AND prompt_version = $prompt_version"
STORED_STATUS = f"""
SELECT status FROM read_parquet($files, filename = true, file_row_number = true, union_by_name = true) WHERE {_KEY}
ORDER BY list_position($files, filename) DESC, file_row_number DESC LIMIT 1
"""
"""The newest explanation status of one key (files in write order: the consolidated file, then the parts)."""
STORED_SCORERS = f"SELECT DISTINCT scorer FROM read_parquet($files, union_by_name = true) WHERE {_KEY}"
STORED_EMBEDDING = f"SELECT count(*) FROM read_parquet($files, union_by_name = true) WHERE {_KEY}"
"""Only key columns are read: the scores' details and the embeddings stay on disk."""


@dataclass(frozen=True)
class LiveResult:
    """What one live explanation came to."""

    feature_id: int
    explainer: str
    prompt_version: str
    answer: str
    """The explainer's reply as streamed (the pieces joined)."""
    text: str | None
    """The cleaned explanation; None when the answer was junk (``failed``) or the latent has no examples (``skipped``)."""
    status: str
    """``ok``, ``failed`` or ``skipped``, as in ``explanations.parquet``."""
    reason: str
    scores: dict[str, float | None] = field(default_factory=dict)
    """Score per scorer that ran (None: undefined, e.g. one class of excerpts missing)."""
    written: bool = False
    """False when a failed answer was not stored because a usable explanation of the same key was (it stays)."""


@dataclass(frozen=True)
class _Stored:
    status: str | None
    scorers: frozenset[str]
    embedded: bool


class Streamed:
    """Iterates ``explain_latent``'s pieces and keeps its ``LiveResult`` in ``result`` once they are all out."""

    def __init__(self, pieces: Generator[str, None, LiveResult]):
        self._pieces = pieces
        self.result: LiveResult | None = None

    def __iter__(self) -> Iterator[str]:
        self.result = yield from self._pieces


def explain_latent(run_dir: str | Path, feature_id: int, explainer: ChatBackend, *, embedder: SentenceEmbedder | None = None,
                   scorers: tuple[str, ...] | None = None, judge: ChatBackend | None = None,
                   cfg: ExplainConfig | None = None) -> Generator[str, None, LiveResult]:
    """Explain latent ``feature_id`` of a finished run now: a generator of the reply's text pieces that returns a
    ``LiveResult`` and writes the result into the run (see the module's docstring).

    ``scorers`` default to ``embedding`` (fast), plus ``detection`` and ``fuzzing`` when a ``judge`` is given;
    detection and fuzzing named without a judge ask the explainer, as ``explain_run`` does. ``cfg`` sets the
    excerpts (``n_shown``, ``n_heldout``, ``before``/``after``, ``pool_contexts``, ``seed``) and ``max_tokens``;
    its ``features``, ``scorers`` and ``baselines`` are not used. Raises here, before anything is asked or
    written: ``ValueError`` for an unknown latent or scorer, or a replacement that needs an embedder;
    ``FileNotFoundError``/``ValueError`` for a directory that is not a finished run."""
    with lock.hold(run_dir, shared=True), lock.hold(run_dir, "saescope explain (the app)", name=".saescope-explain.lock"):
        cfg = cfg or ExplainConfig()
        run_dir = Path(run_dir)
        manifest = explain.finished_manifest(run_dir)
        name = explainer.name
        requested = scorers if scorers is not None else ("embedding", "detection", "fuzzing") if judge else ("embedding",)
        explain.wanted_scorers(requested, explainer, embedder)  # unknown names
        examples = RunExamples(run_dir, before=cfg.before, after=cfg.after)
        try:
            n_features = len(explain.feature_stats(examples)[0])
            fid = _feature_id(feature_id, n_features)
            lat = explain.load_latents(examples, [fid], cfg)[0]
            stored = _stored(run_dir, fid, name)
            if stored.status == "ok" and lat.shown:  # a replacement: the old text's scores and embedding are all computed again
                if embedder is None and (stored.embedded or "embedding" in stored.scorers):
                    raise ValueError(f"latent {fid} already has an embedded explanation by {name}: pass an embedder so "
                                     "the new explanation's embedding replaces it")
                requested = (*requested, *sorted(stored.scorers - set(requested)))
            judge = judge or explainer
            wanted = explain.wanted_scorers(requested, judge, embedder)
            quiet: list[Excerpt] = []
            if wanted and lat.shown:
                quiet = explain.quiet_for(examples, explain.quiet_pool(run_dir, manifest, examples, cfg), lat, cfg)
        finally:
            examples.close()
        return _live(run_dir, lat, quiet, explainer, judge, embedder, wanted, cfg, stored)


def _live(run_dir: Path, lat: LatentData, quiet: list[Excerpt], explainer: ChatBackend, judge: ChatBackend,
          embedder, wanted: list[str], cfg: ExplainConfig, stored: _Stored) -> Generator[str, None, LiveResult]:
    name = explainer.name
    now = datetime.now(UTC)
    pieces: list[str] = []
    if lat.shown:
        stream = explainer.stream(explain.explain_messages(lat), max_tokens=cfg.max_tokens)
        try:
            for piece in stream:
                pieces.append(piece)
                yield piece
        finally:  # closed at once when our consumer stops early: a local model then stops generating
            close = getattr(stream, "close", None)
            if close is not None:
                close()
        text, status, reason = explain.outcome("".join(pieces))
    else:  # recorded as explain_run does; the explainer is not asked
        text, status, reason = None, "skipped", explain.SKIPPED_REASON
    result = LiveResult(lat.feature_id, name, prompts.EXPLAIN_VERSION, "".join(pieces), text, status, reason)
    if text is None:
        if stored.status == "ok":
            return result
        _write(run_dir, explain.explanation_rows([lat.feature_id], [None], name, [status], [reason], now), [], [])
        return dataclasses.replace(result, written=True)
    scores, score_rows, emb_row = explain.score_and_embed(lat, quiet, text, name, wanted, judge, embedder, cfg.seed,
                                                           cfg.judge_budget)
    _write(run_dir, explain.explanation_rows([lat.feature_id], [text], name, [status], [reason], now), score_rows,
           [emb_row] if emb_row is not None else [])
    defined = {s.scorer: float(s.score) if np.isfinite(s.score) else None for s in scores}
    return dataclasses.replace(result, scores=defined, written=True)


def _feature_id(feature_id: int, n_features: int) -> int:
    try:
        fid = operator.index(feature_id)
    except TypeError:
        raise ValueError(f"latent id must be an integer, got {feature_id!r}") from None
    if not 0 <= fid < n_features:
        raise ValueError(f"latent {fid} does not exist: this run's SAE has {n_features} latents (ids 0 to {n_features - 1})")
    return fid


def _stored(run_dir: Path, fid: int, name: str) -> _Stored:
    """What the run holds under this latent's key already (the newest status, scorers, whether it is embedded)."""
    key = {"feature_id": fid, "explainer": name, "prompt_version": prompts.EXPLAIN_VERSION}
    for attempt in range(3):
        try:
            with duckdb.connect(config={"memory_limit": memory_limit()}) as con:
                status = scorers = None
                embedded = 0
                if files := [str(p) for p in source_files(run_dir, schema.EXPLANATIONS)]:
                    row = con.execute(STORED_STATUS, {"files": files, **key}).fetchone()
                    status = row[0] if row else None
                if files := [str(p) for p in source_files(run_dir, schema.SCORES)]:
                    scorers = [r[0] for r in con.execute(STORED_SCORERS, {"files": files, **key}).fetchall()]
                if files := [str(p) for p in source_files(run_dir, schema.EMBEDDINGS)]:
                    embedded = (con.execute(STORED_EMBEDDING, {"files": files, **key}).fetchone() or (0,))[0]
            return _Stored(status, frozenset(scorers or ()), bool(embedded))
        except (duckdb.IOException, FileNotFoundError):  # a running explain folded its parts in meanwhile: again
            if attempt == 2:
                raise
    raise AssertionError("not reached")


def _write(run_dir: Path, explanations, score_rows: list[dict], emb_rows: list[dict]) -> Path:
    """``write_rows``, tried again when a concurrent writer took the same part number (the rename fails) or a
    running ``explain`` cleared the folder being written as a killed batch's."""
    for attempt in range(3):
        try:
            return explain.write_rows(run_dir, explanations, score_rows, emb_rows)
        except OSError:
            if attempt == 2:
                raise
    raise AssertionError("not reached")

