"""The scorers' arithmetic against independent implementations, what the fuzzing scorer marks, which excerpts the
explainer and the scorers see (re-derived from the run's files and the SAE run by hand), and the prompt text
helpers (``mark``, ``clean_explanation``)."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from engine.data.activations import stats_mask
from engine.interp import parts, prompts, schema, scorers
from engine.interp.data import RunExamples
from engine.interp.explain import ExplainConfig, explain_run, quiet_pool
from engine.interp.scorers import Excerpt, auroc, balanced_accuracy
from engine.run import rundir
from engine.run import schema as run_schema
from tests.engine.interp_util import DEAD, ScriptedChat, build_run

# --- balanced accuracy and AUROC -------------------------------------------------------------------------------


def rank_auroc(labels, scores) -> float:
    """AUROC as the Mann-Whitney U statistic from average ranks (ties share their mean rank)."""
    labels, scores = np.asarray(labels, bool), np.asarray(scores, float)
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    for value in np.unique(scores):
        tied = scores == value
        ranks[tied] = ranks[tied].mean()
    n_pos, n_neg = labels.sum(), (~labels).sum()
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def test_balanced_accuracy_by_hand():
    assert balanced_accuracy([1, 1, 1, 0, 0], [1, 0, 1, 0, 1]) == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert balanced_accuracy([1, 0, 0, 0], [1, 0, 0, 0]) == 1.0
    assert balanced_accuracy([1, 0, 0, 0], [0, 1, 1, 1]) == 0.0
    assert balanced_accuracy([1, 1, 0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]) == 0.5, "always yes is chance"
    assert math.isnan(balanced_accuracy([1, 1], [1, 0])) and math.isnan(balanced_accuracy([0, 0], [0, 0]))


def test_auroc_by_hand_with_ties_and_a_missing_class():
    assert auroc([1, 1, 0, 0], [0.9, 0.4, 0.5, 0.1]) == 0.75
    assert auroc([1, 0, 0], [0.5, 0.5, 0.2]) == 0.75, "a tie counts one half"
    assert auroc([1, 1, 0, 0], [0.3, 0.3, 0.3, 0.3]) == 0.5
    assert auroc([1, 0], [0.1, 0.9]) == 0.0 and auroc([0, 1], [0.1, 0.9]) == 1.0
    assert math.isnan(auroc([1, 1], [0.2, 0.3])) and math.isnan(auroc([0, 0, 0], [0.2, 0.3, 0.1]))


def test_auroc_and_balanced_accuracy_match_independent_implementations():
    rng = np.random.default_rng(0)
    for trial in range(200):
        n = int(rng.integers(2, 40))
        labels = rng.random(n) < rng.uniform(0.1, 0.9)
        if labels.all() or not labels.any():
            labels[0] = not labels[0]
        scores = rng.integers(0, 5, n) / 4 if trial % 2 else rng.random(n)  # half the trials are full of ties
        assert auroc(labels, scores) == pytest.approx(rank_auroc(labels, scores), abs=1e-12)
        pred = rng.random(n) < 0.5
        tpr = np.mean(pred[labels])
        tnr = np.mean(~pred[~labels])
        assert balanced_accuracy(labels, pred) == pytest.approx((tpr + tnr) / 2, abs=1e-12)


def test_against_scikit_learn():
    from sklearn import metrics  # in the test extra: an independent implementation
    rng = np.random.default_rng(1)
    for _ in range(50):
        labels = rng.random(30) < 0.4
        labels[:2] = [True, False]
        scores = rng.integers(0, 6, 30).astype(float)
        assert auroc(labels, scores) == pytest.approx(metrics.roc_auc_score(labels, scores))
        pred = rng.random(30) < 0.5
        assert balanced_accuracy(labels, pred) == pytest.approx(metrics.balanced_accuracy_score(labels, pred))


# --- what the classifier scorers ask and how they score -------------------------------------------------------

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def excerpt(cid: int, acts: list[float], activating: bool = True) -> Excerpt:
    return Excerpt(cid, [LETTERS[i] for i in range(len(acts))], acts, activating)


def read_marks(marked: str) -> tuple[str, list[bool]]:
    """Letters and whether each is between << and >> (tokens here are single letters)."""
    letters, flags, inside = [], [], False
    for part in re.split(r"(<<|>>)", marked):
        if part in ("<<", ">>"):
            assert inside == (part == ">>"), f"unbalanced marks in {marked!r}"
            inside = part == "<<"
            continue
        letters += list(part)
        flags += [inside] * len(part)
    assert not inside
    return "".join(letters), flags


def excerpt_of(question: str) -> str:
    return re.search(r"Excerpt: (.*)\n\n", question).group(1)


def test_fuzzing_marks_active_tokens_and_as_many_random_ones():
    active = [excerpt(1, [0, 0.3, 0, 0.2, 0.1, 0, 0, 0]), excerpt(2, [0, 0, 1.0, 0.5, 0, 0, 0, 0])]  # 3 and 2 active
    quiet = [excerpt(10 + i, [0.0] * 8, activating=False) for i in range(6)]
    backend = ScriptedChat()
    score = scorers.fuzzing(backend, "letters", active + quiet, seed=7)
    marks = [read_marks(excerpt_of(q)) for q in backend.questions]
    assert [m[0] for m in marks] == ["ABCDEFGH"] * 8
    assert marks[0][1] == [a > 0 for a in active[0].acts] and marks[1][1] == [a > 0 for a in active[1].acts]
    assert all(sum(flags) == math.ceil((3 + 2) / 2) for _, flags in marks[2:]), "ceil of the mean active count"
    assert all(flags[1] for _, flags in marks[2:]), "one mark where the maxima sit (argmax 1 and 2: the first wins)"
    assert len({tuple(flags) for _, flags in marks[2:]}) > 1, "random positions"
    again = ScriptedChat()
    scorers.fuzzing(again, "letters", active + quiet, seed=7)
    assert again.questions == backend.questions, "the seed fixes the random marks"
    probs = backend.yes_probability([[{"role": "user", "content": q}] for q in backend.questions])
    labels = np.array([True, True] + [False] * 6)
    assert score.scorer == "fuzzing" and score.n_examples == 8
    assert score.details["labels"] == labels.astype(int).tolist() and score.details["context_ids"] == [1, 2, *range(10, 16)]
    assert score.score == pytest.approx((np.mean(np.array(probs[:2]) > 0.5) + np.mean(np.array(probs[2:]) <= 0.5)) / 2)
    assert score.details["auroc"] == pytest.approx(rank_auroc(labels, probs))


def test_fuzz_marks_never_exceed_the_excerpt_and_threshold_is_relative():
    rng = np.random.default_rng(0)
    assert scorers.fuzz_marks(excerpt(0, [0.0] * 3, activating=False), 10, rng) == [True] * 3
    assert scorers.fuzz_marks(excerpt(0, [0, 1.0, 0.4, 0.6]), 0, rng, threshold=0.5) == [False, True, False, True]
    # delphi's default: >= 0.3 x the excerpt's own maximum (0.3 itself included), never a silent token
    assert scorers.fuzz_marks(excerpt(0, [0.29, 1.0, 0.3, 0.0, 0.05]), 0, rng) == [False, True, True, False, False]
    assert scorers.fuzz_marks(excerpt(0, [0.0] * 5, activating=False), 1, rng, at=9) == [False] * 4 + [True]
    quiet = scorers.fuzz_marks(excerpt(0, [0.0] * 6, activating=False), 3, rng, at=2)
    assert sum(quiet) == 3 and quiet[2]


def test_by_quantile_by_hand():
    labels = np.array([1, 1, 1, 1, 0, 0, 0], bool)
    quantiles = np.array([0, 0, 3, 3, -1, -1, -1])
    probs = np.array([0.9, 0.6, 0.4, np.nan, 0.2, 0.7, 0.1])
    got = scorers.by_quantile("detection", labels, probs, quantiles)
    assert got == {"0": 1.0, "3": 0.0, "-1": pytest.approx(2 / 3)}, "the failed excerpt is left out"
    sims = np.array([0.9, 0.1, 0.5, 0.6, 0.3, 0.2, 0.0])
    got = scorers.by_quantile("embedding", labels, sims, quantiles)
    assert got == {"0": pytest.approx(rank_auroc([1, 1, 0, 0, 0], [0.9, 0.1, 0.3, 0.2, 0.0])), "3": 1.0}


def test_detection_asks_each_excerpt_once_and_scores_balanced_accuracy():
    excerpts = [excerpt(1, [0, 1.0, 0]), excerpt(2, [0.2, 0, 0, 0]), excerpt(3, [0.0] * 5, False), excerpt(4, [0.0] * 2, False)]
    backend = ScriptedChat()
    score = scorers.detection(backend, "my <b>explanation</b>", excerpts)
    assert [excerpt_of(q) for q in backend.questions] == ["ABC", "ABCD", "ABCDE", "AB"]
    assert all(q.startswith("Feature: my <b>explanation</b>\n") and "<<" not in q for q in backend.questions)
    probs = np.array(score.details["probabilities"])
    assert score.score == pytest.approx(balanced_accuracy([1, 1, 0, 0], probs > 0.5))


def test_embedding_scores_auroc_of_cosines():
    class CharEmbedder:
        name = "chars"

        def encode(self, texts):
            out = np.zeros((len(texts), 26), np.float32)
            for i, t in enumerate(texts):
                for ch in t.upper():
                    if ch in LETTERS:
                        out[i, LETTERS.index(ch)] += 1
            return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)

    ex = [Excerpt(1, ["AB", "C"], [1, 0], True), Excerpt(2, ["XYZ"], [0], False), Excerpt(3, ["A"], [0], False)]
    score = scorers.embedding(CharEmbedder(), "abc", ex)
    sims = CharEmbedder().encode(["ABC", "XYZ", "A"]) @ CharEmbedder().encode(["abc"])[0]
    assert score.details["similarities"] == pytest.approx(sims.round(4).tolist())
    assert score.score == pytest.approx(rank_auroc([1, 0, 0], sims)) == 1.0


# --- which excerpts the explainer and the scorers see ----------------------------------------------------------


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """Every latent's excerpts, the non-activating pool, and the SAE codes recomputed on the pool contexts."""
    run = build_run(tmp_path_factory.mktemp("interp_split") / "build")
    # the pool in float32 like the codes below: "auto" picks bf16 where this CPU runs it faster, and a TopK near-tie
    # then admits another latent
    cfg = ExplainConfig(pool_contexts=64, device="cpu", dtype="float32")
    examples = RunExamples(run, before=cfg.before, after=cfg.after)
    manifest = rundir.read_manifest(run)
    pool = quiet_pool(run, manifest, examples, cfg)
    from engine.model.loading import load_model
    from engine.saes import load_sae

    lm = load_model(manifest["model"]["name"], device="cpu", dtype="float32")
    sae = load_sae(manifest["sae"]["path"])
    contexts = examples.contexts([int(i) for i in pool.ids])
    ids = torch.tensor([contexts[int(i)] for i in pool.ids])
    hook = manifest["sae"]["hook"]
    with torch.inference_mode():
        codes = sae.encode(lm.capture(ids, hook)[hook].float()).numpy()
    counted = stats_mask(ids, lm.special_token_ids).numpy()  # the run counts no first token and no special token
    yield {"run": run, "cfg": cfg, "examples": examples, "pool": pool, "contexts": contexts, "codes": codes,
           "counted": counted, "rows": {int(c): r for r, c in enumerate(pool.ids)}}
    examples.close()


