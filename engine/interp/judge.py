"""How a judge's answer to a digit question is read (docs/explanations.md, "Judges that answer off-format").

A scorer asks a question whose answer is one digit among ``options`` (``0``/``1`` for detection and fuzzing,
``1``..``5`` for the intruder). The answer is read, in this order:

1. **First token.** When the reply's first token is one of the options, the option probabilities at that position
   (from the logits, or an endpoint's ``top_logprobs``) renormalised over the options, as delphi reads
   ``P(1) / (P(0) + P(1))``. Their total (the *mass*, ``P(0) + P(1)``) is recorded: a low mass says the judge
   barely considered answering in format.
2. **Final answer.** Otherwise (a reasoning model opening ``<think>``, a chatty "The answer is 1"), and when a
   token budget is given, the judge answers again with up to that many tokens; thinking blocks are dropped and the
   last standalone option digit of the rest is the answer, with probability 1.
3. **Failed.** No option digit (or a budget spent inside ``<think>``): a failed judgement, counted and reported per
   scorer and left out of the score, never a silent 0.5.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

YES_NO = ("0", "1")
_THINK = re.compile(r"<think>.*?</think>", re.S | re.I)
_DIGIT = re.compile(r"(?<![\w.])(\d)(?![\w]|\.\d)")


@dataclass(frozen=True)
class Judgement:
    """A judge's answer to one digit question."""

    probs: tuple[float, ...] | None
    """Probability of each option, renormalised over the options; None: a failed judgement."""
    mass: float | None
    """Total probability of the options where the answer was read (None: unknown, e.g. no log-probabilities)."""
    answer: str
    """What the judge said: its first token, or its whole reply when that was parsed."""

    @property
    def failed(self) -> bool:
        return self.probs is None

    def yes(self) -> float | None:
        """``P(1) / (P(0) + P(1))`` of a yes/no question (None when failed)."""
        return None if self.probs is None else self.probs[-1]

    def choice(self) -> int | None:
        """Index of the likeliest option (None when failed; ties go to the first)."""
        return None if self.probs is None else max(range(len(self.probs)), key=lambda i: self.probs[i])  # type: ignore[index]


def from_option_mass(masses: list[float], answer: str) -> Judgement:
    """The judgement of a first token that is an option, from each option's probability at that position."""
    total = float(sum(masses))
    if not total > 0:
        return Judgement(None, total, answer)
    return Judgement(tuple(float(m) / total for m in masses), total, answer)


def from_top_logprobs(top: list[dict], options: tuple[str, ...]) -> tuple[list[float], float]:
    """Each option's probability among an endpoint's ``top_logprobs`` (tokens equal to the option once stripped,
    summed: ``1`` and `` 1``), and their total."""
    masses = [0.0] * len(options)
    for item in top or []:
        tok = str(item.get("token", "")).strip()
        if tok in options:
            masses[options.index(tok)] += math.exp(float(item.get("logprob", -math.inf)))
    return masses, float(sum(masses))


def is_option(token: str, options: tuple[str, ...]) -> bool:
    return token.strip() in options


def final_answer(text: str, options: tuple[str, ...]) -> int | None:
    """Index of the option a free-form reply ends on: ``<think>...</think>`` dropped, then the last standalone digit
    (not part of a number or a word) that is an option; None when there is none or the thinking never closed."""
    rest = _THINK.sub(" ", text)
    if re.search(r"<think>", rest, re.I):
        return None
    found = [m.group(1) for m in _DIGIT.finditer(rest) if m.group(1) in options]
    return options.index(found[-1]) if found else None


def parsed(text: str, options: tuple[str, ...], mass: float | None) -> Judgement:
    """The judgement of a free-form reply (``final_answer``): one-hot on its option, or failed."""
    k = final_answer(text, options)
    if k is None:
        return Judgement(None, mass, text)
    return Judgement(tuple(1.0 if i == k else 0.0 for i in range(len(options))), mass, text)
