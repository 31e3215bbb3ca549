"""First-letter absorption (SAEBench's settings, ``engine.eval.absorption``) of one SAE on the demo model, without
a precomputed run: ``python scripts/absorption.py data/demo_sae_w9216 [--words 4000] [--seed 0]``.

Prints the summary rows (means and spreads over letters), wall and CPU seconds and the peak RSS as one JSON line.
``saescope evaluate RUN --parts absorption`` computes the same on a run."""

import argparse
import json
import os
import resource
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from engine.eval.absorption import SPREAD, SUMMARY, AbsorptionConfig, absorption
from engine.model.loading import load_model
from engine.saes import load_sae


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("sae")
    ap.add_argument("--model", default="data/models/smollm2-135m-instruct")
    ap.add_argument("--words", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args()
    started, cpu = time.perf_counter(), time.process_time()
    lm = load_model(args.model, device="cpu", dtype=args.dtype)
    rows = absorption(lm, load_sae(args.sae), AbsorptionConfig(words=args.words, seed=args.seed))
    summary = {r.metric: r.value for r in rows if r.task is None and r.metric in (*SUMMARY, *SPREAD, "letters_evaluated")}
    print(json.dumps({"sae": args.sae, **summary, "wall_s": round(time.perf_counter() - started, 1),
                      "cpu_s": round(time.process_time() - cpu, 1),
                      "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)}))


if __name__ == "__main__":
    main()
