"""``explain_latent``: one latent explained live (streamed from the real ``saescope llm-server`` or a scripted
explainer), written as ``explain_run`` writes it and read back through ``InterpStore``; replacing, resuming with
``explain_run`` afterwards, and the errors (unknown latent, dead latent, endpoint failure)."""

from __future__ import annotations

import json
import re
import shutil
import socket

import numpy as np
import pyarrow.parquet as pq
import pytest

from engine.interp import parts as interp_parts
from engine.interp import prompts, schema
from engine.interp.backends import EndpointError, LocalChat, OpenAIChat
from engine.interp.data import RunExamples
from engine.interp.embed import Embedder
from engine.interp.explain import SKIPPED_REASON, ExplainConfig, explain_messages, explain_run, load_latents
from engine.interp.live import LiveResult, Streamed, explain_latent
from engine.interp.server import start_server
from engine.interp.store import InterpStore
from tests.engine.interp_util import DEAD, ScriptedChat, build_run, save_chat_model, save_embedder

CFG = ExplainConfig(n_shown=4, n_heldout=4, pool_contexts=48)
FAST = {"retries": 1, "backoff": 0.01}


class StreamingChat(ScriptedChat):
    """A scripted explainer that also streams its answer, word by word."""

    def stream(self, messages, max_tokens: int = 48, temperature: float = 0.0):
        yield from re.findall(r"\S+\s*|\s+", self.chat([messages], max_tokens, temperature)[0])


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("interp_live")
    chat = LocalChat(str(save_chat_model(root / "chat")), device="cpu", dtype="float32")
    server = start_server(chat, served_name="tiny-chat")
    yield {"root": root, "run": build_run(root / "build"), "chat": chat, "embedder": Embedder(save_embedder(root / "embedder")),
           "url": f"http://127.0.0.1:{server.server_address[1]}/v1"}
    server.shutdown()
    server.server_close()


@pytest.fixture
def run(built, request):
    out = built["root"] / request.node.name.replace("[", "_").replace("]", "")
    shutil.copytree(built["run"], out)
    return out


def drain(pieces) -> tuple[list[str], LiveResult]:
    """The pieces a live explanation yields and the result it returns."""
    out = Streamed(pieces)
    got = list(out)
    assert out.result is not None
    return got, out.result


def parts(run) -> list:
    return interp_parts.part_folders(run)


def auroc(labels: list[int], values: list[float]) -> float:
    pairs = [(p, n) for p, lp in zip(values, labels, strict=True) if lp for n, ln in zip(values, labels, strict=True) if not ln]
    return sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs) / len(pairs)


def test_live_explanation_over_the_llm_server_is_stored_as_explain_run_stores_it(built, run):
    """Streamed from the real server: the pieces are the model's answer, one part holds one explanation with its
    embedding score and embedding, InterpStore shows it, and every row is what ``explain_run`` writes for the same
    latent with the same model in-process."""
    endpoint = OpenAIChat(built["url"], "tiny-chat", **FAST)
    fid = 1
    pieces, result = drain(explain_latent(run, fid, endpoint, embedder=built["embedder"], cfg=CFG))

    examples = RunExamples(run, before=CFG.before, after=CFG.after)
    try:
        lat = load_latents(examples, [fid], CFG)[0]
    finally:
        examples.close()
    answer = built["chat"].chat([explain_messages(lat)], max_tokens=CFG.max_tokens)[0]
    assert len(pieces) > 1 and "".join(pieces) == result.answer == answer
    text = prompts.clean_explanation(answer)[0]
    assert text is not None, "the tiny model's answer for this latent is usable"
    assert (result.feature_id, result.explainer, result.prompt_version) == (fid, endpoint.name, prompts.EXPLAIN_VERSION)
    assert (result.text, result.status, result.reason, result.written) == (text, "ok", "", True)
    assert list(result.scores) == ["embedding"]
    assert len(parts(run)) == 1

    with InterpStore.open(run) as store:
        [row] = store.explanations(fid)
        assert (row.explainer, row.prompt_version, row.text, row.status) == (endpoint.name, prompts.EXPLAIN_VERSION, text, "ok")
        assert row.scores == {"embedding": result.scores["embedding"]} and store.best([fid])[fid] == row
        [detail] = store.scores(fid, endpoint.name)
        assert detail.scorer == "embedding" and detail.score == result.scores["embedding"]
        assert store.summary().embedding_models == {"embedder": 1}
    score = pq.read_table(parts(run)[0] / schema.SCORES).to_pylist()[0]
    details = json.loads(score["details"])
    assert score["score"] == pytest.approx(auroc(details["labels"], details["similarities"]), abs=1e-3)
    shown = {e.context_id for e in lat.shown}
    assert not shown & set(details["context_ids"]), "the scorer never sees a context the explainer saw"
    assert sum(details["labels"]) == len(lat.heldout) == len(details["labels"]) // 2
    [emb] = pq.read_table(parts(run)[0] / schema.EMBEDDINGS).to_pylist()
    np.testing.assert_allclose(emb["embedding"], built["embedder"].encode([text])[0], atol=1e-6)

    # the same latent through explain_run, in-process, on a copy: the same rows (but the explainer's name and time)
    other = run.parent / (run.name + "-batch")
    shutil.copytree(built["run"], other)
    explain_run(other, built["chat"], embedder=built["embedder"], progress=False,
                cfg=ExplainConfig(**{**CFG.__dict__, "features": str(fid), "scorers": ("embedding",)}))
    for name, drop in ((schema.EXPLANATIONS, {"explainer", "created_at"}), (schema.SCORES, {"explainer"}),
                       (schema.EMBEDDINGS, {"explainer"})):
        live = [{k: v for k, v in r.items() if k not in drop} for r in pq.read_table(parts(run)[0] / name).to_pylist()]
        batch = [{k: v for k, v in r.items() if k not in drop} for r in pq.read_table(other / name).to_pylist()]
        assert live == batch, name


