"""Head attribution's cost, measured side by side in one process: precompute of an ``attn.hook_z`` SAE with and
without head attribution against the bare model forward up to the hook, and the prompt lens's live DFA.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python scripts/bench_heads.py [--tokens 65536] [--json OUT]

The bare forward is timed on the very contexts the precomputes read (tokenized beforehand) before and after each
precompute (F W F N F N F W F: W with head attribution, N without), and each precompute is compared with the mean of
its two neighbouring forwards, so a load that drifts on a shared machine hits both sides of each ratio alike.
Within-run figures need no such care: the share of the pass spent attributing, and the attention capture against
a plain forward to the hook timed batch by batch, alternating. Defaults: the demo model and the committed
attention SAE.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from engine.analysis.dfa import dfa
from engine.data.corpus import iter_contexts
from engine.model.loading import load_model
from engine.precompute.pipeline import precompute
from engine.saes import load_sae
from engine.tools.bench import forward_seconds, machine_facts

ROOT = Path(__file__).resolve().parents[1]


def _precompute(lm, sae, corpus, n_tokens, context_len, batch_size, dfa_sources) -> dict:
    with tempfile.TemporaryDirectory(prefix="saescope-bench-heads-") as tmp:
        manifest = precompute(lm, sae, corpus, Path(tmp) / "run", tokens=n_tokens, context_len=context_len,
                              batch_size=batch_size, progress=False, dfa_sources=dfa_sources, snapshot_tokens=0)
    return manifest["timings"] | {"head_attribution": manifest["head_attribution"]}


def _live_dfa_ms(lm, sae, contexts, context_len, repeats=12) -> dict:
    """Live DFA of the strongest latent at the last token of 128-token prompts (the lens's request), median ms."""
    hook = sae.cfg.hook_name
    times = []
    for ids in contexts[:repeats]:
        ids = ids[:context_len]
        codes = sae.encode(sae.select_input(lm.capture(torch.tensor([ids]), hook)[hook][0, -1].to(sae.dtype)))
        latent = int(codes.argmax())
        tick = time.perf_counter()
        dfa(lm, sae, ids, latent, len(ids) - 1)
        times.append((time.perf_counter() - tick) * 1000)
    tick = time.perf_counter()
    for ids in contexts[:repeats]:
        lm.capture(torch.tensor([ids[:context_len]]), hook)
    forward_ms = (time.perf_counter() - tick) * 1000 / repeats
    return {"prompt_tokens": context_len, "dfa_ms_median": statistics.median(times[2:]), "dfa_ms_max": max(times[2:]),
            "forward_to_hook_ms": forward_ms}


def _capture_over_forward(lm, sae, contexts, batch_size, n_batches=12) -> float:
    """The attention capture (forward to hook_z + two attention re-runs) over a plain forward to the hook, timed
    batch by batch, alternating (sum over ``n_batches`` batches)."""
    from engine.data.activations import batched
    from engine.model.attention import capture_attention
    from engine.model.families import parse_hook_name

    layer, _ = parse_hook_name(sae.cfg.hook_name)
    plain = captured = 0.0
    with torch.inference_mode():
        for ids in itertools.islice(batched(contexts, batch_size), n_batches):
            tick = time.perf_counter()
            lm.capture(ids, sae.cfg.hook_name)
            plain += time.perf_counter() - tick
            tick = time.perf_counter()
            capture_attention(lm, layer, ids)
            captured += time.perf_counter() - tick
    return round(captured / plain, 3)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "data/models/smollm2-135m-instruct"))
    parser.add_argument("--sae", default=str(ROOT / "data/demo_sae_attn"))
    parser.add_argument("--corpus", default=str(ROOT / "data/corpus/heldout.jsonl.xz"))
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--context-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    lm = load_model(args.model, device="auto", dtype="auto")
    sae = load_sae(args.sae, device=lm.device)
    hook = sae.cfg.hook_name
    contexts = list(itertools.islice(iter_contexts(lm.tokenizer, args.corpus, args.context_len), args.tokens // args.context_len))
    n_tokens = len(contexts) * args.context_len
    forward_seconds(lm, hook, contexts[: args.batch_size], args.batch_size)  # warm-up
    forward = [forward_seconds(lm, hook, contexts, args.batch_size)]
    runs: dict[str, list[dict]] = {"with": [], "without": []}
    ratios: dict[str, dict[str, list[float]]] = {"main_pass": {"with": [], "without": []}, "total": {"with": [], "without": []}}
    for which in ("with", "without", "without", "with"):
        timings = _precompute(lm, sae, args.corpus, n_tokens, args.context_len, args.batch_size, 16 if which == "with" else 0)
        forward.append(forward_seconds(lm, hook, contexts, args.batch_size))
        bare = (forward[-2] + forward[-1]) / 2
        runs[which].append(timings)
        ratios["main_pass"][which].append(round(timings["main_pass_seconds"] / bare, 3))
        ratios["total"][which].append(round(timings["total_seconds"] / bare, 3))

    result = {
        "machine": machine_facts(), "model": lm.name, "dtype": str(lm.dtype).removeprefix("torch."), "sae": args.sae,
        "hook": hook, "tokens": n_tokens, "forward_seconds": forward,
        "main_pass_over_forward": ratios["main_pass"], "total_over_forward": ratios["total"],
        "attribution_share_of_main_pass": [
            round(r["head_attribution_seconds"] / r["main_pass_seconds"], 4) for r in runs["with"]
        ],
        "pairs_attributed": [r["head_attribution"]["pairs_attributed"] for r in runs["with"]],
        "capture_over_forward": _capture_over_forward(lm, sae, contexts, args.batch_size),
        "runs": runs, "live": _live_dfa_ms(lm, sae, contexts, args.context_len),
    }
    text = json.dumps(result, indent=2)
    if args.json:
        args.json.write_text(text)
    print(text)
    return result


if __name__ == "__main__":
    main()
