"""The intruder check (Paulo & Belrose 2025, "Evaluating SAE interpretability without explanations"; Neuronpedia's
"Check If Interpretable"): does a latent's top activations share something a judge can see, explanation or not?

Per latent, seeded by it: ``n_groups`` groups, each of ``group`` top-activating excerpts (drawn without
replacement from the latent's top examples) and one non-activating excerpt, the intruder, put at a random place.
Activating excerpts have their tokens at >= 0.3 x their maximum marked (as fuzzing does); the intruder gets as
many marks as its group's excerpts have on average (at least one), one where their maximum usually sits and the
rest at random, so the marks' count and place give nothing away. The judge names the intruder's number; score =
the fraction of groups it got right (chance: 1 / (group + 1) = 0.2). Failed judgements (no digit 1-5) are left
out of the score and counted.
"""

from __future__ import annotations

import math

import numpy as np

from . import prompts
from .backends import ChatBackend
from .scorers import Excerpt, Score, anchor, failure_details, fuzz_marks

OPTIONS = ("1", "2", "3", "4", "5")
N_GROUPS, GROUP = 5, 4


def groups(top: list[Excerpt], quiet: list[Excerpt], rng: np.random.Generator, n_groups: int = N_GROUPS,
           group: int = GROUP) -> list[tuple[list[Excerpt], int]]:
    """Up to ``n_groups`` groups: ``group`` distinct top excerpts with one quiet excerpt inserted at a random index
    (returned with that index)."""
    n = min(n_groups, len(top) // group, len(quiet))
    order = rng.permutation(len(top))[: n * group]
    out = []
    for g in range(n):
        members = [top[int(i)] for i in order[g * group : (g + 1) * group]]
        at = int(rng.integers(0, group + 1))
        out.append(([*members[:at], quiet[g], *members[at:]], at))
    return out


def marked(excerpts: list[Excerpt], rng: np.random.Generator) -> list[str]:
    """The group's excerpts with their marks (see the module's docstring)."""
    active = [e for e in excerpts if e.activating]
    counts = [sum(fuzz_marks(e, 0, rng)) for e in active]
    n_random = max(1, round(float(np.mean(counts)))) if counts else 1
    at = anchor(excerpts)
    return [prompts.mark(e.tokens, fuzz_marks(e, n_random, rng, at=at)) for e in excerpts]


def intruder(backend: ChatBackend, top: list[Excerpt], quiet: list[Excerpt], seed: int | list[int], budget: int = 0,
             n_groups: int = N_GROUPS, group: int = GROUP) -> Score:
    """The intruder score of one latent from its top excerpts and its non-activating ones (``seed``: the run's seed
    and the latent, e.g. ``[seed, feature_id]``)."""
    if group + 1 > len(OPTIONS):
        raise ValueError(f"an intruder group has at most {len(OPTIONS) - 1} activating excerpts, got {group}")
    rng = np.random.default_rng(seed)
    made = groups(top, quiet, rng, n_groups, group)
    convs = [prompts.intruder_messages(marked(g, rng)) for g, _ in made]
    options = OPTIONS[: group + 1]
    judgements = backend.judge(convs, options, budget=budget) if convs else []
    choices = [j.choice() for j in judgements]
    right = [c == at for c, (_, at) in zip(choices, made, strict=True) if c is not None]
    details = {
        "groups": [{"context_ids": [e.context_id for e in g], "windows": [[e.start, e.start + len(e.tokens)] for e in g],
                    "intruder": at, "choice": c} for (g, at), c in zip(made, choices, strict=True)],
        "chance": 1 / (group + 1),
        **failure_details(judgements),
    }
    score = float(np.mean(right)) if right else math.nan
    return Score("intruder", score, len(made), details)
