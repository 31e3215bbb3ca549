"""saescope export: Neuronpedia's import folder (checked against Neuronpedia's own export models) and JSONL."""

import ast
import gzip
import json
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine.cli import main
from engine.interp import parts, schema
from engine.precompute.pipeline import precompute
from engine.run.store import RunStore
from engine.tools import export as export_mod
from engine.tools import neuronpedia as np_fmt
from engine.tools.export import NeuronpediaOptions, export_run
from tests.engine.runs_util import write_corpus
from tests.engine.saes_util import random_sae

FIXTURES = Path(__file__).parents[2] / "fixtures" / "neuronpedia"
MODELS = {"Neuron": "feature", "Activation": "activation", "Explanation": "explanation", "Model": "model", "Source": "source",
          "SourceSet": "source_set", "SourceRelease": "source_release"}
EXPLAINED = {3: "quotes and <b>markup</b> 'x'", 5: "the letter e"}


@pytest.fixture(scope="module")
def run_dir(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    out = root / "run"
    precompute(tiny_llama, random_sae("topk", hook="blocks.1.hook_resid_post"), write_corpus(root / "c.jsonl", n_docs=16),
               out, context_len=16, batch_size=8, sample_contexts=4, progress=False)
    t0 = datetime(2025, 1, 1, tzinfo=UTC)
    parts.write_part(out, {schema.EXPLANATIONS: pa.table({
        "feature_id": list(EXPLAINED), "explanation": list(EXPLAINED.values()), "explainer": ["m"] * 2,
        "prompt_version": ["v1"] * 2, "created_at": [t0] * 2, "status": ["ok"] * 2, "reason": [""] * 2,
    }, schema=schema.EXPLANATIONS_SCHEMA), schema.SCORES: pa.table({
        "feature_id": [3], "explainer": ["m"], "prompt_version": ["v1"], "scorer": ["detection"], "score": [0.75],
        "n_examples": [4], "details": ["{}"],
    }, schema=schema.SCORES_SCHEMA)})
    return out


def _published_fields(table: str) -> dict[str, str]:
    """Field -> annotation text of Neuronpedia's dataclass for ``table`` (parsed, not imported)."""
    tree = ast.parse((FIXTURES / f"{MODELS[table]}.py.txt").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef))
    return {n.target.id: ast.unparse(n.annotation) for n in cls.body if isinstance(n, ast.AnnAssign)
            and isinstance(n.target, ast.Name)}


_PY_TYPES = {"str": "str", "int": "int", "float": "float", "bool": "bool", "datetime": "datetime", "List[str]": "list[str]",
             "List[int]": "list[int]", "List[float]": "list[float]", "list[float]": "list[float]"}


def test_schema_is_neuronpedias_published_one():
    for table, ours in np_fmt.SCHEMAS.items():
        published = _published_fields(table)
        for name, (kind, _required) in ours.items():
            assert name in published, f"{table}.{name} is not in Neuronpedia's {MODELS[table]}.py"
            annotation = published[name].removeprefix("Optional[").removesuffix("]") if published[name].startswith(
                "Optional[") else published[name]
            assert _PY_TYPES.get(annotation) == kind, (table, name, published[name], kind)


def _lines(path: Path) -> list[dict]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_neuronpedia_export(run_dir, tmp_path):
    done = export_run(run_dir, tmp_path / "np", batch_features=100)
    folder = tmp_path / "np" / "tiny-llama" / "1-saescope-res-256"
    assert done.source_dir == folder, done.source_dir
    rows = {table: [] for table in np_fmt.SCHEMAS}
    for name, table in np_fmt.FILES.items():
        files = sorted((folder / name).glob("batch-*.jsonl.gz")) if not name.endswith(".jsonl") else [folder / name]
        for file in files:
            rows[table] += _lines(file)
    for table, records in rows.items():
        published = _published_fields(table)
        for record in records:
            np_fmt.validate(table, record)
            assert set(record) <= set(published)
    with RunStore.open(run_dir) as store:
        n = store.n_features()
        assert [r["index"] for r in rows["Neuron"]] == [str(i) for i in range(n)]
        assert len(list((folder / "features").glob("*.gz"))) == 3  # 256 latents, 100 per batch
        features = pq.read_table(run_dir / "features.parquet").to_pylist()
        examples = pq.read_table(run_dir / "examples.parquet").to_pylist()
        contexts = {r["context_id"]: r["token_ids"] for r in pq.read_table(run_dir / "contexts.parquet").to_pylist()}
        vocab = pq.read_table(run_dir / "vocab.parquet").column("token").to_pylist()
        assert len(rows["Activation"]) == len(examples) and len({r["id"] for r in rows["Activation"]}) == len(examples)
        for feature, neuron in zip(features, rows["Neuron"], strict=True):
            assert neuron["frac_nonzero"] == pytest.approx(feature["density"])
            assert neuron["maxActApprox"] == pytest.approx(feature["max_act"])
            assert neuron["pos_str"] == [vocab[i] for i in feature["top_logit_ids"]]
            assert neuron["neg_values"] == pytest.approx(feature["bottom_logit_values"])
            assert neuron["freq_hist_data_bar_heights"] == feature["hist_counts"]
            assert neuron["topkCosSimIndices"] == feature["neighbor_ids"]
        busiest = max(features, key=lambda f: f["fire_count"])["feature_id"]
        mine = [e for e in examples if e["feature_id"] == busiest]
        exported = [a for a in rows["Activation"] if a["index"] == str(busiest)]
        assert len(exported) == len(mine) > 0
        for ex, act in zip(mine, exported, strict=True):  # same order: top by rank, then quantile
            window = contexts[ex["context_id"]][ex["start"] : ex["start"] + len(ex["acts"])]
            assert act["tokens"] == [vocab[i] for i in window]
            assert act["values"] == pytest.approx(ex["acts"], abs=1e-5)  # rounded to 5 decimals
            assert act["maxValue"] == pytest.approx(max(ex["acts"]), abs=1e-5) and act["dataIndex"] == str(ex["context_id"])
            assert act["values"][act["maxValueTokenIndex"]] == act["maxValue"]
            assert (act.get("binMin") is None) == (ex["kind"] == "top")
    explanations = {int(r["index"]): r for r in rows["Explanation"]}
    assert {k: v["description"] for k, v in explanations.items()} == EXPLAINED
    assert "detection 0.750" in explanations[3]["notes"]
    source = rows["Source"][0]
    assert source["id"] == "1-saescope-res-256" and source["setName"] == "saescope-res-256"
    assert source["num_tokens_in_prompt"] == 16 and rows["Model"][0]["layers"] == 2
    assert done.n_features == 256 and done.n_explanations == 2
    # a second export of the same run gives the same row ids (re-imports do not duplicate)
    again = export_run(run_dir, tmp_path / "np2", batch_features=100)
    assert _lines(again.source_dir / "activations" / "batch-0.jsonl.gz")[0]["id"] == rows["Activation"][0]["id"]


