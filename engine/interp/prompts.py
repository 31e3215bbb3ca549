"""The prompts explainers and scorers see, with their versions (recorded next to every explanation and score).

Formats follow delphi ("Automatically Interpreting Millions of Features in Large Language Models", Paulo et al.):
the explainer sees examples with the latent's activating tokens between ``<<`` and ``>>``; the scorers ask one
yes/no question per held-out context and read the answer as the probability of ``1`` against ``0``.
"""

from __future__ import annotations

import re

EXPLAIN_VERSION = "explain-v3"  # bump when the explainer prompt or the excerpt selection changes
SCORE_VERSION = "score-v2"
L, R = "<<", ">>"

EXPLAIN_SYSTEM = (
    "You are a careful interpretability researcher. You are shown text excerpts in which one feature of a "
    "language model is active. Tokens where it is active are marked between << and >>. "
    "Describe in one short phrase what the marked tokens have in common (the words, their meaning, or their "
    "context). Answer with the phrase only."
)

EXPLAIN_SHOTS = [
    {"role": "user", "content": "Marked tokens: 'he', 'she'\nText:\n- he said that<< he>> would come\n"
                                "- and<< he>> went unto the city\n- when<< she>> saw them\nDescribe the feature in a few words."},
    {"role": "assistant", "content": "Third-person pronouns as the subject of a verb"},
    {"role": "user", "content": "Marked tokens: 'March', 'June'\nText:\n- born on 3<< March>> 1901\n"
                                "- until<< June>> of that year\n- in early<< May>>, the\nDescribe the feature in a few words."},
    {"role": "assistant", "content": "Month names in dates"},
]
"""Two worked examples (few-shot turns): small explainer models follow the answer format far better with them."""

DETECTION_SYSTEM = (
    "You are a careful linguistics researcher. You are given a description of a text feature and one text "
    "excerpt. Answer 1 if the feature described is present in the excerpt and 0 if it is not. Answer with one digit."
)

FUZZING_SYSTEM = (
    "You are a careful linguistics researcher. You are given a description of a text feature and one text "
    "excerpt in which some tokens are marked between << and >>. Answer 1 if every marked token is an example of "
    "the feature described and 0 if not. Answer with one digit."
)


INTRUDER_SYSTEM = (
    "You are a careful linguistics researcher. You are shown five numbered text excerpts in which some tokens are "
    "marked between << and >>. In four of them the marked tokens share one feature; in one, the intruder, they do "
    "not. Answer with the number of the intruder only (one digit, 1 to 5)."
)


def mark(tokens: list[str], marked: list[bool]) -> str:
    """The excerpt with each run of consecutive marked tokens between ``<<`` and ``>>``."""
    out: list[str] = []
    inside = False
    for tok, on in zip(tokens, marked, strict=True):
        if on and not inside:
            out.append(L)
        elif not on and inside:
            out.append(R)
        inside = on
        out.append(tok)
    if inside:
        out.append(R)
    return "".join(out)


def explain_messages(excerpts: list[str], top_tokens: list[str]) -> list[dict[str, str]]:
    """Chat messages asking for one explanation of a latent from its marked ``excerpts``."""
    lines = ["Marked tokens: " + ", ".join(repr(tok) for tok in top_tokens), "Text:"] if top_tokens else ["Text:"]
    lines += ["- " + " ".join(text.split()) for text in excerpts]
    lines.append("Describe the feature in a few words.")
    return [{"role": "system", "content": EXPLAIN_SYSTEM}, *EXPLAIN_SHOTS, {"role": "user", "content": "\n".join(lines)}]


def detection_messages(explanation: str, excerpt: str) -> list[dict[str, str]]:
    user = f"Feature: {explanation}\n\nExcerpt: {excerpt.strip()}\n\nIs the feature present? Answer 1 or 0."
    return [{"role": "system", "content": DETECTION_SYSTEM}, {"role": "user", "content": user}]


def fuzzing_messages(explanation: str, marked_excerpt: str) -> list[dict[str, str]]:
    user = (f"Feature: {explanation}\n\nExcerpt: {marked_excerpt.strip()}\n\n"
            "Are all the marked tokens examples of the feature? Answer 1 or 0.")
    return [{"role": "system", "content": FUZZING_SYSTEM}, {"role": "user", "content": user}]


def intruder_messages(marked_excerpts: list[str]) -> list[dict[str, str]]:
    """Chat messages asking which of the numbered (1, 2, ...) marked excerpts is the intruder."""
    lines = [f"Excerpt {i}: {' '.join(text.split())}" for i, text in enumerate(marked_excerpts, 1)]
    user = "\n".join(lines) + "\n\nWhich excerpt is the intruder? Answer with its number."
    return [{"role": "system", "content": INTRUDER_SYSTEM}, {"role": "user", "content": user}]


_PREFIX = re.compile(
    r"^\s*(?:\[?explanation\]?\s*[:\-]\s*|the (?:marked |common )?(?:tokens|feature)s?(?: are| is)?\s*:?\s*)", re.I
)
MAX_CHARS = 200
_QUOTES = "\"'`*"


def _unquote(line: str) -> str:
    """Drop quotes or emphasis around the whole answer, or one it opened and never closed; not the closing quote
    of a quoted word at its end (``the word 'the'``)."""
    line = re.sub(r"^\*\*(.+)\*\*$", r"\1", line).strip()
    while len(line) >= 2 and line[0] == line[-1] and line[0] in _QUOTES and line[0] not in line[1:-1]:
        line = line[1:-1].strip()
    if line and line[0] in _QUOTES and line.count(line[0]) == 1:
        line = line[1:].strip()
    if line and line[-1] in _QUOTES and line.count(line[-1]) == 1:
        line = line[:-1].strip()
    return line


def clean_explanation(text: str) -> tuple[str | None, str]:
    """The explanation in a model's answer, or ``None`` and why the answer is unusable (junk is recorded, not kept).

    Takes the first non-empty line, drops a leading "Explanation:" and quotes, and refuses answers that are
    empty, have no letters, only echo the excerpt markup, or ramble past ``MAX_CHARS``.
    """
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return None, "empty answer"
    line = _unquote(_PREFIX.sub("", lines[0]).strip())
    if not line:
        return None, "empty answer"
    if sum(ch.isalpha() for ch in line) < 3:
        return None, f"no words in answer {line[:40]!r}"
    echoes = ("excerpt", "- ", "text:", "marked tokens", "in a few words", "describe the feature")
    if L in line or R in line or line.lower().startswith(echoes):
        return None, "answer echoes the excerpts"
    if len(line) > MAX_CHARS:
        line = line[:MAX_CHARS].rsplit(" ", 1)[0] + "..."
    return line, ""
