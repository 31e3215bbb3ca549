"""``saescope evaluate``: SAEBench-style metrics of a run's SAE, offline, into ``<RUN>/evaluation.parquet``.

Parts: ``core`` (``core``: L2 ratio, relative reconstruction bias, cosine over a token sample of the run;
firing fractions from the run's densities), ``sparse_probing`` (``sparse_probing`` on texts of a corpus,
``probing_data``), ``absorption`` (``absorption``, on the model's vocabulary), ``separability`` (``separability``:
concept separability of latents and neurons on a labelled JSONL, only when one is given). Each writes rows of
``schema.EVALUATION_SCHEMA``; the settings, the run's identity, timings and the CPU go in the file's metadata.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import lock
from ..model.loading import LoadedModel
from ..model.machine import cpu_facts
from ..run.loaded import load_run_model, load_run_sae
from ..run.manifest import sections
from ..run.store import RunStore
from . import files, schema
from .absorption import AbsorptionConfig, absorption
from .core import CoreStats, firing_fractions
from .probing_data import corpus_blocks, datasets
from .sample import sample_contexts, sample_pass
from .separability import SeparabilityConfig, separability_rows
from .sparse_probing import ProbingConfig, Row, means, pooled, probe_dataset

PARTS = ("core", "sparse_probing", "absorption", "separability")
DEFAULT_PARTS = PARTS[:3]
"""What ``evaluate`` computes unless told: separability needs a labelled file (``--concepts``), which adds it."""


@dataclass
class EvaluateConfig:
    """Settings of ``evaluate_run`` (recorded in the file's metadata)."""

    parts: tuple[str, ...] = DEFAULT_PARTS
    tokens: int = 16384
    """Sample tokens of the run for the core metrics."""
    batch_size: int = 16
    """Contexts per model forward."""
    probe_corpus: str | None = None
    """Corpus of the probing texts (default: the run's corpus)."""
    probing: ProbingConfig = field(default_factory=ProbingConfig)
    absorption: AbsorptionConfig = field(default_factory=AbsorptionConfig)
    separability: SeparabilityConfig = field(default_factory=SeparabilityConfig)

    def __post_init__(self) -> None:
        unknown = [p for p in self.parts if p not in PARTS]
        if unknown or not self.parts:
            raise ValueError(f"parts must be among {', '.join(PARTS)}, got {', '.join(self.parts) or 'none'}")
        if "separability" in self.parts and self.separability.concepts is None:
            raise ValueError("the separability part needs --concepts FILE (a JSONL of {\"text\", \"label\"} lines)")
        if self.tokens < 1:
            raise ValueError(f"tokens must be >= 1, got {self.tokens}")


def core_rows(lm: LoadedModel, sae, store: RunStore, cfg: EvaluateConfig) -> list[Row]:
    stats = CoreStats()
    for batch in sample_pass(lm, [sae], sample_contexts(store, cfg.tokens), cfg.batch_size):
        stats.update(batch.x, batch.outputs[0].x_hat)
    rows = [Row("core", name, None, None, value, stats.n) for name, value in stats.summary().items()]
    densities = store.densities()
    rows += [Row("core", name, None, None, value, len(densities)) for name, value in firing_fractions(densities).items()]
    return rows


def probing_rows(lm: LoadedModel, sae, store: RunStore, cfg: EvaluateConfig) -> list[Row]:
    corpus = cfg.probe_corpus or sections(store.manifest()).corpus.path
    if not corpus or not Path(corpus).exists():
        raise FileNotFoundError(f"no corpus for the probing texts at {corpus!r}: pass --probe-corpus")
    blocks = corpus_blocks(corpus)
    sets = datasets(blocks, cfg.probing.train_per_class, cfg.probing.test_per_class, cfg.probing.seed)
    if not sets:
        raise ValueError(f"the corpus {corpus} yields no labelled probing texts (see engine/eval/probing_data.py)")
    wanted = sorted({i for d in sets for side in (d.train, d.test) for ids in side.values() for i in ids})
    pool = pooled(lm, sae, [blocks[i].text for i in wanted], cfg.probing.max_tokens, cfg.probing.batch_size)
    where = {i: r for r, i in enumerate(wanted)}  # block index -> row of the pooled arrays
    rows: list[Row] = []
    for data in sets:
        data.train = {c: [where[i] for i in ids] for c, ids in data.train.items()}
        data.test = {c: [where[i] for i in ids] for c, ids in data.test.items()}
        rows += probe_dataset(data, pool, cfg.probing)
    return rows + means(rows)


def evaluate_run(run_dir: str | Path, cfg: EvaluateConfig | None = None, *, lm: LoadedModel | None = None,
                 device: str = "auto", dtype: str = "auto") -> Path:
    """Evaluate the run's SAE (see the module docstring); returns the path of ``evaluation.parquet``."""
    with lock.hold(run_dir, shared=True), lock.hold(run_dir, "saescope evaluate", name=".saescope-evaluate.lock"):
        cfg = cfg or EvaluateConfig()
        started = time.perf_counter()
        with RunStore.open(run_dir) as store:
            lm = load_run_model(store.manifest(), f"run {store.run_dir}", lm=lm, device=device, dtype=dtype)
            sae = load_run_sae(store.manifest(), f"run {store.run_dir}", device=lm.device)
            timings = {"load_seconds": time.perf_counter() - started}
            rows: list[Row] = []
            for part, fn in (("core", core_rows), ("sparse_probing", probing_rows), ("absorption", None),
                             ("separability", None)):
                if part not in cfg.parts:
                    continue
                tick = time.perf_counter()
                if fn is not None:
                    rows += fn(lm, sae, store, cfg)
                elif part == "absorption":
                    rows += absorption(lm, sae, cfg.absorption)
                else:
                    rows += separability_rows(lm, sae, cfg.separability, cfg.batch_size)
                timings[f"{part}_seconds"] = time.perf_counter() - tick
            man = store.manifest()
        facts = cpu_facts()
        meta = {
            "run": str(run_dir), "created": man.get("created"), "model_hash": sections(man).model.hash,
            "sae_hash": sections(man).sae.hash, "n_tokens": sections(man).corpus.n_tokens,
            "settings": asdict(cfg), "timings": {k: round(v, 3) for k, v in timings.items()},
            "machine": {"cpu": facts.model, "threads": facts.threads, "device": str(lm.device), "dtype": str(lm.dtype)},
        }
        columns = {name: [getattr(r, name) for r in rows] for name in schema.EVALUATION_SCHEMA.names}
        return files.write_evaluation(run_dir, columns, meta)