def test_local_explainer_with_a_judge_scores_all_three(built, run):
    chat = built["chat"]
    pieces, result = drain(explain_latent(run, 0, chat, embedder=built["embedder"], judge=chat, cfg=CFG))
    assert "".join(pieces) == result.answer and result.status == "ok"
    assert sorted(result.scores) == ["detection", "embedding", "fuzzing"]
    with InterpStore.open(run) as store:
        [row] = store.explanations(0)
        assert row.explainer == chat.name and row.scores == result.scores
        assert sorted(d.scorer for d in store.scores(0, chat.name)) == ["detection", "embedding", "fuzzing"]


def test_a_second_live_explanation_replaces_the_first(built, run):
    """"Same" is the storage key: latent, explainer name and prompt version. The newer explanation replaces the
    older; each score stored for the key is computed again on the new text (here detection and fuzzing, judged by
    the explainer when no judge is given), and so is the embedding: nothing of the old text survives."""
    fid = 2
    first = StreamingChat(answer=lambda text: "month names in dates")
    drain(explain_latent(run, fid, first, embedder=built["embedder"], judge=first, cfg=CFG))
    second = StreamingChat(answer=lambda text: "third-person pronouns")
    _, result = drain(explain_latent(run, fid, second, embedder=built["embedder"], cfg=CFG))
    assert result.text == "third-person pronouns" and sorted(result.scores) == ["detection", "embedding", "fuzzing"]
    assert second.questions and all("Feature: third-person pronouns" in q for q in second.questions)
    assert len(parts(run)) == 2

    with InterpStore.open(run) as store:
        [row] = store.explanations(fid)
        assert row.text == "third-person pronouns" and row.scores == result.scores
    interp_parts.consolidate(run)
    for name in schema.FILES:
        keys = [tuple(r[k] for k in schema.KEYS[name]) for r in pq.read_table(run / name).to_pylist()]
        assert len(keys) == len(set(keys)), name
    [emb] = pq.read_table(run / schema.EMBEDDINGS).to_pylist()
    np.testing.assert_allclose(emb["embedding"], built["embedder"].encode(["third-person pronouns"])[0], atol=1e-6)

    # a junk answer does not replace a usable explanation; a replacement without an embedder is refused up front
    junk = StreamingChat(answer=lambda text: "the <<word>> here")
    pieces, result = drain(explain_latent(run, fid, junk, embedder=built["embedder"], cfg=CFG))
    assert pieces == ["the ", "<<word>> ", "here"] and (result.text, result.status, result.written) == (None, "failed", False)
    assert "echoes the excerpts" in result.reason and not parts(run)
    silent = StreamingChat()
    with pytest.raises(ValueError, match="already has an embedded explanation.*pass an embedder"):
        explain_latent(run, fid, silent, cfg=CFG)
    assert silent.chats == [] and not parts(run)
    with InterpStore.open(run) as store:
        assert [e.text for e in store.explanations(fid)] == ["third-person pronouns"]