def test_jsonl_export(run_dir, tmp_path):
    export_run(run_dir, tmp_path / "f.jsonl.gz", "jsonl")
    lines = _lines(tmp_path / "f.jsonl.gz")
    with RunStore.open(run_dir) as store:
        for line in lines[:40]:
            row = store.feature(line["feature_id"])
            assert row is not None
            assert line["density"] == row.density and line["max_act"] == pytest.approx(row.max_act)
            assert [e["acts"] for e in line["examples"]] == [pytest.approx(e.acts) for e in row.examples]
            assert [e["tokens"] for e in line["examples"]] == [e.tokens for e in row.examples]
            assert [t["token"] for t in line["logits"]["promoted"]] == store.decode(row.top_logit_ids)
    assert len(lines) == 256 and lines[3]["explanation"] == EXPLAINED[3] and lines[3]["explanation_scores"] == {"detection": 0.75}
    assert lines[0]["explanation"] is None
    export_run(run_dir, tmp_path / "plain.jsonl", "jsonl")
    assert _lines(tmp_path / "plain.jsonl") == lines


def test_interrupted_export_leaves_no_out(run_dir, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = np_fmt.activation

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 50:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(np_fmt, "activation", failing)
    with pytest.raises(KeyboardInterrupt):
        export_run(run_dir, tmp_path / "out", batch_features=16)
    assert list(tmp_path.iterdir()) == []  # neither OUT nor the partial folder
    # replacing an existing export: refused without force; an interrupted forced one keeps the old one whole
    monkeypatch.setattr(np_fmt, "activation", real)
    export_run(run_dir, tmp_path / "out", batch_features=64)
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "out").rglob("*"))
    with pytest.raises(FileExistsError, match="already exists: pass --force"):
        export_run(run_dir, tmp_path / "out")
    calls["n"] = 0
    monkeypatch.setattr(np_fmt, "activation", failing)
    with pytest.raises(KeyboardInterrupt):
        export_run(run_dir, tmp_path / "out", force=True)
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "out").rglob("*")) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_names_and_options(run_dir, tmp_path):
    done = export_run(run_dir, tmp_path / "o", options=NeuronpediaOptions(model_id="my-model", source_set="res-x", layer=7,
                                                                           release="rel", visibility="UNLISTED"))
    assert done.source_dir == tmp_path / "o" / "my-model" / "7-res-x"
    assert _lines(done.source_dir / "release.jsonl")[0]["name"] == "rel"
    with pytest.raises(ValueError, match="model id 'My Model' must be lower-case"):
        export_run(run_dir, tmp_path / "p", options=NeuronpediaOptions(model_id="My Model"))
    assert not (tmp_path / "p").exists()
    with pytest.raises(ValueError, match="visibility must be one of"):
        NeuronpediaOptions(visibility="SECRET")
    assert np_fmt.default_names({"model": {"name": "/x/SmolLM2-135M"}, "sae": {"hook": "blocks.20.attn.hook_z", "d_sae": 4608}}) \
        == ("smollm2-135m", "saescope-att-4608", 20)
    assert export_mod.release_fields("gemma-scope-2b-pt-res-canonical/layer_3/width_16k/canonical") == {
        "saelensRelease": "gemma-scope-2b-pt-res-canonical", "saelensSaeId": "layer_3/width_16k/canonical",
        "hfRepoId": "google/gemma-scope-2b-pt-res", "hfFolderId": "layer_3/width_16k/average_l0_59"}
    assert export_mod.release_fields(str(run_dir)) == {}
    with pytest.raises(ValueError, match="unknown export format 'csv'"):
        export_run(run_dir, tmp_path / "q", "csv")


def test_cli_export(run_dir, tmp_path, capsys):
    assert main(["export", str(run_dir), str(tmp_path / "x.jsonl"), "--format", "jsonl", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["features"] == 256
    assert main(["export", str(tmp_path / "nothing"), str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert "saescope export: error:" in err and "does not exist" in err and "Traceback" not in err
    assert not (tmp_path / "y").exists()
    assert export_mod.FORMATS == ("neuronpedia", "jsonl")
