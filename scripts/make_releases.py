"""Regenerate engine/saes/releases.json from SAELens's pretrained_saes.yaml (the releases saescope can load).

    python scripts/make_releases.py path/to/sae_lens/pretrained_saes.yaml [SAELENS_COMMIT]

Kept: releases stored in SAELens's own format (``conversion_func: null``: cfg.json + sae_weights.safetensors per
folder) and Gemma Scope (``conversion_func: gemma_2``: params.npz per folder; its embedding SAEs are left out, as
saescope has no hook_embed). Each release keeps its repo id, model, format, the conventions saescope applies
(``center_writing_weights``, config overrides) and its SAE ids -> folders. Needs PyYAML (a dev-time tool only).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

FORMATS = {None: "saelens", "gemma_2": "gemma_scope"}
OVERRIDES = ("normalize_activations",)


def convert(data: dict, source: str) -> dict:
    out: dict = {"_source": source}
    for name, release in sorted(data.items()):
        fmt = FORMATS.get(release.get("conversion_func"), "")
        if not fmt:
            continue
        overrides = release.get("config_overrides") or {}
        saes = {s["id"]: s["path"] for s in release["saes"] if not (fmt == "gemma_scope" and "embedding" in s["path"])}
        if not saes:
            continue
        entry: dict = {"repo_id": release["repo_id"], "model": release.get("model", ""), "format": fmt}
        if (overrides.get("model_from_pretrained_kwargs") or {}).get("center_writing_weights"):
            entry["center_writing_weights"] = True
        cfg = {k: overrides[k] for k in OVERRIDES if k in overrides}
        if cfg:
            entry["cfg_overrides"] = cfg
        entry["saes"] = saes
        out[name] = entry
    return out


def main() -> None:
    yaml_path = Path(sys.argv[1])
    commit = sys.argv[2] if len(sys.argv) > 2 else "unknown commit"
    data = yaml.safe_load(yaml_path.read_text())
    out = convert(data, f"SAELens sae_lens/pretrained_saes.yaml at {commit}")
    target = Path(__file__).resolve().parent.parent / "engine" / "saes" / "releases.json"
    target.write_text(json.dumps(out, indent=1, sort_keys=False) + "\n")
    print(f"{len(out) - 1} releases, {sum(len(r['saes']) for k, r in out.items() if k != '_source')} SAEs -> {target}")


if __name__ == "__main__":
    main()
