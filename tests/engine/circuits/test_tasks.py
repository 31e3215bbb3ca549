import json
import re

import pytest

from engine.circuits import tasks
from engine.model.tiny import tiny_tokenizer

SPLIT = ("Michael", "Rachel", "Helen")  # left out of the tokenizer's training text: split into pieces


@pytest.fixture(scope="module")
def tok():
    """A byte-level BPE that keeps the task words whole (they are frequent in its training text)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    words = [n for n in tasks.NAMES if n not in SPLIT] + list(tasks.PLACES + tasks.OBJECTS + tasks.NOUNS + tasks.WORDS
                                                               + tasks.DESCRIBE)
    text = " ".join(t.format(X="a", Y="b", S="c", place="d", obj="e") for t in tasks.IOI_TEMPLATES)
    text += " The lasted from the year to the year 0 1 2 3 4 5 6 7 8 9 def f(self, g, h):\n    \"\"\"\n\n    :param"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1500, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text + " " + " ".join(words)] * 50, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def test_ioi_pairs(tok):
    task = tasks.ioi_task(tok, 12, seed=1)
    assert len(task.pairs) == 12
    kinds = set()
    for p in task.pairs:
        assert len(p.prompt_ids) == len(p.counterfactual_ids)
        assert len(p.answer_ids) == len(p.wrong_ids) == 1
        assert tok.decode(list(p.prompt_ids) + list(p.answer_ids)) == p.prompt + p.answer
        names = re.findall(r"[A-Z][a-z]+", p.prompt.split(",", 1)[-1] if p.prompt.startswith("Then") else p.prompt)
        io, s = p.answer.strip(), p.wrong.strip()
        assert p.prompt.count(s) == 2 and p.prompt.count(io) == 1 and not set(SPLIT) & set(names)
        kinds.add("ABBA" if p.prompt.index(io) < p.prompt.index(s) else "BABA")
        cf_names = re.findall(r"\b(?:" + "|".join(tasks.NAMES) + r")\b", p.counterfactual)
        assert len(set(cf_names)) == 3 and io in cf_names and cf_names[-1] == s  # no repeated subject
        diff = [i for i, (a, b) in enumerate(zip(p.prompt_ids, p.counterfactual_ids, strict=True)) if a != b]
        assert len(diff) == 2  # the two name slots before the subject's second mention
    assert kinds == {"ABBA", "BABA"}
    assert tasks.ioi_task(tok, 12, seed=1) == task  # seeded


def test_greater_than_in_digit_mode(tok):
    task = tasks.greater_than_task(tok, 6, seed=0)
    for p in task.pairs:
        found = re.search(r"year \d\d(\d\d) to", p.prompt)
        assert found is not None
        yy = int(found.group(1))
        right = {tok.decode([i]) for i in p.answer_ids}
        wrong = {tok.decode([i]) for i in p.wrong_ids}
        assert right == {str(d) for d in range(10) if d > yy // 10}
        assert wrong == {str(d) for d in range(10) if d < yy // 10}
        assert re.search(r"year \d\d01 to", p.counterfactual)


def test_docstring_pairs(tok):
    task = tasks.docstring_task(tok, 5, seed=0)
    for p in task.pairs:
        found = re.search(r"\(self, (\w+), (\w+), (\w+), (\w+)\)", p.prompt)
        assert found is not None
        args = found.groups()
        assert p.answer == " " + args[2]
        assert re.findall(r":param (\w+):", p.prompt) == list(args[:2])
        assert not set(re.findall(r":param (\w+):", p.counterfactual)) & set(args)
        assert len(p.wrong_ids) == 3


def test_a_tokenizer_that_splits_the_template_is_refused():
    with pytest.raises(ValueError, match=r"ioi template needs 3 single-token names .* it splits the others"):
        tasks.ioi_task(tiny_tokenizer(), 4)


def write(tmp_path, rows):
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_jsonl_tasks(tok, tmp_path):
    rows = [{"prompt": "Then, Mary and John went to the store. John gave a book to", "answer": " Mary",
             "counterfactual": "Then, Anna and Mary went to the store. John gave a book to",
             "counterfactual_answer": " John"}] * 2
    task = tasks.load_jsonl(write(tmp_path, rows), tok)
    assert task.name == "t" and len(task.pairs) == 2
    assert task.pairs[0].answer_ids == tasks.encode(tok, " Mary")[-1:]
    labelled = [{"prompt": r["prompt"], "answer": " Mary", "label": "positive"} for r in rows] + [
        {"prompt": r["counterfactual"], "answer": " John", "label": "negative"} for r in rows]
    assert tasks.load_jsonl(write(tmp_path, labelled), tok).pairs == task.pairs


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "Then, Mary", "answer": " Zebedeeeeq", "counterfactual": "Then, John"}] * 2,
     "row 1: the answer ' Zebedeeeeq' is not one token"),
    ([{"prompt": "Then, Mary", "answer": " Mary", "counterfactual": "Then, John"},
      {"prompt": "Then, Mary", "answer": " Mary", "counterfactual": "Then, John and Mary"}],
     "row 2: the prompt has 3 tokens and its counterfactual 5"),
    ([{"prompt": "Then, Mary", "answer": " Mary", "counterfactual": "Then, John"}], "1 positive prompt"),
    ([{"prompt": "Then, Mary", "answer": " Mary", "label": "positive"},
      {"prompt": "Then, John", "answer": " Mary", "label": "negative"}], "1 positive row"),
    ([{"prompt": "a", "answer": " Mary"}, "nope"], "row 2: needs string fields 'prompt' and 'answer'"),
    ([{"prompt": "a", "answer": " Mary"}] * 2, "row 1: needs a string 'counterfactual'"),
])
def test_bad_task_files(tok, tmp_path, rows, message):
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(ValueError, match=re.escape(message)):
        tasks.load_jsonl(path, tok)
