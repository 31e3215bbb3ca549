"""Each text's pooled unit values on a tiny model, against single-text forwards (padded batches change nothing)."""

import numpy as np
import torch

from engine.data.text_values import unit_values
from tests.engine.saes_util import random_sae

TEXTS = ["In the beginning was the word", "def main(): return 0", "import os", "The quick brown fox jumps"]


def test_unit_values_are_single_text_forwards(tiny_llama):
    lm, sae = tiny_llama, random_sae("topk", d_in=64, d_sae=128)
    last = unit_values(lm, sae, TEXTS, "last", batch_size=3)  # padded batches of different lengths
    top = unit_values(lm, sae, TEXTS, "max", batch_size=3)
    hook = sae.cfg.hook_name
    for i, text in enumerate(TEXTS):
        ids = torch.tensor([lm.tokenizer(text, add_special_tokens=False)["input_ids"]])
        x = lm.capture(ids, hook)[hook][0].float()
        codes = sae(x).codes.float()
        np.testing.assert_allclose(last.neurons[i], x[-1].numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(last.latents[i], codes[-1].detach().numpy(), rtol=1e-4, atol=1e-4)
        # position 0 (the attention sink) is never counted
        np.testing.assert_allclose(top.neurons[i], x[1:].amax(0).numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(top.latents[i], codes[1:].amax(0).detach().numpy(), rtol=1e-4, atol=1e-4)