def test_sampling_top_explainer_sees_even_ranks_scorers_odd_ranks_and_quantiles_never_the_same_context(split):
    run, examples = split["run"], split["examples"]
    table = pq.read_table(run / run_schema.EXAMPLES).to_pylist()
    lats = examples.latents(list(range(256)), n_shown=4, n_top_heldout=3, n_quantile_heldout=4, sampling="top")
    assert [lat.feature_id for lat in lats] == list(range(256))
    for lat in lats:
        rows = [r for r in table if r["feature_id"] == lat.feature_id]
        top = sorted((r for r in rows if r["kind"] == "top"), key=lambda r: r["rank"])
        if lat.feature_id in DEAD:
            assert not rows and not lat.shown and not lat.heldout
            continue
        shown = [e.context_id for e in lat.shown]
        held = [e.context_id for e in lat.heldout]
        assert shown == [r["context_id"] for r in top[0::2]][:4]
        assert not set(shown) & set(held) and len(set(held)) == len(held)
        odd = [r["context_id"] for r in top[1::2] if r["context_id"] not in shown][:3]
        assert held[: len(odd)] == odd
        quant = [r for r in rows if r["kind"] == "quantile" and r["context_id"] not in shown + odd]
        bins = sorted({r["quantile_bin"] for r in quant}, reverse=True)
        assert len(held) - len(odd) == min(4, len(bins))
        assert all(e.activating and max(e.acts) > 0 for e in lat.shown + lat.heldout)
        for e, r in zip(lat.shown, top[0::2], strict=False):  # the window holds the maximum and fits before/after
            assert max(e.acts) == pytest.approx(r["max_act"]) and len(e.tokens) <= examples.before + examples.after + 1


