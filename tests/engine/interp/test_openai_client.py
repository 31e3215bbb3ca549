"""The OpenAI-compatible client (``OpenAIChat``) against endpoints that fail, stall or misbehave: what is retried,
what is not, timeouts, bounded concurrency, the API key it sends, and how a judge's answers are read (``judge``:
log-probabilities, a budget, failed judgements)."""

from __future__ import annotations

import math
import re
import socket
import threading
import time

import numpy as np
import pytest

from engine.interp import backends
from engine.interp.backends import KEY_ENV, EndpointError, OpenAIChat
from tests.engine.interp.http_util import CONV, FAST, closed_port
from tests.engine.interp_util import ScriptedEndpoint, completion


def test_http_400_is_not_retried():
    with ScriptedEndpoint([(400, {"error": {"message": "no such model"}})]) as ep:
        with pytest.raises(EndpointError, match="refused.*HTTP 400.*no such model"):
            OpenAIChat(ep.url, "m", retries=3, backoff=0.01).chat([CONV])
        assert len(ep.requests) == 1


@pytest.mark.parametrize("status", [503, 429, 500])
def test_transient_errors_are_retried(status):
    with ScriptedEndpoint([(status, {"error": "busy"}), (200, completion("a short phrase"))]) as ep:
        assert OpenAIChat(ep.url, "m", retries=3, backoff=0.01).chat([CONV]) == ["a short phrase"]
        assert len(ep.requests) == 2
        assert ep.requests[0]["json"] == ep.requests[1]["json"]


def test_persistent_failure_gives_up_after_the_retries():
    with ScriptedEndpoint([(503, {"error": "down"})]) as ep:
        with pytest.raises(EndpointError, match="failed after 3 attempts: HTTP 503"):
            OpenAIChat(ep.url, "m", retries=2, backoff=0.01).chat([CONV])
        assert len(ep.requests) == 3


@pytest.mark.parametrize("body, match", [(b"<html>oops</html>", "invalid JSON"), ({"choices": []}, "without choices"),
                                         ({"object": "error"}, "without choices")])
def test_malformed_replies_are_endpoint_errors(body, match):
    with ScriptedEndpoint([(200, body)]) as ep:
        with pytest.raises(EndpointError, match=match):
            OpenAIChat(ep.url, "m", retries=1, backoff=0.01).chat([CONV])


def test_unreachable_endpoint_fails_fast():
    started = time.perf_counter()
    with pytest.raises(EndpointError, match="failed after 3 attempts"):
        OpenAIChat(f"http://127.0.0.1:{closed_port()}/v1", "m", **FAST).chat([CONV] * 8)
    assert time.perf_counter() - started < 3


