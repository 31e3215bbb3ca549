"""Disk full: a run recomputed on a filesystem with too little room fails with ENOSPC and leaves the previous run
whole (readable, unchanged). On a real size-limited tmpfs where this machine lets us mount one (root, as in CI);
elsewhere the same run with ENOSPC injected into every Parquet write after the first few."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from engine.precompute.pipeline import precompute
from engine.run.store import RunStore
from tests.engine.runs_util import write_corpus
from tests.engine.saes_util import random_sae

OPTIONS = {"context_len": 16, "batch_size": 4, "progress": False, "snapshot_tokens": 0}


def snapshot(run: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(run.iterdir()) if p.is_file() and not p.name.startswith(".")}


@pytest.fixture
def small_disk(tmp_path):
    """``mount(bytes)``: a folder on a filesystem of that size, a real tmpfs if one can be mounted here, else None
    (the test then injects ENOSPC)."""
    mounted = []

    def mount(size: int) -> Path | None:
        folder = tmp_path / "disk"
        folder.mkdir()
        if os.geteuid() != 0 or not shutil.which("mount"):
            return None
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
        if done.returncode != 0:
            return None
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_full_disk_leaves_the_previous_run_whole(tiny_llama, tmp_path, small_disk, monkeypatch):
    corpus = write_corpus(tmp_path / "c.jsonl", n_docs=60)
    sae = random_sae("topk", d_sae=4096, hook="blocks.1.hook_resid_post")
    first = tmp_path / "first"
    precompute(tiny_llama, sae, corpus, first, tokens=16 * 8, **OPTIONS)
    used = sum(p.stat().st_size for p in first.rglob("*") if p.is_file())
    disk = small_disk(int(used * 1.6) // 4096 * 4096 + 4096)  # room for the run and a little more, not for two
    run = (disk or tmp_path) / "run"
    shutil.copytree(first, run)
    before = snapshot(run)
    with RunStore.open(run) as store:
        n_before = store.n_features()
    if disk is None:  # no tmpfs here: the disk fills after the first few files of the next run
        real, calls = pq.write_table, []

        def full(*args, **kwargs):
            calls.append(1)
            if len(calls) > 2:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(*args, **kwargs)

        monkeypatch.setattr(pq, "write_table", full)
    with pytest.raises(OSError) as err:  # 60 documents of examples and contexts do not fit in what is left
        precompute(tiny_llama, random_sae("topk", d_sae=4096, seed=1, hook="blocks.1.hook_resid_post"), corpus, run,
                   force=True, **OPTIONS)
    assert err.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert snapshot(run) == before  # byte for byte: nothing of the failed run replaced a file
    assert not (run / ".partial").exists()
    with RunStore.open(run) as store:
        assert store.n_features() == n_before and store.feature(0) is not None
