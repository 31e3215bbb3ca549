"""precompute --shards --ray ADDRESS joins a Ray cluster started apart (`ray start --head`), as on a real cluster; an
address where no cluster runs fails with a clear message. In its own module: `ray stop` ends every Ray process."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from engine.model.tiny import save_tiny_model
from tests.engine.runs_util import write_corpus
from tests.engine.saes_util import random_sae

pytestmark = pytest.mark.slow
RAY = Path(sys.executable).with_name("ray")


@pytest.fixture
def head(tmp_path):
    if not RAY.exists():
        pytest.fail(f"the ray command is missing beside {sys.executable}: pip install -e '.[test]'")
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    started = subprocess.run([str(RAY), "start", "--head", "--num-cpus", "2", "--port", "6391", "--include-dashboard",
                              "false", "--disable-usage-stats"], capture_output=True, text=True, env=env, timeout=120)
    assert started.returncode == 0, started.stderr[-2000:]
    address = re.search(r"ray start --address='([^']+)'", started.stdout + started.stderr)
    assert address, started.stdout[-2000:]
    yield address.group(1), env
    subprocess.run([str(RAY), "stop", "--force"], capture_output=True, timeout=120)


def test_precompute_joins_a_separately_started_cluster(head, tmp_path):
    address, env = head
    model = save_tiny_model(tmp_path / "model")
    corpus = write_corpus(tmp_path / "corpus.jsonl", n_docs=30)
    random_sae("topk", seed=0).save(tmp_path / "sae")
    args = [sys.executable, "-m", "engine.cli", "precompute", "--model", str(model), "--sae", str(tmp_path / "sae"),
            "--corpus", str(corpus), "--context-len", "16", "--batch-size", "8", "--device", "cpu", "--dtype", "float32",
            "--shards", "2"]
    joined = subprocess.run([*args, "--out", str(tmp_path / "run"), "--ray", address], capture_output=True, text=True,
                            env={**env, "RAY_AUTH_MODE": "token"}, timeout=300)
    assert joined.returncode == 0, joined.stderr[-3000:]
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["sharding"]["shards"] == 2 and manifest["corpus"]["n_tokens"] == json.loads(joined.stdout)["n_tokens"]
    assert {t["pid"] for t in manifest["sharding"]["tasks"]}.isdisjoint({os.getpid()})

    wrong = subprocess.run([*args, "--out", str(tmp_path / "run2"), "--ray", "127.0.0.1:1"], capture_output=True,
                           text=True, env=env, timeout=300)
    assert wrong.returncode != 0 and "could not join the Ray cluster at 127.0.0.1:1" in wrong.stderr
    assert not (tmp_path / "run2" / "manifest.json").exists()
    shutil.rmtree(tmp_path / "model")