def test_a_server_that_does_not_speak_http_is_an_endpoint_error():
    """Pointing --explainer at the wrong port (say, an SSH or database server) is a clear error, not a traceback."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        stop = threading.Event()

        def babble():
            listener.settimeout(0.2)
            while not stop.is_set():
                try:
                    conn, _ = listener.accept()
                except OSError:
                    continue
                with conn:
                    conn.recv(65536)
                    conn.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")

        thread = threading.Thread(target=babble, daemon=True)
        thread.start()
        try:
            with pytest.raises(EndpointError):
                OpenAIChat(f"http://127.0.0.1:{listener.getsockname()[1]}/v1", "m", **FAST).chat([CONV])
        finally:
            stop.set()
            thread.join()


def test_timeouts_are_retried_then_fail():
    with ScriptedEndpoint([(200, completion("late"))], delay=0.6) as ep:
        started = time.perf_counter()
        with pytest.raises(EndpointError, match="failed after 2 attempts"):
            OpenAIChat(ep.url, "m", retries=1, backoff=0.01, timeout=0.2).chat([CONV])
        assert time.perf_counter() - started < 1.5


def test_concurrency_is_bounded_and_order_kept():
    echo = (200, lambda req: completion(req["messages"][-1]["content"].upper()))
    with ScriptedEndpoint([echo], delay=0.15) as ep:
        convs = [[{"role": "user", "content": f"c{i}"}] for i in range(12)]
        assert OpenAIChat(ep.url, "m", concurrency=3).chat(convs) == [f"C{i}" for i in range(12)]
        assert ep.max_in_flight == 3


def test_api_key_is_sent_as_bearer(monkeypatch):
    with ScriptedEndpoint([(200, completion("x"))]) as ep:
        for name in (KEY_ENV, backends.TOKEN_ENV, "OPENAI_API_KEY"):
            monkeypatch.delenv(name, raising=False)
        OpenAIChat(ep.url, "m").chat([CONV])
        monkeypatch.setenv("OPENAI_API_KEY", "sk-openai")  # meant for OpenAI's API, not for this endpoint
        OpenAIChat(ep.url, "m").chat([CONV])
        monkeypatch.setenv(backends.TOKEN_ENV, "llm-server-token")
        OpenAIChat(ep.url, "m").chat([CONV])
        monkeypatch.setenv(KEY_ENV, "sk-saescope")
        OpenAIChat(ep.url, "m").chat([CONV])
        OpenAIChat(ep.url, "m", api_key="sk-explicit").chat([CONV])
        auth = [{k.lower(): v for k, v in r["headers"].items()}.get("authorization") for r in ep.requests]
        assert auth == [None, None, "Bearer llm-server-token", "Bearer sk-saescope", "Bearer sk-explicit"]
        assert all(r["path"] == "/v1/chat/completions" and r["json"]["model"] == "m" for r in ep.requests)


def lp(*pairs):
    """A one-token reply's ``logprobs``: its token is the first pair's."""
    return {"content": [{"token": pairs[0][0], "logprob": pairs[0][1],
                         "top_logprobs": [{"token": t, "logprob": v} for t, v in pairs]}]}


def test_yes_probability_reads_top_logprobs_else_an_exact_digit_else_fails():
    replies = [
        completion("1", lp(("1", math.log(0.6)), (" 1", math.log(0.1)), ("0", math.log(0.2)), ("x", math.log(0.1)))),
        completion("0"),
        completion(" 1"),
        completion("maybe"),
        completion("x", lp(("x", -0.1), ("y", -3.0))),
        completion("x", lp(("x", math.log(0.5)), ("1", math.log(0.3)), ("0", math.log(0.1)))),
    ]
    with ScriptedEndpoint([(200, lambda req: replies[int(req["messages"][-1]["content"])])]) as ep:
        convs = [[{"role": "user", "content": str(i)}] for i in range(6)]
        got = OpenAIChat(ep.url, "m").judge(convs)
        assert [j.yes() for j in got[:3]] == pytest.approx([0.7 / 0.9, 0.0, 1.0])
        assert [j.mass for j in got] == pytest.approx([0.9, None, None, None, 0.0, 0.4])
        assert [j.failed for j in got] == [False, False, False, True, True, True], "off-format is failed, not 0.5"
        assert np.isnan(OpenAIChat(ep.url, "m").yes_probability(convs[3:4])).all()
        req = ep.requests[0]["json"]
        assert req["max_tokens"] == 1 and req["logprobs"] is True and req["top_logprobs"] >= 2 and req["temperature"] == 0
        assert len(ep.requests) == 7, "no budget: one request per question"


def test_a_reasoning_judge_gets_a_budget_and_its_final_answer_is_read():
    """First token ``<think>`` (off-format): asked again with the budget, the digit after the thinking counts."""
    def reply(req):
        text = req["messages"][-1]["content"]
        if req["max_tokens"] == 1:
            return completion("<think>", lp(("<think>", math.log(0.9)), ("1", math.log(0.02)), ("0", math.log(0.01))))
        return completion({"a": "<think>is it 1? or 0</think>\nThe answer is 0.",
                           "b": "<think>I weigh 1 against 0 and run out of tokens",
                           "c": "The feature is present: 1",
                           "d": "I cannot tell."}[text])

    with ScriptedEndpoint([(200, reply)]) as ep:
        got = OpenAIChat(ep.url, "m").judge([[{"role": "user", "content": c}] for c in "abcd"], budget=64)
        assert [j.yes() for j in got] == [0.0, None, 1.0, None]
        assert all(j.mass == pytest.approx(0.03) for j in got), "the mass is the first token's P(0) + P(1)"
        second = [r["json"] for r in ep.requests if r["json"]["max_tokens"] != 1]
        assert len(second) == 4 and all(r["max_tokens"] == 64 and "logprobs" not in r for r in second)


def test_final_answer_parsing_by_hand():
    from engine.interp.judge import final_answer

    yes_no = ("0", "1")
    cases = {"1": 1, " 0\n": 0, "Answer: 1.": 1, "1 or 0? I say 0": 0, "<think>1</think>0": 0, "<think>0</think>": None,
             "<think>1": None, "10 tokens": None, "version 1.5": None, "x1": None, "(1)": 1, "[RESPONSE]: 1": 1}
    for text, want in cases.items():
        assert final_answer(text, yes_no) == want, text
    assert final_answer("Excerpt 3 is the intruder", ("1", "2", "3", "4", "5")) == 2
    assert final_answer("Excerpt 7", ("1", "2", "3", "4", "5")) is None


def test_detection_counts_off_format_answers_as_failed_and_scores_the_rest():
    """Planted answers per excerpt over a real HTTP endpoint: balanced accuracy and AUROC of the answered ones by
    hand, the failure rate, and each excerpt's P(0) + P(1)."""
    from engine.interp import scorers

    plan = {"AAA": (0.9, 0.95), "BBB": (0.4, 0.9), "CCC": None, "DDD": (0.2, 0.5), "EEE": (0.7, 0.8), "FFF": None}
    labels = [True, True, True, False, False, False]

    def reply(req):
        text = re.search(r"Excerpt: (\w+)", req["messages"][-1]["content"]).group(1)
        if plan[text] is None:
            return completion("Sure", lp(("Sure", math.log(0.8)), ("1", math.log(0.05)), ("0", math.log(0.05))))
        p1, mass = plan[text]
        token = "1" if p1 > 0.5 else "0"
        return completion(token, lp((token, math.log(mass * max(p1, 1 - p1))), ("1" if token == "0" else "0",
                                                                                 math.log(mass * min(p1, 1 - p1)))))

    excerpts = [scorers.Excerpt(i, [t], [1.0 if a else 0.0], a, 0, 0 if a else -1)
                for i, (t, a) in enumerate(zip(plan, labels, strict=True))]
    with ScriptedEndpoint([(200, reply)]) as ep:
        score = scorers.detection(OpenAIChat(ep.url, "m"), "letters", excerpts)
    # answered: AAA (1, p .9), BBB (1, p .4 -> judged 0), DDD (0, p .2), EEE (0, p .7 -> judged 1)
    assert score.score == pytest.approx((1 / 2 + 1 / 2) / 2)
    assert score.details["auroc"] == pytest.approx(3 / 4)  # pairs (.9,.2) (.9,.7) (.4,.2) right, (.4,.7) wrong
    assert score.details["failed"] == 2 and score.details["failure_rate"] == pytest.approx(2 / 6)
    assert score.details["probabilities"] == pytest.approx([0.9, 0.4, None, 0.2, 0.7, None])
    assert score.details["mass"] == pytest.approx([0.95, 0.9, 0.1, 0.5, 0.8, 0.1])


def test_make_backend_needs_a_model_name_for_an_endpoint():
    with pytest.raises(ValueError, match="--explainer-model"):
        backends.make_backend("http://127.0.0.1:1/v1")
    assert isinstance(backends.make_backend("http://127.0.0.1:1/v1/", model="m"), OpenAIChat)