def test_non_activating_excerpts_never_fire_and_are_not_contexts_the_explainer_saw(split):
    examples, pool, contexts, codes = split["examples"], split["pool"], split["contexts"], split["codes"]
    width = examples.before + examples.after + 1
    checked = 0
    for lat in examples.latents([i for i in range(0, 256, 3)], n_shown=8, n_top_heldout=5, n_quantile_heldout=5):
        if not lat.shown:
            continue
        quiet = examples.quiet_excerpts(pool, lat.feature_id, len(lat.heldout), seed=0,
                                        exclude={e.context_id for e in lat.shown})
        assert len(quiet) == len(lat.heldout) and len({e.context_id for e in quiet}) == len(quiet)
        for e in quiet:
            assert not e.activating and e.acts == [0.0] * width and e.context_id not in {s.context_id for s in lat.shown}
            row = split["rows"][e.context_id]
            text = [examples.vocab[t] for t in contexts[e.context_id]]
            starts = [s for s in range(1, len(text) - width + 1) if text[s : s + width] == e.tokens]
            assert starts, "the excerpt is a window of its context, not starting at position 0"
            for s in starts:
                fires = (codes[row, s : s + width, lat.feature_id] > 0) & split["counted"][row, s : s + width]
                assert not fires.any(), (lat.feature_id, e.context_id, s)
            checked += 1
    assert checked > 300


