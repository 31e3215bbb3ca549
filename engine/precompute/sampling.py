"""A fixed-size uniform sample of contexts (reservoir sampling), with the per-token data the error rows need.

Only held-out contexts are offered (see ``is_heldout``), so the linear error map scored on the sampled
tokens was not fitted on them. Memory is ``capacity * context_len * d_in`` floats twice, whatever the
corpus length.

The contexts whose next-token losses are scored (``scored``) are the filled slots first in a random order of the
slots drawn once (``priority``), not the first slots: algorithm R leaves context ``i`` in slot ``i`` until it is
replaced, so the first slots of a run shorter than a few times the capacity hold its first contexts. A random
subset of slots chosen independently of what they hold is a uniform subset of the sample, so a 1-shard run and a
merged N-shard run (whose merge shuffles the slots) score a uniform sample of their held-out contexts alike.
"""

from __future__ import annotations

import numpy as np
import torch

HELDOUT_EVERY = 10
PRIORITY_SEED_OFFSET = 0x5EED
"""Added to the sample's seed to seed the slots' scoring order (``ContextSample.priority``)."""


def is_heldout(context_ids: torch.Tensor) -> torch.Tensor:
    """Contexts whose id is a multiple of ``HELDOUT_EVERY`` score the dark-matter map; the rest fit it."""
    return context_ids % HELDOUT_EVERY == 0


class ContextSample:
    """Reservoir (algorithm R) of up to ``capacity`` contexts: token ids, mask, x, error and L0 per token."""

    def __init__(self, capacity: int, context_len: int, d_in: int, device: torch.device | str = "cpu", seed: int = 0):
        self.capacity = capacity
        self.seen = 0
        self.context_id = torch.full((capacity,), -1, dtype=torch.int64)
        self.token_ids = torch.zeros(capacity, context_len, dtype=torch.int64)
        self.mask = torch.zeros(capacity, context_len, dtype=torch.bool)
        self.x = torch.zeros(capacity, context_len, d_in, device=device)
        self.err = torch.zeros(capacity, context_len, d_in, device=device)
        self.l0 = torch.zeros(capacity, context_len, dtype=torch.int64, device=device)
        self.gen = torch.Generator().manual_seed(seed)
        # a stream of its own, so the reservoir's draws are those of a sample without it
        self.priority = torch.randperm(capacity, generator=torch.Generator().manual_seed(seed + PRIORITY_SEED_OFFSET))

    def offer(self, context_ids, token_ids, mask, x, err, l0) -> None:
        """Offer a batch's held-out contexts (all ``[batch, ...]``); a Python loop over at most ``batch`` rows."""
        for row in is_heldout(context_ids).nonzero(as_tuple=True)[0].tolist():
            if self.seen < self.capacity:
                slot = self.seen
            else:
                slot = int(torch.randint(0, self.seen + 1, (1,), generator=self.gen))
            self.seen += 1
            if slot >= self.capacity:
                continue
            self.context_id[slot] = context_ids[row]
            self.token_ids[slot] = token_ids[row]
            self.mask[slot] = mask[row].cpu()
            self.x[slot] = x[row]
            self.err[slot] = err[row]
            self.l0[slot] = l0[row]

    def merge(self, other: ContextSample, gen: np.random.Generator) -> None:
        """Become a uniform sample of the union of this sample's and ``other``'s contexts (disjoint; each a uniform
        sample of its own): how many come from each side is hypergeometric, which of them uniform, and the slots
        are shuffled; this sample's ``priority`` stays, so ``scored`` is again a uniform subset."""
        population = self.seen + other.seen
        size = min(self.capacity, population)
        from_self = int(gen.hypergeometric(self.seen, other.seen, size)) if self.seen and other.seen else (
            size if other.seen == 0 else 0)

        def pick(sample: ContextSample, n: int) -> list[tuple[ContextSample, int]]:
            filled = (sample.context_id >= 0).nonzero(as_tuple=True)[0].numpy()
            return [(sample, int(i)) for i in gen.choice(filled, size=n, replace=False)]

        chosen = pick(self, from_self) + pick(other, size - from_self)
        chosen = [chosen[i] for i in gen.permutation(len(chosen))]
        names = ("context_id", "token_ids", "mask", "x", "err", "l0")
        # stacked (copied) before this sample's buffers are cleared: some rows are this sample's own
        rows = {name: torch.stack([getattr(src, name)[i].to(getattr(self, name).device) for src, i in chosen])
                for name in names} if chosen else {}
        for name in names:
            buffer = getattr(self, name)
            buffer.fill_(-1) if name == "context_id" else buffer.zero_()
            if rows:
                buffer[: len(chosen)] = rows[name]
        self.seen = population

    def scored(self, n: int) -> torch.Tensor:
        """The slots whose contexts get their losses scored: the ``n`` filled slots first in ``priority`` (a uniform
        ``n``-subset of the sample; once all slots are filled, the same slots from one snapshot to the next)."""
        filled = (self.context_id >= 0).nonzero(as_tuple=True)[0]
        priority = getattr(self, "priority", None)
        if priority is None:  # a task state saved before the order existed: one drawn now, from a fixed seed
            gen = torch.Generator().manual_seed(PRIORITY_SEED_OFFSET)
            priority = self.priority = torch.randperm(self.capacity, generator=gen)
        return filled[priority[filled].argsort()[:n]]

    def taken(self) -> torch.Tensor:
        """Indices of filled slots, ordered by context id."""
        filled = (self.context_id >= 0).nonzero(as_tuple=True)[0]
        return filled[self.context_id[filled].argsort()]
