import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score

from engine.circuits.files import list_circuits, read_circuit
from engine.circuits.patching import resolve_wrong
from engine.circuits.path_patching import path_patch_scan
from engine.circuits.pipeline import CircuitConfig, run_circuit
from engine.circuits.tasks import Task, load_jsonl
from engine.cli import main
from engine.model.loading import load_model
from engine.model.tiny import save_tiny_model, tiny_model

from .circuit_util import FAST, tiny_circuit, write_task


def test_a_circuit_run_writes_consistent_files(tmp_path):
    result, folder = tiny_circuit(tmp_path)
    assert list_circuits(tmp_path / "circuits") == ["tiny"]
    info, tables = read_circuit(folder)
    heads, codes, prompts = (tables[n].to_pandas() for n in ("heads", "codes", "prompts"))
    n_heads = result.n_layers * result.n_heads
    assert len(heads) == n_heads and len(prompts) == 10 and len(codes) == 10 * n_heads
    grid = codes.pivot(index="prompt", columns="head_index", values="code").to_numpy()
    pos, neg = grid[prompts["positive"].to_numpy()], grid[~prompts["positive"].to_numpy()]
    by_hand = np.array([len(set(pos[:, h]) - set(neg[:, h])) for h in range(n_heads)])
    np.testing.assert_array_equal(heads["unique_positive"], by_hand)
    e = np.exp(by_hand - by_hand.max())
    np.testing.assert_allclose(heads["node_score"], e / e.sum())
    # the patching circuit: |effect| >= 1 (some heads, not all); AUC as scikit-learn computes it
    np.testing.assert_array_equal(heads["in_circuit"], np.abs(heads["patch_effect"]) >= 1.0)
    assert 0 < heads["in_circuit"].sum() < n_heads and len(info["agreement"]) == 2
    for a in info["agreement"]:
        truth = heads["in_circuit"].to_numpy()
        scores = heads["node_score" if a["method"] == "node" else "edge_score"].to_numpy()
        assert a["auc"] == pytest.approx(roc_auc_score(truth, scores))
    assert info["performance"]["accuracy"] == result.performance.accuracy
    assert set(info["timings"]) == {"code_method_s", "code_forward_s", "patching_s", "code_method_cpu_s",
                                  "patching_cpu_s"}


def test_a_model_that_fails_the_task_is_refused(tmp_path):
    lm = tiny_model("llama", n_layers=2)
    task = load_jsonl(write_task(tmp_path / "t.jsonl"), lm.tokenizer)
    cfg = CircuitConfig(**{**FAST.__dict__, "min_accuracy": 1.0})
    with pytest.raises(ValueError, match=r"the model does not do the t task: \d+% of 5 prompts answered right"):
        run_circuit(lm, task, cfg)


def test_cli_writes_the_folder_and_refuses_bad_input_writing_nothing(tmp_path, capsys):
    model = save_tiny_model(tmp_path / "model")
    task = write_task(tmp_path / "mine.jsonl")
    args = ["circuit", "--model", str(model), "--task", str(task), "--out", str(tmp_path / "out"), "--n-latents", "8",
            "--epochs", "5", "--n-train", "4", "--min-accuracy", "0", "--patch-prompts", "2", "--no-mean-ablation"]
    assert main([*args, "--path-patching"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["out"] == str(tmp_path / "out" / "mine")
    heads = pq.read_table(tmp_path / "out" / "mine" / "heads.parquet")
    assert np.isnan(heads["mean_ablation_effect"].to_numpy()).all()
    # the direct-path effects of the 2 patched pairs, as path_patch_scan gives them on the same model and task
    lm = load_model(str(model))
    task = resolve_wrong(lm, load_jsonl(task, lm.tokenizer))
    expected = path_patch_scan(lm, Task(task.name, task.pairs[:2])).ravel()
    np.testing.assert_allclose(heads["path_patch_effect"].to_numpy(), expected, rtol=1e-5, atol=1e-6)
    for extra, message in ((["--supervised"], "use --task ioi, not"),
                           (["--supervised", "--task", "ioi"], "--supervised needs an SAE: pass --sae PATH")):
        assert main([*args, *extra]) == 2
        assert message in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "import numpy as", "answer": " np", "counterfactual": "import numpy as np"}))
    assert main([*args[:4], str(bad), *args[5:]]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert errors == ["saescope circuit: error: bad.jsonl row 1: the prompt has 5 tokens and its counterfactual 6; "
                      "they must have the same length"]
    assert not (tmp_path / "out" / "bad").exists()
    assert main([*args[:4], "no-such-task", *args[5:]]) == 2
    assert "unknown task 'no-such-task'" in capsys.readouterr().err


def test_a_second_run_of_the_same_task_is_refused(tmp_path, capsys):
    import fcntl
    import os

    out = tmp_path / "out"
    out.mkdir()
    fd = os.open(out / ".saescope-circuit-mine.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another writer of this task holds it
        task = write_task(tmp_path / "mine.jsonl")
        assert main(["circuit", "--model", "no-model-needed", "--task", str(task), "--out", str(out)]) == 2
        assert "saescope circuit: error:" in capsys.readouterr().err
        assert list(out.iterdir()) == [out / ".saescope-circuit-mine.lock"]
    finally:
        os.close(fd)