def test_explain_scores_no_context_the_explainer_saw(split):
    run, cfg = split["run"], split["cfg"]
    cfg = ExplainConfig(**{**cfg.__dict__, "features": "0-63", "scorers": ("detection",), "n_shown": 8, "n_heldout": 10})
    explain_run(run, ScriptedChat(), cfg=cfg, progress=False)
    shown = {lat.feature_id: {e.context_id for e in lat.shown}
             for lat in split["examples"].latents(list(range(64)), n_shown=8, n_top_heldout=5, n_quantile_heldout=5)}
    rows = parts.read_all(run, schema.SCORES).to_pylist()
    assert len(rows) == 64 - len([d for d in DEAD if d < 64])
    for row in rows:
        details = json.loads(row["details"])
        assert details["labels"].count(1) == details["labels"].count(0) >= 5
        assert not set(details["context_ids"]) & shown[row["feature_id"]], row["feature_id"]


def test_pool_records_every_firing_of_the_sae_on_its_contexts(split):
    pool, codes, counted = split["pool"], split["codes"], split["counted"]
    expected = np.argwhere((codes > 0) & counted[:, :, None])  # (row, position, latent)
    got = np.stack([pool.where // pool.ctx_len, pool.where % pool.ctx_len, pool.latents], 1)
    assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, expected.tolist()))
    assert np.all(np.diff(pool.latents) >= 0)


# --- prompt text -----------------------------------------------------------------------------------------------


def test_mark_wraps_each_run_of_marked_tokens():
    toks = ["a", " b", " c", " d", " e"]
    assert prompts.mark(toks, [False] * 5) == "a b c d e"
    assert prompts.mark(toks, [True] * 5) == "<<a b c d e>>"
    assert prompts.mark(toks, [True, True, False, True, False]) == "<<a b>> c<< d>> e"
    assert prompts.mark(toks, [False, False, False, True, True]) == "a b c<< d e>>"
    assert prompts.mark([], []) == ""
    with pytest.raises(ValueError):
        prompts.mark(toks, [True])


