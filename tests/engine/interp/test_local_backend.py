"""The local backend's stream (``LocalChat.stream``): its pieces join to the chat answer, closing it early frees the
model, and a failure in the generating thread reaches the consumer after the pieces made before it."""

from __future__ import annotations

import threading

import pytest
import torch

from tests.engine.interp.http_util import explain_prompts


def test_local_stream_is_the_chat_answer_and_frees_the_model(env, monkeypatch):
    chat = env["chat"]
    for messages in explain_prompts(3):
        for max_tokens in (3, 32):
            pieces = list(chat.stream(messages, max_tokens=max_tokens))
            assert "".join(pieces) == chat.chat([messages], max_tokens=max_tokens)[0]
    assert not chat._lock.locked()

    # the lock is held while a stream is open, and an early close stops the generation and frees it
    stream = chat.stream(explain_prompts(1)[0], max_tokens=200)
    next(stream)
    assert chat._lock.locked()
    stream.close()
    assert not chat._lock.locked()
    assert [t.name for t in threading.enumerate()].count("saescope-stream") == 0

    # an exception in the generating thread reaches the consumer after every piece the streamer made before it,
    # in order (how much of the last word the streamer flushes before the error is transformers' choice: 5.23
    # held " was" back, 5.25 sends it), the lock is released and no thread is left
    made: list[str] = []

    def breaks(enc, max_tokens, temperature, streamer=None, **kwargs):
        finalize = streamer.on_finalized_text

        def record(text, stream_end=False):
            made.append(text)
            finalize(text, stream_end=stream_end)

        streamer.on_finalized_text = record
        streamer.put(enc["input_ids"])  # the prompt (skipped)
        for token in chat.tokenizer.encode(" the word was", add_special_tokens=False):
            streamer.put(torch.tensor([token]))
        raise RuntimeError("out of memory, say")

    monkeypatch.setattr(chat, "_generate", breaks)
    got = []
    with pytest.raises(RuntimeError, match="out of memory"):
        for piece in chat.stream(explain_prompts(1)[0]):
            got.append(piece)
    assert got == [piece for piece in made if piece]
    text = "".join(got)
    assert " the word was".startswith(text) and text.startswith(" the word"), text  # whole words always come
    assert not chat._lock.locked()
    assert [t.name for t in threading.enumerate()].count("saescope-stream") == 0


def test_local_judge_reads_the_first_position_and_fails_off_format_answers(env):
    """P(1) / (P(0) + P(1)) and the mass from the first reply position's softmax (by hand); a model whose first
    token is not a digit gives a failed judgement (mass still recorded), and with a budget its greedy reply is
    parsed."""
    from engine.interp import judge, prompts
    from engine.interp.backends import LocalChat

    chat = env["chat"]
    convs = [prompts.detection_messages(f"feature {i}", f"the quick brown fox {i}") for i in range(3)]
    got = chat.judge(convs)
    tok = chat.tokenizer
    ones = {tok.encode(t, add_special_tokens=False)[0] for t in ("1", " 1") if len(tok.encode(t, add_special_tokens=False)) == 1}
    zeros = {tok.encode(t, add_special_tokens=False)[0] for t in ("0", " 0") if len(tok.encode(t, add_special_tokens=False)) == 1}
    for conv, j in zip(convs, got, strict=True):
        ids = tok.apply_chat_template(conv, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
        with torch.no_grad():
            probs = chat.lm.model(input_ids=ids).logits[0, -1].double().softmax(-1)
        p1, p0 = float(probs[list(ones)].sum()), float(probs[list(zeros)].sum())
        assert not j.failed and j.yes() == pytest.approx(p1 / (p0 + p1), abs=1e-5) and j.mass == pytest.approx(p0 + p1, abs=1e-5)

    off = LocalChat(str(env["chat_dir"]), device="cpu", dtype="float32")
    with torch.no_grad():  # the digits' output rows pushed far down: the first token is never an answer
        for i in ones | zeros:
            off.lm.hf_model.lm_head.weight[i] *= -1.0
    failed = off.judge(convs)
    assert all(j.failed and j.mass is not None and j.mass < 0.5 for j in failed)
    budget = off.judge(convs, budget=6)
    for conv, j in zip(convs, budget, strict=True):
        reply = off.chat([conv], max_tokens=6)[0]
        assert j.answer == reply and j.probs == judge.parsed(reply, judge.YES_NO, None).probs
