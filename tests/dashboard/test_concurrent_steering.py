"""Eight app sessions steering different latents on one shared model at once each get their own tokens.

Streamlit runs each session's script in its own thread; this drives the same engine calls the Steering page
makes (``steering_intervention`` + ``compare``) from eight threads at once and compares with each run alone.
"""

import threading
from concurrent.futures import ThreadPoolExecutor

from engine.live.steering import SteeringSpec, compare, generate, steering_intervention
from tests.dashboard.tinyrun import make_sae


def test_eight_concurrent_steering_sessions_match_their_solo_runs(tiny_llama):
    lm = tiny_llama
    sae = make_sae("topk", d_in=lm.d_model)
    prompt = lm.tokenizer("The quick brown fox jumps over")["input_ids"]
    max_acts = {i: 2.0 for i in range(sae.cfg.d_sae)}
    jobs = [({3 * i + 1: 6.0 + 2 * i}, "add" if i % 3 else "clamp", i) for i in range(8)]

    def session(job, barrier=None):
        strengths, mode, seed = job
        factory = steering_intervention(lm, sae, SteeringSpec(strengths, mode), max_acts)
        stream = compare(lm, prompt, factory, max_new_tokens=16, temperature=0.9, seed=seed)
        if barrier is not None:
            barrier.wait()  # all eight generate at the same time
        return list(stream)

    alone = [session(job) for job in jobs]
    barrier = threading.Barrier(len(jobs))
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda job: session(job, barrier), jobs))

    assert together == alone
    for (_, _, seed), pairs in zip(jobs, alone, strict=True):  # each baseline is the unsteered model with that seed
        baseline = [a for a, _ in pairs if a is not None]
        assert baseline == list(generate(lm, prompt, max_new_tokens=16, temperature=0.9, seed=seed))
    steered = {tuple(b for _, b in pairs) for pairs in alone}
    assert len(steered) > 1, "different latents should steer differently"
    assert any([a for a, _ in p] != [b for _, b in p] for p in alone), "steering should change some continuation"
    # Nothing leaked into this (main) thread: a plain generation equals the first session's baseline.
    assert list(generate(lm, prompt, max_new_tokens=16, temperature=0.9, seed=0)) == [a for a, _ in alone[0] if a is not None]