def test_mark_keeps_hostile_text_as_is():
    toks = ["<script>", "alert(1)", "</script>", " <<", ">>", " &amp;"]
    assert prompts.mark(toks, [True, False, False, True, True, False]) == "<<<script>>>alert(1)</script><< <<>>>> &amp;"
    assert prompts.mark(toks, [False] * 6) == "".join(toks)


def test_clean_explanation():
    ok = {
        "Month names in dates": "Month names in dates",
        "  Explanation: Month names\nsecond line": "Month names",
        "explanation - Month names": "Month names",
        "[EXPLANATION]: pronouns": "pronouns",
        "The marked tokens are: pronouns": "pronouns",
        "The feature is the word 'the'": "the word 'the'",
        "\"Quoted phrase\"": "Quoted phrase",
        "**bold answer**": "bold answer",
        "\n\n   code keywords  ": "code keywords",
        "<b>HTML</b> tags": "<b>HTML</b> tags",
        "Numbers (0-9)": "Numbers (0-9)",
        "'he' and 'she'": "'he' and 'she'",
        "`code` spans": "`code` spans",
        "'Month names": "Month names",
        "`identifiers`": "identifiers",
        "*emphasis*": "emphasis",
    }
    for answer, expected in ok.items():
        assert prompts.clean_explanation(answer) == (expected, ""), answer
    junk = {
        "": "empty answer", "   \n\n ": "empty answer", "Explanation:": "empty answer", "''": "empty answer",
        "1234 56": "no words", "!!": "no words", "a1": "no words",
        "the<< fox>> jumps": "echoes", "- he said that he would come": "echoes", "Text: the word": "echoes",
        "Marked tokens: 'he'": "echoes", "Describe the feature in a few words.": "echoes", "x >> y words": "echoes",
    }
    for answer, why in junk.items():
        text, reason = prompts.clean_explanation(answer)
        assert text is None and why in reason, (answer, reason)
    long, _ = prompts.clean_explanation("word " * 100)
    assert long.endswith("...") and len(long) <= prompts.MAX_CHARS + 3 and not long[:-3].endswith(" ")


def test_sampling_quantiles_spreads_both_sides_over_the_activation_range(split):
    """delphi-style: each excerpt's quantile is its context's maximum's interval of [0, the latent's maximum]
    counted from the top; the scorers take one excerpt per quantile before any quantile gives a second; the
    explainer sees the range too, never a context the scorers test on; the draw is seeded by the latent."""
    run, examples = split["run"], split["examples"]
    table = pq.read_table(run / run_schema.EXAMPLES).to_pylist()
    n_q = rundir.read_manifest(run)["settings"]["quantile_bins"]
    ids = [f for f in range(0, 256, 2) if f not in DEAD]
    lats = examples.latents(ids, n_shown=6, n_top_heldout=3, n_quantile_heldout=3, sampling="quantiles", seed=3)
    spread = 0
    for lat in lats:
        rows = [r for r in table if r["feature_id"] == lat.feature_id]
        peak = max(r["max_act"] for r in rows)
        quantile: dict[int, int] = {}
        for r in sorted(rows, key=lambda r: r["kind"] != "top"):  # a context keeps its first (top) row's quantile
            if r["kind"] == "top":
                q = n_q - 1 - min(int(r["max_act"] / peak * n_q), n_q - 1)
            else:
                q = n_q - 1 - r["quantile_bin"]
            quantile.setdefault(r["context_id"], q)
        shown, held = lat.shown, lat.heldout
        assert not {e.context_id for e in shown} & {e.context_id for e in held}
        assert all(e.quantile == quantile[e.context_id] for e in shown + held)
        available = sorted(set(quantile.values()))
        want = min(6, len(quantile))
        assert len(held) == want and len(shown) == min(6, len(quantile) - want)
        got = [e.quantile for e in held]
        if len(available) >= 6:
            assert sorted(got) == available[:6], "one per quantile, from the highest down"
        else:
            assert set(got) == set(available)
        spread += len({e.quantile for e in shown}) > 1
    assert spread > len(lats) // 2, "the explainer sees more than one quantile"
    again = examples.latents(ids[:4], n_shown=6, n_top_heldout=3, n_quantile_heldout=3, sampling="quantiles", seed=3)
    assert [[e.context_id for e in lat.heldout] for lat in again] == [[e.context_id for e in lat.heldout] for lat in lats[:4]]


