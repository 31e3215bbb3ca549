"""The statistics mask: position 0, special tokens and massive-activation tokens."""

import torch

from engine.data.activations import iter_activations, stats_mask

HOOK = "blocks.0.hook_resid_post"


def test_stats_mask_drops_first_position_and_specials():
    ids = torch.tensor([[5, 6, 0, 7], [0, 8, 9, 10]])
    mask = stats_mask(ids, {0})
    assert mask.tolist() == [[False, True, False, True], [False, True, True, True]]
    assert stats_mask(ids, {0}, include_first=True, include_special=True).all()


def test_massive_activation_tokens_are_excluded_by_default(tiny_llama):
    lm = tiny_llama
    contexts = [list(range(10, 26)), list(range(30, 46))]

    def sink(x):  # make one mid-context token a massive activation, as attention sinks are
        x = x.clone()
        x[1, 7] *= 500
        return x

    with lm.hooks.intervene(HOOK, sink):
        default = next(iter_activations(lm, HOOK, contexts, 2))
        kept = next(iter_activations(lm, HOOK, contexts, 2, include_massive=True))
    assert not default.mask[1, 7] and kept.mask[1, 7]
    assert default.mask.sum() == kept.mask.sum() - 1
    plain = next(iter_activations(lm, HOOK, contexts, 2))
    assert plain.mask.sum() == kept.mask.sum()  # no token of an ordinary batch is dropped
