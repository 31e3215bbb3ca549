"""engine/run/manifest.py: the typed sections carry exactly what the manifest holds, and an old or partial
manifest gives None fields instead of KeyErrors."""

from __future__ import annotations

import dataclasses

from engine.precompute.pipeline import precompute
from engine.run.manifest import CorpusSection, ModelSection, SaeSection, sections
from tests.engine.runs_util import write_corpus
from tests.engine.saes_util import random_sae


def test_sections_hold_what_the_manifest_holds(tiny_llama, tmp_path):
    corpus = write_corpus(tmp_path / "c.jsonl", n_docs=4)
    manifest = precompute(tiny_llama, random_sae("topk", hook="blocks.1.hook_resid_post"), corpus, tmp_path / "run",
                          context_len=16, tokens=64, progress=False)
    info = sections(manifest)
    for section, cls in ((info.model, ModelSection), (info.sae, SaeSection), (info.corpus, CorpusSection)):
        raw = manifest[{ModelSection: "model", SaeSection: "sae", CorpusSection: "corpus"}[cls]]
        assert {f.name: getattr(section, f.name) for f in dataclasses.fields(cls)} == {
            f.name: raw.get(f.name) for f in dataclasses.fields(cls)}
    assert info.snapshot.final and info.settings == manifest["settings"]
    assert info.identity() == {"model": manifest["model"]["hash"], "sae": manifest["sae"]["hash"],
                               "corpus": manifest["corpus"]["hash"], "settings": manifest["settings"]}


def test_missing_and_unknown_fields():
    info = sections({"model": {"name": "gpt2", "future_field": 1}, "sae": None, "snapshot": {"final": False, "pid": 7}})
    assert info.model.name == "gpt2" and info.model.source == "gpt2" and info.model.hash is None
    assert info.sae == SaeSection() and info.corpus.n_tokens is None
    assert not info.snapshot.final and info.snapshot.pid == 7
    assert sections(None).snapshot.final and sections({}).settings == {}
