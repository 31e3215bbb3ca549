"""Write cross-layer transcoders with circuit-tracer's own ``CrossLayerTranscoder.to_safetensors``, plus the library's
own encodings and reconstructions, for saescope's CLT reader tests.

circuit-tracer is not a saescope dependency (it pulls TransformerLens); its CLT module needs only torch, numpy and
safetensors, so the wheel unpacked on the path is enough:
    pip download circuit-tracer==0.5.0 --no-deps -d /tmp/ct && unzip -q /tmp/ct/*.whl -d /tmp/ct/x
    PYTHONPATH=/tmp/ct/x python scripts/make_reference_clt.py tests/fixtures/reference_clt
Each case directory holds ``W_enc_{i}.safetensors`` / ``W_dec_{i}.safetensors`` as the library wrote them and
``expected.safetensors``: ``x [n_layers, n_pos, d_model]`` (each layer's input), ``features`` (the library's
``encode``) and ``recon`` (its ``forward``: every layer's output, the sum of the decoder contributions of the
features of that layer and all earlier ones, plus ``b_dec``).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

N_LAYERS, D_MODEL, D_TC, N_POS = 3, 8, 12, 5


def case(out: Path, activation: str, seed: int) -> None:
    from circuit_tracer.transcoder.cross_layer_transcoder import CrossLayerTranscoder

    clt = CrossLayerTranscoder(N_LAYERS, D_TC, D_MODEL, activation_function=activation, lazy_decoder=False,
                               device=torch.device("cpu"), dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in clt.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if "W" in name else 0.2))
            if "threshold" in name:
                p.abs_()
        clt.b_enc.add_(0.3)  # most features fire, so every position has some (the library sizes outputs by them)
    x = torch.randn(N_LAYERS, N_POS, D_MODEL, generator=gen)
    with torch.no_grad():
        features = clt.encode(x)
        recon = clt.forward(x)
    if out.exists():
        shutil.rmtree(out)
    clt.to_safetensors(str(out))
    save_file({"x": x, "features": features.contiguous(), "recon": recon.contiguous()}, str(out / "expected.safetensors"))
    print(out, "features active:", int((features > 0).sum()), "of", features.numel())


def main(root: str) -> None:
    import circuit_tracer

    print("circuit-tracer", circuit_tracer.__version__)
    case(Path(root) / "relu", "relu", 0)
    case(Path(root) / "jumprelu", "jump_relu", 1)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/reference_clt")