# --- the intruder check ----------------------------------------------------------------------------------------


def planted_latent(n_top: int = 20, n_quiet: int = 6):
    """Top excerpts spelled in capitals (their maximum at position 2), quiet ones in lower case."""
    top = [Excerpt(i, list("ABCDE"), [0.0, 0.2 * (1 + i), 1.0 + i, 0.5 * (1 + i), 0.0], True, 0, 0) for i in range(n_top)]
    quiet = [Excerpt(100 + i, list("vwxyz"), [0.0] * 5, False, 3) for i in range(n_quiet)]
    return top, quiet


class IntruderJudge(ScriptedChat):
    """Names the excerpt in lower case (a judge that sees the intruder), or always the first one."""

    def __init__(self, sees: bool):
        super().__init__()
        self.sees = sees

    def judge(self, conversations, options=("0", "1"), budget=0):
        from engine.interp.judge import Judgement

        out = []
        for c in conversations:
            self.questions.append(c[-1]["content"])
            lines = re.findall(r"Excerpt (\d): (.*)", c[-1]["content"])
            k = next(i for i, (_, text) in enumerate(lines) if text.replace("<<", "").replace(">>", "").islower()) \
                if self.sees else 0
            out.append(Judgement(tuple(float(i == k) for i in range(len(options))), 1.0, options[k]))
        return out


def test_intruder_groups_marks_and_score_by_hand():
    from engine.interp import intruder

    top, quiet = planted_latent()
    seeing = IntruderJudge(sees=True)
    score = intruder.intruder(seeing, top, quiet, seed=[0, 7])
    assert score.scorer == "intruder" and score.n_examples == 5 and score.score == 1.0
    groups = score.details["groups"]
    members = [cid for g in groups for i, cid in enumerate(g["context_ids"]) if i != g["intruder"]]
    assert len(members) == len(set(members)) == 20 and set(members) <= set(range(20)), "4 distinct top excerpts each"
    assert [g["context_ids"][g["intruder"]] for g in groups] == [100, 101, 102, 103, 104]
    for q in seeing.questions:  # activating marks >= 0.3 x max (positions 2 and 3); the intruder: as many, one at 2
        for _, text in re.findall(r"Excerpt (\d): (.*)", q):
            letters, flags = read_marks(text)
            assert sum(flags) == 2 and flags[2], text
            if letters.isupper():
                assert flags == [False, False, True, True, False]
    first = IntruderJudge(sees=False)
    again = intruder.intruder(first, top, quiet, seed=[0, 7])
    assert again.details["groups"] == [{**g, "choice": 0} for g in groups], "seeded: the same groups"
    assert again.score == pytest.approx(np.mean([g["intruder"] == 0 for g in groups]))
    other = intruder.intruder(IntruderJudge(sees=True), top, quiet, seed=[0, 8])
    assert other.details["groups"] != groups, "another latent, another draw"
    assert math.isnan(intruder.intruder(seeing, top[:3], quiet, seed=0).score), "fewer than 4 top excerpts: no group"


def test_intruder_failed_judgements_are_counted_not_scored():
    from engine.interp import intruder
    from engine.interp.judge import Judgement

    class HalfFails(IntruderJudge):
        def judge(self, conversations, options=("0", "1"), budget=0):
            got = super().judge(conversations, options, budget)
            return [j if i % 2 else Judgement(None, 0.1, "Sure") for i, j in enumerate(got)]

    top, quiet = planted_latent()
    score = intruder.intruder(HalfFails(sees=True), top, quiet, seed=1)
    assert score.score == 1.0 and score.details["failed"] == 3 and score.details["failure_rate"] == pytest.approx(3 / 5)
    assert [g["choice"] is None for g in score.details["groups"]] == [True, False, True, False, True]