def test_explain_run_after_a_live_explanation_neither_duplicates_nor_loses_it(built, run):
    live = StreamingChat(answer=lambda text: "words that start a sentence")
    _, result = drain(explain_latent(run, 3, live, embedder=built["embedder"], cfg=CFG))
    with InterpStore.open(run) as store:
        created = store.explanations(3)[0].created_at

    batch = ScriptedChat()  # the same name, "scripted"
    cfg = ExplainConfig(**{**CFG.__dict__, "features": "0-4", "scorers": ("detection", "embedding"), "batch_size": 8})
    stats = explain_run(run, batch, embedder=built["embedder"], cfg=cfg, progress=False)
    assert stats["already_done"] == 0 and stats["explained"] == 4, "latent 3 lacks its detection score"
    assert len(batch.chats) == 4 and not any("words that start" in c for c in batch.chats), "latent 3 is not asked again"
    assert any("Feature: words that start a sentence" in q for q in batch.questions), "its missing score is added"
    with InterpStore.open(run) as store:
        [row] = store.explanations(3)
        assert (row.text, row.created_at) == ("words that start a sentence", created)
        assert row.scores["embedding"] == result.scores["embedding"] and row.scores["detection"] is not None
    for name in schema.FILES:
        keys = [tuple(r[k] for k in schema.KEYS[name]) for r in pq.read_table(run / name).to_pylist()]
        assert len(keys) == len(set(keys)), name
    again = explain_run(run, ScriptedChat(), embedder=built["embedder"], cfg=cfg, progress=False)
    assert again["already_done"] == 5


def test_unknown_latent_or_scorer_is_refused_before_anything_happens(built, run):
    chat = StreamingChat()
    for bad in (256, -1, 10**9):
        with pytest.raises(ValueError, match=rf"latent {bad} does not exist: this run's SAE has 256 latents \(ids 0 to 255\)"):
            explain_latent(run, bad, chat, cfg=CFG)
    for bad in ("3", 2.0, None):
        with pytest.raises(ValueError, match="must be an integer"):
            explain_latent(run, bad, chat, cfg=CFG)  # pyright: ignore[reportArgumentType]
    with pytest.raises(ValueError, match="unknown scorer 'detect'"):
        explain_latent(run, 0, chat, scorers=("detect",), cfg=CFG)
    assert chat.chats == [] and not (run / schema.INTERP_DIR).exists()
    _, result = drain(explain_latent(run, np.int64(255), chat, cfg=CFG))
    assert result.feature_id == 255


def test_a_dead_latent_is_recorded_skipped(built, run):
    chat = StreamingChat()
    pieces, result = drain(explain_latent(run, DEAD[0], chat, embedder=built["embedder"], cfg=CFG))
    assert pieces == [] and chat.chats == []
    assert (result.text, result.status, result.reason, result.scores, result.written) == (None, "skipped", SKIPPED_REASON,
                                                                                           {}, True)
    with InterpStore.open(run) as store:
        [row] = store.explanations(DEAD[0])
        assert (row.text, row.status, row.reason, row.explainer) == (None, "skipped", SKIPPED_REASON, "scripted")
        assert store.best([DEAD[0]]) == {}
    assert pq.read_table(parts(run)[0] / schema.SCORES).num_rows == 0


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_endpoint_failure_or_an_abandoned_stream_writes_nothing(built, run):
    dead = OpenAIChat(f"http://127.0.0.1:{closed_port()}/v1", "m", **FAST)
    pieces = explain_latent(run, 0, dead, embedder=built["embedder"], cfg=CFG)
    with pytest.raises(EndpointError, match="failed after 2 attempts"):
        next(pieces)
    assert not parts(run)

    chat = built["chat"]
    pieces = explain_latent(run, 0, chat, embedder=built["embedder"], cfg=CFG)
    next(pieces)
    pieces.close()  # the dashboard's user went elsewhere
    assert not parts(run) and not chat._lock.locked()
    with InterpStore.open(run) as store:
        assert store.explanations(0) == []
