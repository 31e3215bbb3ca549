import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_llama():
    from engine.model.tiny import tiny_model

    return tiny_model("llama")


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """300 short documents of ``TINY_TEXT`` (what the tiny models' tokenizer was trained on), as JSONL."""
    import json

    from engine.model.tiny import TINY_TEXT

    path = tmp_path_factory.mktemp("tiny-corpus") / "train.jsonl"
    path.write_text("\n".join(json.dumps({"text": TINY_TEXT + f" Document {i}."}) for i in range(300)))
    return path


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` run where torch sees a CUDA device and are skipped, with the reason, elsewhere."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False here (run scripts/gpu_check.sh on one)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
