"""``saescope evaluate`` on a tiny run: evaluation.parquet written with every group, core figures against a
brute-force pass, firing fractions against the run's densities, the command and its errors."""

import json

import numpy as np
import pytest
import torch

from engine.cli import main
from engine.data.activations import MASSIVE_FACTOR, stats_mask
from engine.eval.absorption import AbsorptionConfig
from engine.eval.evaluate import EvaluateConfig, evaluate_run
from engine.eval.files import read_evaluation
from engine.eval.sample import sample_contexts
from engine.eval.sparse_probing import K_VALUES, ProbingConfig
from engine.model.loading import load_model
from engine.run.store import RunStore
from engine.saes import load_sae
from tests.engine.eval_util import build_width_runs, write_probe_corpus


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    runs = build_width_runs(root)
    corpus = write_probe_corpus(root / "probe.jsonl")
    lm = load_model(runs["model"], device="cpu", dtype="float32")
    cfg = EvaluateConfig(tokens=1024, probe_corpus=str(corpus), probing=ProbingConfig(train_per_class=40, test_per_class=10),
                         absorption=AbsorptionConfig(words=0, icl_examples=3, l1_epochs=3, max_k=3, min_letters=1,
                                                     min_probe_f1=0.0))
    evaluate_run(runs["wide"], cfg, lm=lm)
    return runs, lm, corpus


def test_evaluation_file_holds_every_group(evaluated):
    runs, _, _ = evaluated
    table, meta = read_evaluation(runs["wide"])
    rows = table.to_pylist()
    assert {r["group"] for r in rows} == {"core", "sparse_probing", "absorption"}
    man = json.loads((runs["wide"] / "manifest.json").read_text())
    assert meta["sae_hash"] == man["sae"]["hash"] and meta["created"] == man["created"]
    assert meta["settings"]["tokens"] == 1024 and "core_seconds" in meta["timings"] and meta["machine"]["cpu"]
    tasks = {r["task"] for r in rows if r["group"] == "sparse_probing" and r["metric"] == "llm_accuracy"}
    assert tasks == {"manual_part/c_api", "manual_part/library", "manual_part/whats_new", "code_vs_prose/code",
                     "manual_part", "code_vs_prose", None}
    ks = {r["k"] for r in rows if r["metric"] == "sae_top_k_accuracy"}
    assert ks == set(K_VALUES)
    for r in rows:
        if r["metric"].endswith("accuracy"):
            assert 0.0 <= r["value"] <= 1.0
    # code blocks and prose differ in tokens: a single latent tells them apart on the tiny corpus
    code = next(r for r in rows if r["task"] == "code_vs_prose/code" and r["metric"] == "sae_top_k_accuracy" and r["k"] == 20)
    assert code["value"] >= 0.9 and len(code["latents"]) == 20


def test_core_figures_against_brute_force(evaluated):
    runs, lm, _ = evaluated
    table, _ = read_evaluation(runs["wide"])
    core = {r["metric"]: r for r in table.to_pylist() if r["group"] == "core"}
    sae = load_sae(runs["model"].parent / "sae_wide")
    with RunStore.open(runs["wide"]) as store:
        ids = torch.tensor(sample_contexts(store, 1024))
        densities = store.densities()
    xs, xhats = [], []
    for start in range(0, len(ids), 16):
        batch = ids[start : start + 16]
        x = lm.capture(batch, sae.cfg.hook_name)[sae.cfg.hook_name].float()
        mask = stats_mask(batch, lm.special_token_ids)
        norms = x.norm(dim=-1)
        mask &= norms < MASSIVE_FACTOR * norms[mask].median()
        xs.append(x[mask])
        xhats.append(sae(x[mask]).x_hat.float())
    x, xh = torch.cat(xs).double().numpy(), torch.cat(xhats).double().numpy()
    nx, nh = np.linalg.norm(x, axis=1), np.linalg.norm(xh, axis=1)
    assert core["l2_ratio"]["n"] == len(x)
    assert core["l2_ratio"]["value"] == pytest.approx(np.mean(nh / nx), rel=1e-5)
    assert core["cosine"]["value"] == pytest.approx(np.mean((x * xh).sum(1) / (nx * nh)), rel=1e-5)
    assert core["relative_reconstruction_bias"]["value"] == pytest.approx((nh**2).sum() / (x * xh).sum(), rel=1e-5)
    assert core["frac_over_1pct"]["value"] == pytest.approx((densities > 0.01).mean())
    assert core["frac_over_10pct"]["value"] == pytest.approx((densities > 0.1).mean())


def test_evaluate_command_and_its_errors(evaluated, capsys):
    runs, _, corpus = evaluated
    assert main(["evaluate", str(runs["narrow"]), "--parts", "core", "--tokens", "256", "--device", "cpu",
                 "--dtype", "float32"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["out"].endswith("evaluation.parquet") and 0 < out["core/cosine"] <= 1 and "core/l2_ratio" in out
    assert main(["evaluate", str(runs["narrow"]), "--parts", "core,vibes"]) == 2
    assert "parts must be among" in capsys.readouterr().err
    assert main(["evaluate", str(runs["narrow"]), "--parts", "sparse_probing", "--probe-corpus", str(corpus.parent / "x.jsonl"),
                 "--device", "cpu", "--dtype", "float32"]) == 2
    assert "no corpus for the probing texts" in capsys.readouterr().err


def test_evaluate_command_adds_separability_with_concepts(evaluated, capsys, tmp_path):
    runs, _, _ = evaluated
    assert main(["evaluate", str(runs["narrow"]), "--parts", "separability", "--device", "cpu"]) == 2
    assert "needs --concepts" in capsys.readouterr().err
    concepts = tmp_path / "concepts.jsonl"
    texts = {"code": "def f(x): return x + 1", "prose": "The river runs past the old mill in spring"}
    concepts.write_text("\n".join(json.dumps({"text": f"{t} {i}", "label": label})
                                  for i in range(8) for label, t in texts.items()))
    assert main(["evaluate", str(runs["narrow"]), "--parts", "separability", "--concepts", str(concepts),
                 "--separability-pool", "max", "--device", "cpu", "--dtype", "float32"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert 0 <= out["separability/mean_js_all"] <= 1 and out["separability/neuron_polysemantic_fraction"] == 1.0
    table, meta = read_evaluation(runs["narrow"])
    assert meta["settings"]["separability"]["pool"] == "max"
    assert {r["task"] for r in table.to_pylist() if r["metric"] == "texts"} == {"code", "prose"}


@pytest.mark.parametrize("command", ["compare", "evaluate"])
def test_help_of_the_eval_commands(command, capsys):
    from engine.cli import build_parser

    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0 and command in capsys.readouterr().out
