"""``explain_run`` on a tiny finished run with scripted chat backends: resumable after an interrupt (nothing lost,
nothing duplicated, nothing redone), junk answers and dead latents recorded, runs that are not finished refused,
``--features`` parsing, and the baselines."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from engine import cli
from engine.interp import parts, prompts, schema
from engine.interp.data import RunExamples
from engine.interp.explain import (
    LABELS,
    SHUFFLED,
    ExplainConfig,
    explain_messages,
    explain_run,
    load_latents,
    parse_features,
    top_token_label,
)
from engine.interp.scorers import Excerpt
from engine.model.tokens import short_token
from engine.run import rundir
from engine.run import schema as run_schema
from tests.engine.interp_util import DEAD, ScriptedChat, build_run

SCORERS = ("detection", "fuzzing")
CFG = {"scorers": SCORERS, "batch_size": 4, "n_shown": 4, "n_heldout": 4, "pool_contexts": 32}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("interp_explain")
    return {"root": root, "run": build_run(root / "build")}


@pytest.fixture
def run(built, request):
    out = built["root"] / request.node.name.replace("[", "_").replace("]", "")
    shutil.copytree(built["run"], out)
    return out


def keys(table, names) -> list[tuple]:
    return list(zip(*(table[n].to_pylist() for n in names), strict=True))


def assert_unique_and_complete(run: Path, explainer: str, ids: list[int], scorers=SCORERS) -> None:
    ex = parts.read_all(run, schema.EXPLANATIONS)
    sc = parts.read_all(run, schema.SCORES)
    ex_keys = keys(ex, schema.KEYS[schema.EXPLANATIONS])
    sc_keys = keys(sc, schema.KEYS[schema.SCORES])
    assert len(ex_keys) == len(set(ex_keys)) and len(sc_keys) == len(set(sc_keys))
    for path, key in ((run / schema.EXPLANATIONS, schema.KEYS[schema.EXPLANATIONS]),
                      (run / schema.SCORES, schema.KEYS[schema.SCORES])):
        rows = keys(pq.read_table(path), key)
        assert len(rows) == len(set(rows)), f"{path.name} holds a key twice"
    assert sorted(f for f, who, _ in ex_keys if who == explainer) == sorted(ids)
    live = [f for f in ids if f not in DEAD]
    ok = {f for f, s in zip(ex["feature_id"].to_pylist(), ex["status"].to_pylist(), strict=True) if s == "ok"}
    assert ok == set(live)
    assert sorted((f, s) for f, who, _, s in sc_keys if who == explainer) == [(f, s) for f in live for s in sorted(scorers)]


# --- resumability ----------------------------------------------------------------------------------------------


def test_interrupted_explain_resumes_without_loss_duplication_or_rework(run):
    cfg = ExplainConfig(features="0-11", **CFG)
    first, seen = ScriptedChat(), []

    def interrupt_in_second_batch(fid, text):
        seen.append(fid)
        if len(seen) > 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        explain_run(run, first, cfg=cfg, progress=False, on_explanation=interrupt_in_second_batch)
    assert seen == [0, 1, 2, 3, 4]
    ex = parts.read_all(run, schema.EXPLANATIONS)
    assert ex["feature_id"].to_pylist() == [0, 1, 2, 3], "the first batch is kept, the one in flight is not"
    assert len(first.chats) == 4 + 3, "batch 2 (4-7, 5 dead) was explained before the interrupt"
    created = dict(zip(ex["feature_id"].to_pylist(), ex["created_at"].to_pylist(), strict=True))
    first_texts = dict(zip(ex["feature_id"].to_pylist(), ex["explanation"].to_pylist(), strict=True))
    (parts.parts_dir(run) / ".tmp-killed").mkdir()  # a batch killed while being written: never read
    (parts.parts_dir(run) / ".tmp-killed" / schema.EXPLANATIONS).write_bytes(b"half a file")

    second = ScriptedChat()
    stats = explain_run(run, second, cfg=cfg, progress=False)
    assert stats["already_done"] == 4 and stats["explained"] == 7 and stats["skipped"] == 1
    assert len(second.chats) == 7, "only the latents not done are explained again (5 is dead)"
    assert len(second.questions) == 7 * len(SCORERS) * 8
    assert_unique_and_complete(run, "scripted", list(range(12)))
    ex = parts.read_all(run, schema.EXPLANATIONS)
    again = dict(zip(ex["feature_id"].to_pylist(), ex["created_at"].to_pylist(), strict=True))
    assert all(again[f] == created[f] for f in range(4)), "the first batch's rows are the ones written first"
    assert all(ex["explanation"].to_pylist()[f] == first_texts[f] for f in range(4))
    assert not [p for p in parts.parts_dir(run).iterdir() if not p.name.startswith(".")], "parts are folded in"

    third = ScriptedChat()
    stats = explain_run(run, third, cfg=cfg, progress=False)
    assert stats["already_done"] == 12 and third.chats == [] and third.questions == []


def test_interrupt_while_scoring_loses_only_that_batch(run):
    class StopsInSecondScoringBatch(ScriptedChat):
        calls = 0

        def yes_probability(self, conversations):
            self.calls += 1
            if self.calls > len(SCORERS) * 4:  # one call per scorer and latent; batch 1 has four live latents
                raise KeyboardInterrupt
            return super().yes_probability(conversations)

    cfg = ExplainConfig(features="0-3,6-9", **CFG)
    with pytest.raises(KeyboardInterrupt):
        explain_run(run, StopsInSecondScoringBatch(), cfg=cfg, progress=False)
    assert parts.read_all(run, schema.EXPLANATIONS)["feature_id"].to_pylist() == [0, 1, 2, 3]
    assert sorted(set(parts.read_all(run, schema.SCORES)["feature_id"].to_pylist())) == [0, 1, 2, 3]
    again = ScriptedChat()
    explain_run(run, again, cfg=cfg, progress=False)
    assert len(again.chats) == 4
    assert_unique_and_complete(run, "scripted", [0, 1, 2, 3, 6, 7, 8, 9])


def test_rerun_without_an_embedder_is_complete(run):
    """``--no-embed`` with the default scorers: the embedding scorer cannot run, so a rerun must not count those
    latents as unfinished and ask the scorer model everything again."""
    cfg = ExplainConfig(features="0-3", scorers=("detection", "fuzzing", "embedding"), batch_size=4, n_heldout=4,
                        pool_contexts=32)
    explain_run(run, ScriptedChat(), embedder=None, cfg=cfg, progress=False)
    assert set(parts.read_all(run, schema.SCORES)["scorer"].to_pylist()) == {"detection", "fuzzing"}
    again = ScriptedChat()
    stats = explain_run(run, again, embedder=None, cfg=cfg, progress=False)
    assert stats["already_done"] == 4 and again.questions == [] and again.chats == []


def test_a_new_explainer_or_scorer_adds_rows_beside_the_old(run):
    cfg = ExplainConfig(features="0-3", **{**CFG, "scorers": ("detection",)})
    explain_run(run, ScriptedChat(name="a"), cfg=cfg, progress=False)
    explain_run(run, ScriptedChat(name="b", answer=lambda text: "another phrase"), cfg=cfg, progress=False)
    more = ScriptedChat(name="a")
    stats = explain_run(run, more, cfg=ExplainConfig(features="0-3", **CFG), progress=False)
    assert stats["already_done"] == 0 and more.chats == [], "explanations are kept, only scores are added"
    ex = parts.read_all(run, schema.EXPLANATIONS)
    assert sorted(keys(ex, ("explainer", "feature_id"))) == [(w, f) for w in "ab" for f in range(4)]
    sc = parts.read_all(run, schema.SCORES)
    assert sorted(keys(sc, ("explainer", "scorer", "feature_id"))) == sorted(
        [("a", s, f) for s in SCORERS for f in range(4)] + [("b", "detection", f) for f in range(4)])


# --- junk answers, dead latents --------------------------------------------------------------------------------


def test_junk_answers_fail_with_a_reason_dead_latents_are_skipped_and_the_run_goes_on(run):
    ids = [0, 1, 2, 3, 4, 5, 6, 7, 77, 8]
    answers = {
        0: "",
        1: "1234 !!! 56",
        2: "- he said that<< he>> would come",
        3: "Explanation: Third-person pronouns",
        4: "The marked tokens are: <<fox>> and <<dog>>",
        6: "\n\n  'Month names'  \nand a second line",
        7: " ".join(["word"] * 80),
        8: "<b>HTML</b> & <script>x</script> tags",
    }
    examples = RunExamples(run, before=12, after=4)
    try:
        lats = examples.latents(ids, n_shown=4, n_top_heldout=2, n_quantile_heldout=2)
    finally:
        examples.close()
    by_prompt = {explain_messages(lat)[-1]["content"]: answers[lat.feature_id] for lat in lats if lat.shown}
    assert len(by_prompt) == 8 and not [lat for lat in lats if not lat.shown and lat.feature_id not in DEAD]
    chat = ScriptedChat(answer=by_prompt.__getitem__)
    stats = explain_run(run, chat, cfg=ExplainConfig(features=",".join(map(str, ids)), **CFG), progress=False)
    assert (stats["explained"], stats["failed"], stats["skipped"]) == (4, 4, 2)
    rows = {r["feature_id"]: r for r in pq.read_table(run / schema.EXPLANATIONS).to_pylist()}
    for fid, why in ((0, "empty answer"), (1, "no words"), (2, "echoes the excerpts"), (4, "echoes the excerpts")):
        assert rows[fid]["status"] == "failed" and rows[fid]["explanation"] is None and why in rows[fid]["reason"], rows[fid]
    for fid in DEAD:
        assert rows[fid]["status"] == "skipped" and rows[fid]["explanation"] is None and "no examples" in rows[fid]["reason"]
    assert rows[3]["explanation"] == "Third-person pronouns" and rows[6]["explanation"] == "Month names"
    assert rows[7]["explanation"].endswith("...") and len(rows[7]["explanation"]) <= prompts.MAX_CHARS + 3
    assert rows[8]["explanation"] == answers[8], "markup is kept as text (the app escapes it)"
    assert all(rows[f]["status"] == "ok" and rows[f]["reason"] == "" for f in (3, 6, 7, 8))
    scored = {(r["feature_id"], r["scorer"]) for r in pq.read_table(run / schema.SCORES).to_pylist()}
    assert scored == {(f, s) for f in (3, 6, 7, 8) for s in SCORERS}


# --- refusals --------------------------------------------------------------------------------------------------

OFFLINE = ["--explainer", "http://127.0.0.1:9/v1", "--explainer-model", "m", "--no-embed", "--device", "cpu"]


def test_a_run_still_being_computed_is_refused(built, tmp_path, capsys):
    """A published snapshot (the manifest points into .snapshots/) is refused until precompute has finished."""
    out = tmp_path / "live"
    folder = out / rundir.SNAPSHOTS / "00000001"
    shutil.copytree(built["run"], folder)
    manifest = json.loads((folder / run_schema.MANIFEST).read_text())
    (folder / run_schema.MANIFEST).unlink()
    manifest["snapshot"]["final"] = False
    rundir.publish_snapshot(out, folder, manifest)
    with pytest.raises(ValueError, match="still being computed"):
        explain_run(out, ScriptedChat(), cfg=ExplainConfig(features="0-3", **CFG), progress=False)
    assert cli.main(["explain", str(out), *OFFLINE]) == 2
    assert "still being computed" in capsys.readouterr().err
    assert not (out / schema.INTERP_DIR).exists() and not (out / schema.EXPLANATIONS).exists()


def test_a_precompute_that_has_not_published_yet_is_called_that(tmp_path, capsys):
    out = tmp_path / "starting"
    (out / rundir.PARTIAL).mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no finished run yet"):
        explain_run(out, ScriptedChat(), cfg=ExplainConfig(**CFG), progress=False)
    assert cli.main(["explain", str(out), *OFFLINE]) == 2
    assert "once precompute has finished" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["empty", "missing", "file", "bad-manifest"])
def test_a_directory_that_is_not_a_run_is_refused(tmp_path, capsys, kind):
    path = tmp_path / "x"
    if kind == "empty":
        path.mkdir()
    elif kind == "file":
        path.write_text("not a run")
    elif kind == "bad-manifest":
        path.mkdir()
        (path / run_schema.MANIFEST).write_text("{not json")
    with pytest.raises((FileNotFoundError, ValueError), match="not a run directory|not valid JSON"):
        explain_run(path, ScriptedChat(), progress=False)
    assert cli.main(["explain", str(path), *OFFLINE]) == 2
    err = capsys.readouterr().err
    assert "saescope explain: error:" in err and str(path) in err and "Traceback" not in err


def test_bad_scorer_and_features_are_refused_before_any_work(run, capsys):
    chat = ScriptedChat()
    with pytest.raises(ValueError, match="unknown scorer 'detect'"):
        explain_run(run, chat, cfg=ExplainConfig(scorers=("detect",)), progress=False)
    for spec, message in (("300", "latent 300 does not exist"), ("20-10", "runs backwards"), ("top:5", "use all")):
        assert cli.main(["explain", str(run), "--features", spec, *OFFLINE]) == 2
        assert message in capsys.readouterr().err
    assert chat.chats == [] and not (run / schema.INTERP_DIR).exists()


# --- --features ------------------------------------------------------------------------------------------------


def test_parse_features():
    rng = np.random.default_rng(3)
    n = 40
    density = rng.random(n)
    density[[4, 9, 17]] = 0.0  # dead
    density[[1, 2]] = 0.5  # a tie: kept in id order
    max_act = rng.random(n) * 5
    max_act[[4, 9, 17]] = 0.0

    def parse(spec, seed=0):
        return parse_features(spec, n, density, max_act, seed)

    live = [i for i in range(n) if density[i] > 0]
    assert parse("all") == list(range(n)) and parse(" all ") == list(range(n))
    assert parse("3,10-20") == [3, *range(10, 21)]
    assert parse("7, 3,7,5-6 ,3") == [7, 3, 5, 6]
    assert parse("0-0") == [0] and parse("39") == [39]
    assert parse("densest:5") == sorted(live, key=lambda i: (-density[i], i))[:5]
    assert parse("densest:100") == sorted(live, key=lambda i: (-density[i], i)), "dead latents are left out"
    assert parse("active:7") == sorted(live, key=lambda i: (-max_act[i], i))[:7]
    assert parse("densest:0") == []
    pick = parse("random:10")
    assert len(pick) == 10 == len(set(pick)) and pick == sorted(pick) and set(pick) <= set(live)
    assert parse("random:10") == pick and parse("random:10", seed=1) != pick
    assert parse("random:1000") == live
    for bad, message in (("40", "latent 40 does not exist"), ("30-45", "latent 40 does not exist"),
                         ("20-10", "backwards"), ("", "use all"), ("abc", "use all"), ("3-", "use all"),
                         ("-3", "use all"), ("densest:", "use all"), ("densest:-1", "use all"), ("top:5", "use all"),
                         ("1,,2", "use all"), ("random:x", "use all")):
        with pytest.raises(ValueError, match=message):
            parse(bad)


# --- baselines -------------------------------------------------------------------------------------------------


def test_baselines_score_shuffled_explanations_and_labels(run):
    cfg = ExplainConfig(features="0-7", baselines=True, **CFG)
    stats = explain_run(run, ScriptedChat(), cfg=cfg, progress=False)
    live = [f for f in range(8) if f not in DEAD]
    assert stats["baselines"] == {SHUFFLED: len(live), LABELS: len(live)}
    ex = {(r["explainer"], r["feature_id"]): r for r in pq.read_table(run / schema.EXPLANATIONS).to_pylist()}
    own = {f: ex[("scripted", f)]["explanation"] for f in live}
    shuffled = {f: ex[(SHUFFLED, f)]["explanation"] for f in live}
    assert sorted(shuffled.values()) == sorted(own.values()) and all(shuffled[f] != own[f] for f in live)
    examples = RunExamples(run, before=cfg.before, after=cfg.after)
    try:
        lats = {lat.feature_id: lat for lat in load_latents(examples, live, cfg)}
    finally:
        examples.close()
    for f in live:  # the label of the explainer's excerpts: its tokens carry the most activation there
        mass: dict[str, float] = {}
        for e in lats[f].shown:
            for tok, a in zip(e.tokens, e.acts, strict=True):
                if a > 0:
                    mass[short_token(tok)] = mass.get(short_token(tok), 0.0) + a
        label = ex[(LABELS, f)]["explanation"].split(" / ")
        assert label[0] == max(mass, key=mass.get) and set(label) <= set(mass), f
    sc = parts.read_all(run, schema.SCORES)
    for who in (SHUFFLED, LABELS):
        got = sorted((f, s) for f, w, s in keys(sc, ("feature_id", "explainer", "scorer")) if w == who)
        assert got == [(f, s) for f in live if ex[(who, f)]["explanation"] for s in sorted(SCORERS)]
    again = explain_run(run, ScriptedChat(), cfg=cfg, progress=False)
    assert again["baselines"] == {SHUFFLED: 0, LABELS: 0}


def test_top_token_label_reads_only_the_excerpts_it_is_given():
    shown = [Excerpt(1, [" the", " Lord", " said"], [0.0, 2.0, 0.5], True), Excerpt(2, [" Lord", " God"], [1.0, 1.5], True)]
    held = [Excerpt(3, [" Pharaoh"], [9.0], True)]
    assert top_token_label(shown) == "Lord / God / said"  # masses 3.0, 1.5, 0.5; " the" never fired
    assert "Pharaoh" not in top_token_label(shown) and top_token_label(shown + held).startswith("Pharaoh")
    assert top_token_label(shown, n=1) == "Lord" and top_token_label([]) == ""


def test_top_token_baseline_never_holds_a_token_only_the_held_out_excerpts_have(run):
    """The run's own label is built from every example, held-out ones included; the baseline's is not."""
    cfg = ExplainConfig(features="0-31", baselines=True, **{**CFG, "scorers": (), "batch_size": 32})
    explain_run(run, ScriptedChat(), cfg=cfg, progress=False)
    ex = {(r["explainer"], r["feature_id"]): r["explanation"] for r in parts.read_all(run, schema.EXPLANATIONS).to_pylist()}
    run_labels = {r["feature_id"]: r["label"] for r in pq.read_table(run / run_schema.FEATURES).to_pylist()}
    examples = RunExamples(run, before=cfg.before, after=cfg.after)
    try:
        lats = load_latents(examples, [f for f in range(32) if f not in DEAD], cfg)
    finally:
        examples.close()
    leaks = 0
    for lat in lats:
        def active(excerpts):
            return {short_token(t) for e in excerpts for t, a in zip(e.tokens, e.acts, strict=True) if a > 0}
        held_only = active(lat.heldout) - active(lat.shown)
        label = set((ex.get((LABELS, lat.feature_id)) or "").split(" / "))
        assert not label & held_only, (lat.feature_id, label & held_only)
        leaks += bool(set(run_labels[lat.feature_id].split(" / ")) & held_only)
    assert leaks > 0, "the run's labels (all examples) hold held-out-only tokens for some latents: the test has teeth"


class SometimesOffFormat(ScriptedChat):
    """Answers one yes/no question in five off-format (a failed judgement), the rest as ``ScriptedChat``."""

    def judge(self, conversations, options=("0", "1"), budget=0):
        from engine.interp.judge import Judgement

        got = super().judge(conversations, options, budget)
        return [Judgement(None, 0.01, "Sure") if options == ("0", "1") and len(c[-1]["content"]) % 5 == 0 else j
                for c, j in zip(conversations, got, strict=True)]


def test_explain_records_quantiles_failed_judgements_and_the_intruder(run):
    from sklearn import metrics

    from engine.interp.report import report

    cfg = ExplainConfig(features="0-7", **{**CFG, "scorers": ("detection", "fuzzing", "intruder"), "n_heldout": 6,
                                           "batch_size": 8})
    explain_run(run, SometimesOffFormat(), cfg=cfg, progress=False)
    rows = parts.read_all(run, schema.SCORES).to_pylist()
    live = [f for f in range(8) if f not in DEAD]
    want = [(f, s) for f in live for s in ("detection", "fuzzing", "intruder")]
    assert sorted((r["feature_id"], r["scorer"]) for r in rows) == want
    n_q = rundir.read_manifest(run)["settings"]["quantile_bins"]
    failed = judged = 0
    for r in rows:
        d = json.loads(r["details"])
        if r["scorer"] == "intruder":
            assert r["n_examples"] == len(d["groups"]) and 1 <= len(d["groups"]) <= 5 and d["chance"] == 0.2
            assert all(len(g["context_ids"]) == 5 and 0 <= g["intruder"] < 5 for g in d["groups"])
            continue
        labels = np.array(d["labels"], bool)
        probs = np.array([np.nan if p is None else p for p in d["probabilities"]])
        ok = np.isfinite(probs)
        assert d["failed"] == (~ok).sum() and len(d["mass"]) == len(labels)
        failed, judged = failed + d["failed"], judged + len(labels)
        if labels[ok].all() or not labels[ok].any():
            assert r["score"] is None
        else:
            assert r["score"] == pytest.approx(metrics.balanced_accuracy_score(labels[ok], probs[ok] > 0.5))
        q = np.array(d["quantiles"])
        assert ((q >= 0) & (q < n_q))[labels].all() and (q[~labels] == -1).all()
        for key, value in d["by_quantile"].items():
            mine = (q == int(key)) & ok
            want = np.mean(probs[mine] > 0.5) if int(key) >= 0 else np.mean(probs[mine] <= 0.5)
            assert value == pytest.approx(want), key
    assert 0 < failed < judged, "the planted off-format answers are there, and not all"
    rep = report(run)["scripted"]
    assert rep["detection"]["failure_rate"] + rep["fuzzing"]["failure_rate"] > 0
    assert set(rep) == {"detection", "fuzzing", "intruder"} and rep["intruder"]["n"] == len(live)
