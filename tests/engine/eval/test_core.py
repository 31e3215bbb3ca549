"""Core extras by hand (L2 ratio, relative reconstruction bias, cosine, firing fractions) and the probing
labels derived from Info-formatted documentation."""

import numpy as np
import pytest
import torch

from engine.eval.core import CoreStats, firing_fractions
from engine.eval.probing_data import Block, blocks, datasets


def test_core_stats_by_hand():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 6, generator=gen)
    x_hat = 0.8 * x + 0.1 * torch.randn(50, 6, generator=gen)
    x[7] = 0  # a zero token: its ratio is ||x_hat|| (SAEBench divides by 1 below 1e-4)
    stats = CoreStats()
    stats.update(x[:20], x_hat[:20])
    stats.update(x[20:], x_hat[20:])
    xs, xh = x.double().numpy(), x_hat.double().numpy()
    nx, nh = np.linalg.norm(xs, axis=1), np.linalg.norm(xh, axis=1)
    ratio = [nh[i] / (nx[i] if nx[i] >= 1e-4 else 1.0) for i in range(50)]
    cos = [xs[i] @ xh[i] / max(nx[i] * nh[i], 1e-12) for i in range(50)]
    got = stats.summary()
    assert got["l2_ratio"] == pytest.approx(np.mean(ratio), rel=1e-12)
    assert got["relative_reconstruction_bias"] == pytest.approx(np.sum(nh**2) / np.sum((xs * xh).sum(1)), rel=1e-12)
    assert got["cosine"] == pytest.approx(np.mean(cos), rel=1e-12)


def test_a_scaled_reconstruction_has_bias_and_ratio_equal_to_its_scale():
    x = torch.randn(30, 4, generator=torch.Generator().manual_seed(1))
    stats = CoreStats()
    stats.update(x, 0.7 * x)
    got = stats.summary()
    assert got["l2_ratio"] == pytest.approx(0.7) and got["relative_reconstruction_bias"] == pytest.approx(0.7)
    assert got["cosine"] == pytest.approx(1.0)


def test_firing_fractions():
    d = np.array([0.0, 0.005, 0.011, 0.2, 0.1, 0.5, 0.0, 0.02])
    assert firing_fractions(d) == {"frac_over_1pct": 5 / 8, "frac_over_10pct": 2 / 8, "frac_alive": 6 / 8}


DOC = """5.2.1 os.path
.............

The module joins paths for you
and normalises them.

     >>> os.path.join("a", "b")
     'a/b'

   * A list item that explains
     something about the module.

          x = compute(1, 2)
          print(x)

     Prose inside the item, indented
     like the item's text.

* Menu::
* Other::
"""


def test_blocks_get_code_prose_and_chapter_labels():
    got = blocks(DOC, doc=3)
    kinds = [(b.kind, b.text.split("\n")[0].strip()[:12]) for b in got]
    assert kinds == [(None, "5.2.1 os.pat"), ("prose", "The module j"), ("code", '>>> os.path.'), (None, "* A list ite"),
                     ("code", "x = compute("), (None, "Prose inside"), (None, "* Menu::")]
    assert {b.manual_part for b in got} == {"library"} and {b.doc for b in got} == {3}
    assert blocks("1.4 What's new\n\nSome text\nmore.", 0)[1].manual_part == "whats_new"
    assert blocks("12 Glossary\n\nSome text\nmore.", 0)[1].manual_part is None


def test_datasets_split_by_document_and_cap_classes():
    items = [Block(f"t{i}", doc=i // 4, manual_part=("library", "c_api")[i % 2], kind=("code", "prose")[(i // 2) % 2])
             for i in range(400)]
    (part, kind) = datasets(items, train_per_class=30, test_per_class=12, seed=0)
    assert part.name == "manual_part" and kind.name == "code_vs_prose"
    for data in (part, kind):
        for cls in data.train:
            assert len(data.train[cls]) == 30 and len(data.test[cls]) == 12
            assert all(items[i].doc % 5 != 0 for i in data.train[cls]) and all(items[i].doc % 5 == 0 for i in data.test[cls])
    assert datasets(items[:8]) == []  # too few blocks per class
