"""The embedded demo's committed SAEs (one run each)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..assets import data_dir

DEMO_HOOK = "blocks.15.hook_resid_post"


def demo_sae_dir() -> Path:
    """The main demo SAE's folder (the first record of ``DEMO_SAES``)."""
    return DEMO_SAES[0].sae_dir

@dataclass(frozen=True)
class DemoSAE:
    """One committed SAE the demo offers, browsed as its own run."""

    run: str
    """The run's name: its folder under ``data/runs/`` and its entry in the app's run picker."""
    folder: str
    """The SAE's folder under ``data/`` (SAELens v6: ``cfg.json`` + ``sae_weights.safetensors``)."""
    hook: str
    """The hook point it reads (also in its ``cfg.json``; checked by the demo tests)."""
    about: str
    """One line saying what it is, for docs/demo.md and ``saescope demo``'s messages."""

    @property
    def sae_dir(self) -> Path:
        return data_dir() / self.folder

    @property
    def run_dir(self) -> Path:
        return data_dir() / "runs" / self.run

    def available(self) -> bool:
        """Whether its folder holds an SAE (``train-sae`` writes the folder at once when training ends)."""
        return (self.sae_dir / "cfg.json").is_file()


DEMO_SAES: tuple[DemoSAE, ...] = (
    DemoSAE("demo", "demo_sae", DEMO_HOOK,
            "TopK, 4,608 latents (8 x d_model), k=64, on the residual stream after block 15 of 30"),
    DemoSAE("demo-attn-l20", "demo_sae_attn", "blocks.20.attn.hook_z",
            "TopK, 4,608 latents, k=48, on block 20's attention output per head (hook_z: 9 heads x 64, before o_proj)"),
    DemoSAE("demo-w1152", "demo_sae_w1152", DEMO_HOOK,
            "TopK, 1,152 latents (2 x d_model), k=64, at the main SAE's hook: a quarter of its width"),
    DemoSAE("demo-w9216", "demo_sae_w9216", DEMO_HOOK,
            "TopK, 9,216 latents (16 x d_model), k=64, at the main SAE's hook: twice its width"),
    DemoSAE("demo-gsae", "demo_sae_gsae", DEMO_HOOK,
            "g-SAE (TopK over z + 10 z |W_dec grad L|), 4,608 latents, k=64, at the main SAE's hook, same tokens"),
    DemoSAE("demo-fc", "demo_sae_fc", DEMO_HOOK,
            "feature choice (each latent takes its top tokens of a batch), 4,608 latents, mean L0 64, same hook and tokens"),
    DemoSAE("demo-mc", "demo_sae_mc", DEMO_HOOK,
            "mutual choice (a global budget of 64 x tokens per batch), 4,608 latents, same hook and tokens"),
    DemoSAE("demo-matryoshka", "demo_sae_matryoshka", DEMO_HOOK,
            "Matryoshka BatchTopK, nested groups of 288 / 1,152 / 4,608 latents, k=64, same hook and tokens"),
)
"""The demo's SAEs, main one first: it is the run the app opens on, and the one the demo needs."""


def demo_saes(names: Iterable[str] | None = None) -> list[DemoSAE]:
    """The demo SAEs to prepare, in ``DEMO_SAES`` order: those ``names`` (each must be on disk), or by default
    every one on disk, the main one required."""
    valid = [s.run for s in DEMO_SAES]
    wanted = None if names is None else set(names)
    if wanted is not None:
        unknown = sorted(wanted.difference(valid))
        if unknown:
            raise ValueError(f"unknown demo SAE {', '.join(map(repr, unknown))}: the demo's SAEs are {', '.join(valid)}")
        if not wanted:
            raise ValueError(f"no demo SAE named: choose among {', '.join(valid)}")
    chosen = [s for s in DEMO_SAES if wanted is None or s.run in wanted]
    for sae in chosen:
        if not sae.available() and (wanted is not None or sae is DEMO_SAES[0]):
            what = "the demo SAE" if sae is DEMO_SAES[0] else f"the demo SAE {sae.run!r}"
            raise FileNotFoundError(f"{what} is missing: expected an SAELens directory (cfg.json) at {sae.sae_dir}"
                                    + (" (it is committed)" if sae is DEMO_SAES[0] else ""))
    return [s for s in chosen if s.available()]
