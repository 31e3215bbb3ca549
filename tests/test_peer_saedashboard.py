"""scripts/peer_saedashboard.py's tokens: GPT-2's byte token ids, docstrings in a fixed order (repeats, syntax
errors and site-packages left out), and a tokenizer that encodes text to exactly those ids."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("saescope_peer_script", ROOT / "scripts" / "peer_saedashboard.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


peer = _load()


def test_byte_ids_are_gpt2s():
    ids = peer.byte_ids()
    assert sorted(ids) == list(range(256))
    # GPT-2's vocabulary: "!" 0, "A" 32, "\n" 198 ("Ċ"), " " 220 ("Ġ"), byte 0 188 ("Ā")
    assert (ids[ord("!")], ids[ord("A")], ids[ord("\n")], ids[ord(" ")], ids[0]) == (0, 32, 198, 220, 188)
    alphabet = peer.byte_alphabet()
    assert (alphabet[ord(" ")], alphabet[ord("\n")], alphabet[ord("A")]) == ("Ġ", "Ċ", "A")


def test_docstrings_in_a_fixed_order(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "site-packages").mkdir()
    (tmp_path / "a.py").write_text('"""Module a."""\ndef f():\n    """F does."""\nclass C:\n    """C is."""\n')
    (tmp_path / "b" / "c.py").write_text('"""Module c."""\ndef g():\n    """F does."""\n')  # a repeat: dropped
    (tmp_path / "bad.py").write_text('"""Never read."""\ndef (:\n')  # a syntax error: skipped
    (tmp_path / "site-packages" / "x.py").write_text('"""Installed."""\n')
    (tmp_path / "notes.txt").write_text('"""Not Python."""\n')
    docs = list(peer.stdlib_docstrings(tmp_path))
    assert docs == ["Module a.", "F does.", "C is.", "Module c."]
    ids, used = peer.docstring_tokens(12, tmp_path)
    expected = [*(peer.byte_ids()[b] for b in b"Module a."), peer.EOT, *(peer.byte_ids()[b] for b in b"F ")]
    assert (ids, used) == (expected, 2)
    assert peer.docstring_tokens(12, tmp_path) == (ids, used)


def test_byte_tokenizer_encodes_to_the_byte_ids():
    tok = peer.byte_tokenizer()
    assert len(tok) == 50_257 and tok.eos_token_id == peer.EOT
    text = 'def f(x):\n\t"""Résumé: x → y."""  '
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == [peer.byte_ids()[b] for b in text.encode("utf-8")]
    assert tok.decode(ids) == text
