"""Task prompts: pairs of a positive prompt (the model can answer) and a counterfactual (it cannot), tokenized.

Built-in generators (IOI with ABBA and BABA templates, greater-than, docstring) write prompts for the loaded model's
tokenizer: the words they fill in must be one token where they stand, the answers must be one token after the
prompt, and a prompt and its counterfactual must have the same number of tokens; words the tokenizer splits are
dropped, and a template with too few words left is refused. User tasks come from JSONL (see ``load_jsonl``).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

BUILTIN = ("ioi", "greater-than", "docstring")
"""Names of the built-in tasks."""


@dataclass(frozen=True)
class TaskPair:
    """One positive prompt and its counterfactual, with the tokens the logit difference compares."""

    prompt: str
    counterfactual: str
    answer: str
    """The answer shown (its tokens: ``answer_ids``)."""
    wrong: str
    """The competing answer shown (``wrong_ids``)."""
    prompt_ids: tuple[int, ...]
    counterfactual_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]
    """Tokens that count as right (one for IOI, docstring and JSONL tasks; the later years for greater-than)."""
    wrong_ids: tuple[int, ...]
    """Tokens that count as wrong."""


@dataclass(frozen=True)
class Task:
    """A named list of prompt pairs."""

    name: str
    pairs: tuple[TaskPair, ...]

    def __post_init__(self) -> None:
        if len(self.pairs) < 2:
            raise ValueError(f"task {self.name!r} has {len(self.pairs)} positive prompt(s); it needs at least 2")


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> tuple[int, ...]:
    """Token ids of ``text`` as the model reads it (the tokenizer's own special tokens, if it adds any)."""
    return tuple(int(i) for i in tokenizer(text)["input_ids"])


def next_token(tokenizer: PreTrainedTokenizerBase, prompt: str, answer: str) -> int | None:
    """The one token ``answer`` adds after ``prompt``, or None when the tokenizer splits it (or merges it)."""
    head, whole = encode(tokenizer, prompt), encode(tokenizer, prompt + answer)
    if len(whole) != len(head) + 1 or whole[: len(head)] != head:
        return None
    return whole[-1]


def make_pair(tokenizer: PreTrainedTokenizerBase, prompt: str, counterfactual: str, answers: Sequence[str],
              wrongs: Sequence[str]) -> TaskPair | None:
    """The pair, or None when an answer is not one token or the two prompts differ in length."""
    ids, cf_ids = encode(tokenizer, prompt), encode(tokenizer, counterfactual)
    answer_ids = [next_token(tokenizer, prompt, a) for a in answers]
    wrong_ids = [next_token(tokenizer, prompt, w) for w in wrongs]
    if len(ids) != len(cf_ids) or None in answer_ids or None in wrong_ids:
        return None
    return TaskPair(prompt, counterfactual, answers[0] if len(answers) == 1 else f"{answers[0]}..{answers[-1]}",
                    wrongs[0] if len(wrongs) == 1 else f"{wrongs[0]}..{wrongs[-1]}", ids, cf_ids,
                    tuple(a for a in answer_ids if a is not None), tuple(w for w in wrong_ids if w is not None))


def single_tokens(tokenizer: PreTrainedTokenizerBase, words: Sequence[str], context: str) -> list[str]:
    """The ``words`` that are one token after ``context`` (with their leading space)."""
    return [w for w in words if next_token(tokenizer, context, " " + w) is not None]


def _need(words: list[str], n: int, what: str, task: str) -> list[str]:
    if len(words) < n:
        raise ValueError(f"the {task} template needs {n} single-token {what} but the tokenizer keeps only "
                         f"{len(words)} whole ({', '.join(words) or 'none'}); it splits the others")
    return words


def _collect(task: str, n: int, seed: int, make: Callable[[random.Random], TaskPair | None]) -> Task:
    rng = random.Random(seed)
    pairs: list[TaskPair] = []
    for _ in range(50 * n):
        pair = make(rng)
        if pair is not None:
            pairs.append(pair)
            if len(pairs) == n:
                return Task(task, tuple(pairs))
    raise ValueError(f"the tokenizer splits the {task} template: only {len(pairs)} of {n} prompts kept their "
                     "answers one token long and their counterfactuals as long as the prompts")


# --- IOI ---------------------------------------------------------------------------------------------------
NAMES = ("Mary", "John", "Anna", "James", "Paul", "Sarah", "David", "Laura", "Mark", "Emma", "Peter", "Kate", "Tom",
         "Alice", "Robert", "Lisa", "Daniel", "Susan", "Michael", "Helen", "George", "Linda", "Frank", "Rachel")
PLACES = ("store", "garden", "school", "hospital", "office", "station", "park", "market")
OBJECTS = ("book", "ring", "drink", "bone", "letter", "key", "pen", "basket")
IOI_TEMPLATES = (
    "Then, {X} and {Y} went to the {place}. {S} gave a {obj} to",
    "When {X} and {Y} got a {obj} at the {place}, {S} decided to give it to",
    "After {X} and {Y} went to the {place}, {S} gave a {obj} to",
    "While {X} and {Y} were working at the {place}, {S} gave a {obj} to",
)
"""``{X} and {Y}``: the subject second (ABBA: ``X`` = IO, ``Y`` = S) or first (BABA); ``{S}`` repeats the subject."""


def ioi_names(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The IOI names the tokenizer keeps whole (a ValueError when fewer than 3 are)."""
    return _need(single_tokens(tokenizer, NAMES, "Then,"), 3, "names", "ioi")


def ioi_task(tokenizer: PreTrainedTokenizerBase, n: int, seed: int = 0) -> Task:
    """IOI, half ABBA and half BABA: the answer is the indirect object (IO), the wrong answer the subject (S). The
    counterfactual, as the reference builds it, puts a third name C where the IO was and the IO where S first was:
    three different names, no repeated subject, so no name is the indirect object."""
    names = ioi_names(tokenizer)

    def make(rng: random.Random) -> TaskPair | None:
        template = rng.choice(IOI_TEMPLATES)
        io, s, c = rng.sample(names, 3)
        place, obj = rng.choice(PLACES), rng.choice(OBJECTS)
        abba = rng.random() < 0.5
        first, second = (io, s) if abba else (s, io)
        prompt = template.format(X=first, Y=second, S=s, place=place, obj=obj)
        cf_first, cf_second = (c, io) if abba else (io, c)  # the IO becomes C, S1 becomes the IO
        counterfactual = template.format(X=cf_first, Y=cf_second, S=s, place=place, obj=obj)
        return make_pair(tokenizer, prompt, counterfactual, [" " + io], [" " + s])

    return _collect("ioi", n, seed, make)


# --- greater-than --------------------------------------------------------------------------------------------
NOUNS = ("war", "expedition", "drought", "reign", "project", "strike", "journey", "trial", "voyage", "famine")


def greater_than_task(tokenizer: PreTrainedTokenizerBase, n: int, seed: int = 0) -> Task:
    """"The N lasted from the year XXYY to the year XX": right answers are the years after YY, wrong ones YY and
    before (Hanna et al.); the counterfactual starts at XX01. Where the tokenizer reads digits one by one, the
    answer is the tens digit: digits above YY's tens are right, digits below wrong."""
    probe = "The war lasted from the year 1732 to the year 17"
    two_digit = all(next_token(tokenizer, probe, f"{y:02d}") is not None for y in range(100))
    one_digit = all(next_token(tokenizer, probe, str(d)) is not None for d in range(10))
    if not (two_digit or one_digit):
        raise ValueError("the tokenizer splits the greater-than template: the years after 'to the year 17' are "
                         "neither one token per two digits nor one per digit")

    def make(rng: random.Random) -> TaskPair | None:
        century, noun = rng.randint(11, 19), rng.choice(NOUNS)
        yy = rng.randint(2, 98) if two_digit else rng.randint(10, 89)
        prompt = f"The {noun} lasted from the year {century}{yy:02d} to the year {century}"
        counterfactual = f"The {noun} lasted from the year {century}01 to the year {century}"
        if two_digit:
            answers, wrongs = [f"{y:02d}" for y in range(yy + 1, 100)], [f"{y:02d}" for y in range(yy + 1)]
        else:
            tens = yy // 10
            answers, wrongs = [str(d) for d in range(tens + 1, 10)], [str(d) for d in range(tens)]
        return make_pair(tokenizer, prompt, counterfactual, answers, wrongs)

    return _collect("greater-than", n, seed, make)


# --- docstring -----------------------------------------------------------------------------------------------
WORDS = ("load", "size", "files", "state", "name", "data", "user", "table", "value", "image", "path", "mode",
         "key", "count", "text", "node", "port", "item", "line", "page", "token", "model", "index", "field")
DESCRIBE = ("first", "second", "column", "piece", "crime", "unit", "dark", "river", "light", "stone", "paper")


def docstring_task(tokenizer: PreTrainedTokenizerBase, n: int, seed: int = 0) -> Task:
    """Docstring completion (Heimersheim & Janiak): after two ``:param`` lines the answer is the third argument of
    the def, the wrong answers its other arguments; the counterfactual documents two random other names, so the
    next argument cannot be told."""
    args = _need(single_tokens(tokenizer, WORDS, "def f(self,"), 7, "argument names", "docstring")
    words = _need(single_tokens(tokenizer, DESCRIBE, "oil"), 3, "description words", "docstring")

    def make(rng: random.Random) -> TaskPair | None:
        a, b, c, d, e, f, fn = rng.sample(args, 7)
        w = [rng.choice(words) for _ in range(7)]

        def text(p1: str, p2: str) -> str:
            return (f'def {fn}(self, {a}, {b}, {c}, {d}):\n    """{w[0]} {w[1]} {w[2]}\n\n'
                    f"    :param {p1}: {w[3]} {w[4]}\n    :param {p2}: {w[5]} {w[6]}\n    :param")

        return make_pair(tokenizer, text(a, b), text(e, f), [" " + c], [" " + a, " " + b, " " + d])

    return _collect("docstring", n, seed, make)


GENERATORS: dict[str, Callable[[PreTrainedTokenizerBase, int, int], Task]] = {
    "ioi": ioi_task, "greater-than": greater_than_task, "docstring": docstring_task}


# --- JSONL ---------------------------------------------------------------------------------------------------
def load_jsonl(path: str | Path, tokenizer: PreTrainedTokenizerBase) -> Task:
    """A user task: rows ``{"prompt", "answer", "counterfactual"[, "counterfactual_answer"]}``, or rows
    ``{"prompt", "answer", "label": "positive"|"negative"}`` (the i-th negative is the i-th positive's
    counterfactual, its answer the wrong answer). Without a wrong answer ``wrong_ids`` is empty and the clean
    prompt's strongest other token is used (``metrics.resolve_wrong``). A bad row is one ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no task file {path}")
    rows: list[tuple[int, dict]] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path.name} row {number}: not JSON ({err.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not isinstance(row.get("answer"), str):
            raise ValueError(f"{path.name} row {number}: needs string fields 'prompt' and 'answer'")
        rows.append((number, row))
    labelled = [r for r in rows if "label" in r[1]]
    if labelled and len(labelled) != len(rows):
        raise ValueError(f"{path.name}: mix of labelled rows and counterfactual rows; use one form")
    if labelled:
        rows = _pair_labelled(path.name, rows)
    pairs: list[TaskPair] = []
    for number, row in rows:
        cf = row.get("counterfactual")
        if not isinstance(cf, str):
            raise ValueError(f"{path.name} row {number}: needs a string 'counterfactual' (or a 'label')")
        answer, wrong = row["answer"], row.get("counterfactual_answer")
        answer_id = next_token(tokenizer, row["prompt"], answer)
        if answer_id is None:
            raise ValueError(f"{path.name} row {number}: the answer {answer!r} is not one token after the prompt")
        wrong_id = None
        if isinstance(wrong, str):
            wrong_id = next_token(tokenizer, row["prompt"], wrong)
            if wrong_id is None:
                raise ValueError(f"{path.name} row {number}: the counterfactual answer {wrong!r} is not one token")
        ids, cf_ids = encode(tokenizer, row["prompt"]), encode(tokenizer, cf)
        if len(ids) != len(cf_ids):
            raise ValueError(f"{path.name} row {number}: the prompt has {len(ids)} tokens and its counterfactual "
                             f"{len(cf_ids)}; they must have the same length")
        pairs.append(TaskPair(row["prompt"], cf, answer, wrong or "", ids, cf_ids, (answer_id,),
                              () if wrong_id is None else (wrong_id,)))
    if len(pairs) < 2:
        raise ValueError(f"{path.name}: {len(pairs)} positive prompt(s); a task needs at least 2")
    return Task(path.stem, tuple(pairs))


def _pair_labelled(name: str, rows: list[tuple[int, dict]]) -> list[tuple[int, dict]]:
    positives, negatives = [], []
    for number, row in rows:
        label = row["label"]
        if label not in ("positive", "negative"):
            raise ValueError(f"{name} row {number}: label must be 'positive' or 'negative', not {label!r}")
        (positives if label == "positive" else negatives).append((number, row))
    if len(positives) < 2:
        raise ValueError(f"{name}: {len(positives)} positive row(s); a task needs at least 2")
    if len(negatives) != len(positives):
        raise ValueError(f"{name}: {len(positives)} positive and {len(negatives)} negative rows; the i-th negative is "
                         "the i-th positive's counterfactual, so the counts must match")
    return [(number, {"prompt": pos["prompt"], "answer": pos["answer"], "counterfactual": neg["prompt"],
                      "counterfactual_answer": neg["answer"]}) for (number, pos), (_, neg) in zip(positives, negatives,
                                                                                                  strict=True)]


def task_name(spec: str) -> str:
    """The name a task spec gives its task: the built-in name, or the JSONL file's stem."""
    return spec if spec in GENERATORS else Path(spec).stem


def load_task(spec: str, tokenizer: PreTrainedTokenizerBase, n: int, seed: int = 0) -> Task:
    """A built-in task by name (``n`` pairs), or a JSONL file by path."""
    if spec in GENERATORS:
        return GENERATORS[spec](tokenizer, n, seed)
    if spec.endswith(".jsonl") or Path(spec).exists():
        return load_jsonl(spec, tokenizer)
    raise ValueError(f"unknown task {spec!r}: use one of {', '.join(BUILTIN)} or a .jsonl file")
