"""A token sample of a run, and one pass of the model and several SAEs over it.

Compare and evaluate both need activations the run did not store: they take ``sample_contexts`` of the run
(spread evenly over its contexts), run the model up to the hook once per batch and every SAE on the same
tokens. Tokens count as in precompute (``engine.data.activations.iter_activations``): position 0,
special tokens and massive-activation tokens are left out.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch

from ..analysis.interventions import compute_copy
from ..data.activations import iter_activations
from ..model.loading import LoadedModel
from ..run import schema
from ..run.manifest import sections
from ..run.parquet import read_context_tokens
from ..run.store import RunStore
from ..saes import SAE, ForwardOutput


class SampleBatch(NamedTuple):
    """The counted tokens of one batch of contexts."""

    x: torch.Tensor
    """``[n, d_in]`` float32 activations at the hook."""
    outputs: list[ForwardOutput]
    """Each SAE's codes and reconstruction of ``x`` (in the order the SAEs were given)."""


def sample_contexts(store: RunStore, tokens: int) -> list[list[int]]:
    """About ``tokens`` tokens of the run's contexts: whole contexts, evenly spread over the run."""
    corpus = sections(store.manifest()).corpus
    n_contexts, context_len = int(corpus.n_contexts or 0), int(corpus.context_len or 0)
    if n_contexts < 1 or context_len < 1:
        raise ValueError(f"the run {store.run_dir} records no contexts in its manifest")
    want = min(n_contexts, max(1, math.ceil(tokens / context_len)))
    ids = np.unique(np.linspace(0, n_contexts - 1, want).round().astype(np.int64))
    _, rows = read_context_tokens(store.data_dir / schema.CONTEXTS, ids)
    if not len(rows):
        raise ValueError(f"the run {store.run_dir} holds none of its contexts")
    return rows.astype(np.int64).tolist()


@torch.inference_mode()
def sample_pass(
    lm: LoadedModel, saes: Sequence[SAE], contexts: Sequence[list[int]], batch_size: int = 16
) -> Iterator[SampleBatch]:
    """Run the model to the SAEs' hook (all the same) once per batch, and every SAE on the counted tokens."""
    hooks = {(sae.cfg.hook_name, sae.cfg.hook_head_index) for sae in saes}
    if len(hooks) != 1:
        raise ValueError(f"the SAEs read different hook points: {', '.join(sorted(str(h) for h in hooks))}")
    hook, head = hooks.pop()
    runs = [compute_copy(sae, lm) for sae in saes]
    for batch in iter_activations(lm, hook, contexts, batch_size, head_index=head):
        x = batch.acts[batch.mask]
        if not len(x):
            continue
        outputs = [ForwardOutput(out.codes.float(), out.x_hat.float(), out.error.float())
                   for out in (sae(x.to(sae.device)) for sae in runs)]
        yield SampleBatch(x.float(), outputs)
