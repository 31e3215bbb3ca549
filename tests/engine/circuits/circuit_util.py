"""A tiny circuit run for tests: a random tiny Llama and a JSONL task written for its tokenizer."""

import json
from pathlib import Path

from engine.circuits.files import write_circuit
from engine.circuits.pipeline import CircuitConfig, run_circuit
from engine.circuits.tasks import load_jsonl
from engine.model.families import decoder_layers, get_path
from engine.model.tiny import tiny_model

ROWS = [("And God said, Let there be", " light", "And God said, Let there was"),
        ("And the word was with the", " word", "And the light was with the"),
        ("def add(a, b):\n    return a +", " b", "def add(b, a):\n    return a +"),
        ("The quick brown fox jumps over", " the", "The quick brown fox jumps with"),
        ("import numpy as", " np", "import numpy be")]
"""Prompt, answer (one token of the tiny tokenizer), counterfactual (as many tokens as the prompt)."""

FAST = CircuitConfig(n_latents=16, epochs=100, lr=1e-2, l1=0.0, n_train=10, min_accuracy=0.0, patch_prompts=5,
                     circuit_threshold=1.0)


def write_task(path: Path, rows=ROWS) -> Path:
    path.write_text("\n".join(json.dumps({"prompt": p, "answer": a, "counterfactual": c}) for p, a, c in rows))
    return path


def loud_tiny_model():
    """The tiny Llama with its heads' outputs scaled up 300x: at random initialisation they are ~0.01 long, below the
    code SAE's encoder biases, and every head would get the same code."""
    import torch

    lm = tiny_model("llama", n_layers=2)
    with torch.no_grad():
        for block in decoder_layers(lm.model, lm.family):
            out = get_path(block, f"{lm.family.attn}.{lm.family.out_proj}")
            assert isinstance(out, torch.nn.Linear)
            out.weight *= 300
    return lm


def tiny_circuit(root: Path, cfg: CircuitConfig = FAST):
    """The result of a circuit run on the tiny model, written under ``root/circuits``."""
    lm = loud_tiny_model()
    task = load_jsonl(write_task(root / "tiny.jsonl"), lm.tokenizer)
    result = run_circuit(lm, task, cfg)
    return result, write_circuit(root / "circuits", result, "tiny-llama")


def fake_supervised(hook: str):
    """A small hand-made supervised-dictionary result at ``hook`` (for the page: its numbers are planted, not run)."""
    import numpy as np

    from engine.circuits.supervised import f1_table
    from engine.circuits.supervised_run import Approximation, ControlPoint, PositionResult, SupervisedConfig, SupervisedResult

    labels = {"io": ["Ann", "Bob", "Ann", "Bob"], "s": ["Cy", "Cy", "Dee", "Dee"], "io_pos": ["ABBA", "BABA"] * 2}
    active = np.array([[1, 0, 1], [0, 1, 1], [1, 0, 0], [0, 1, 0]], dtype=bool)
    f1 = {a: f1_table(active, v) for a, v in labels.items()}
    control = (ControlPoint("patch", 0, 1.0, 1.0, 0.0), ControlPoint("none", 0, 0.0, 0.0, 0.0),
               ControlPoint("supervised", 0, 0.75, 0.75, 0.0), ControlPoint("sae", 1, 0.25, 0.25, 2.0),
               ControlPoint("sae", 2, 0.5, 0.5, 4.0))
    positions = (PositionResult("io", Approximation(4.0, 3.0, 3.9, 1.0), control, f1, 8, 6),)
    return SupervisedResult(hook, 1.0, positions, SupervisedConfig(fit_prompts=8, eval_prompts=8, positions=("io",),
                                                                   max_exchange=2), 8, {"wall_s": 1.0, "cpu_s": 1.0})
