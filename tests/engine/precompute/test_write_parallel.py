"""The examples file written by several threads equals the one written by one; ``ordered_map`` keeps order and
bounds what waits."""

import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from engine.precompute.accumulators import sparse_codes
from engine.precompute.reservoirs import ExampleReservoirs
from engine.precompute.runfiles import ordered_map, write_examples
from engine.run import schema

D, POS, VOCAB = 700, 12, 50


def _reservoirs(window=None) -> ExampleReservoirs:
    gen = torch.Generator().manual_seed(0)
    res = ExampleReservoirs(D, POS, top_k=4, n_bins=4, per_bin=2, internal_bins=8, window=window)
    for i in range(12):
        codes = torch.relu(torch.randn(4, POS, D, generator=gen) - 1.5)
        res.update(sparse_codes(codes.reshape(-1, D), torch.ones(4 * POS, dtype=torch.bool)), torch.arange(i * 4, i * 4 + 4))
    return res


@pytest.mark.parametrize("window", [None, 5])
def test_threads_write_the_same_examples_and_labels(tmp_path, window):
    rng = np.random.default_rng(0)
    contexts = pa.table({"context_id": pa.array(np.arange(48), pa.int32()),
                         "token_ids": pa.array(list(rng.integers(0, VOCAB, (48, POS)).astype(np.int32)),
                                               pa.list_(pa.int32()))}, schema=schema.CONTEXTS_SCHEMA)
    vocab = [f"t{i}" for i in range(VOCAB)]
    res = _reservoirs(window)
    out = {}
    for workers in (1, 3):
        folder = tmp_path / f"w{workers}"
        folder.mkdir()
        pq.write_table(contexts, folder / schema.CONTEXTS)
        labels, tops, _ = write_examples(folder, res, vocab, workers=workers)
        out[workers] = (pq.read_table(folder / schema.EXAMPLES), labels, tops)
    (a, la, ta), (b, lb, tb) = out[1], out[3]
    assert a.num_rows > D and a.equals(b)
    assert la == lb and all(np.array_equal(x, y) for x, y in zip(ta, tb, strict=True)) and len(la) == D


def test_ordered_map_keeps_order_and_bounds_the_results_waiting():
    """While the first item is held, only ``workers * ahead`` items are submitted; results come in item order."""
    gate, started, seen = threading.Event(), threading.Semaphore(0), []

    def work(i: int) -> int:
        seen.append(i)
        started.release()
        if i == 0:
            assert gate.wait(timeout=60)  # the first item finishes last
        return i * i

    results = ordered_map(work, list(range(40)), workers=2, ahead=2)
    first: list[int] = []
    taker = threading.Thread(target=lambda: first.append(next(results)))
    taker.start()
    for _ in range(4):
        assert started.acquire(timeout=60)
    assert sorted(seen) == [0, 1, 2, 3]  # the generator waits on item 0: nothing more was submitted
    gate.set()
    taker.join(timeout=60)
    assert first == [0] and [*first, *results] == [i * i for i in range(40)]
    assert list(ordered_map(work, [5, 6], workers=1)) == [25, 36]
