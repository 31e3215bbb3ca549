"""IOI prompts with their attributes (IO name, S name, IO position) for supervised dictionaries (Makelov et al. 2024).

Each prompt keeps what it was written from (template, names, place, object, ABBA or BABA), so the same prompt can be
written again with one attribute changed: the counterfactual of an IO edit is the prompt with another IO name and
everything else the same (the reference's ``get_cf_prompts`` for the ``io`` attribute).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .tasks import IOI_TEMPLATES, OBJECTS, PLACES, encode, ioi_names, next_token

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

ATTRIBUTES = ("io", "s", "io_pos")
"""The attributes of an IOI prompt, as the reference's ``independent`` parametrisation names them."""
POSITIONS = ("end", "s2", "io")
"""Token positions a dictionary can sit at: the last token, the subject's second mention, the IO name."""


@dataclass(frozen=True)
class IoiPrompt:
    """One IOI prompt, how it was written, and its tokens."""

    template: int
    io: str
    s: str
    abba: bool
    """IO named first (``X and Y`` = IO and S): the reference's ``io_pos`` 0; BABA is 1."""
    place: str
    obj: str
    text: str
    ids: tuple[int, ...]
    io_id: int
    """The answer token (`` IO``)."""
    s_id: int
    """The wrong answer token (`` S``)."""
    s2: int
    """Index of the subject's second mention in ``ids``."""
    io_at: int
    """Index of the IO name in ``ids``."""

    def attribute(self, name: str) -> str:
        """The value of attribute ``name`` (``io``, ``s`` or ``io_pos``)."""
        return {"io": self.io, "s": self.s, "io_pos": "ABBA" if self.abba else "BABA"}[name]

    def position(self, name: str) -> int:
        """Token index of position ``name`` (``end``, ``s2`` or ``io``)."""
        if name not in POSITIONS:
            raise ValueError(f"unknown position {name!r}: use one of {', '.join(POSITIONS)}")
        return {"end": len(self.ids) - 1, "s2": self.s2, "io": self.io_at}[name]


def write_prompt(tokenizer: PreTrainedTokenizerBase, template: int, io: str, s: str, abba: bool, place: str,
                 obj: str) -> IoiPrompt | None:
    """The prompt, or None when the tokenizer splits a name or merges it with its neighbours."""
    first, second = (io, s) if abba else (s, io)
    pattern = IOI_TEMPLATES[template]
    fill = {"X": first, "Y": second, "S": s, "place": place, "obj": obj}
    text = pattern.format(**fill)
    io_slot = "{X}" if abba else "{Y}"
    heads = [encode(tokenizer, pattern[: pattern.index(end) + len(end)].format(**fill)) for end in (" {S}", io_slot)]
    ids = encode(tokenizer, text)
    io_id, s_id = next_token(tokenizer, text, " " + io), next_token(tokenizer, text, " " + s)
    if io_id is None or s_id is None or any(ids[: len(h)] != h for h in heads):
        return None
    return IoiPrompt(template, io, s, abba, place, obj, text, ids, io_id, s_id, len(heads[0]) - 1, len(heads[1]) - 1)


def ioi_prompts(tokenizer: PreTrainedTokenizerBase, n: int, seed: int = 0,
                names: Sequence[str] | None = None) -> list[IoiPrompt]:
    """``n`` prompts, each template, ABBA/BABA, IO and S drawn at random (seeded)."""
    names = list(names) if names is not None else ioi_names(tokenizer)
    rng = random.Random(seed)
    out: list[IoiPrompt] = []
    for _ in range(50 * n):
        io, s = rng.sample(names, 2)
        prompt = write_prompt(tokenizer, rng.randrange(len(IOI_TEMPLATES)), io, s, rng.random() < 0.5,
                              rng.choice(PLACES), rng.choice(OBJECTS))
        if prompt is not None:
            out.append(prompt)
            if len(out) == n:
                return out
    raise ValueError(f"the tokenizer splits the ioi template: only {len(out)} of {n} prompts kept their names whole")


def io_counterfactual(tokenizer: PreTrainedTokenizerBase, prompt: IoiPrompt, names: Sequence[str],
                      rng: random.Random) -> IoiPrompt:
    """The prompt with another IO name (not its IO or S) from ``names``, as long as the prompt; a ValueError when
    no name fits."""
    choices = [n for n in names if n not in (prompt.io, prompt.s)]
    rng.shuffle(choices)
    for name in choices:
        cf = write_prompt(tokenizer, prompt.template, name, prompt.s, prompt.abba, prompt.place, prompt.obj)
        if cf is not None and (len(cf.ids), cf.s2, cf.io_at) == (len(prompt.ids), prompt.s2, prompt.io_at):
            return cf
    raise ValueError(f"no other IO name keeps the prompt {prompt.text!r} as long as it is")

