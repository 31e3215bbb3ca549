"""Neuronpedia's import format: the records of one source (an SAE on one model), and their schema.

Neuronpedia imports a source from ``<modelId>/<sourceId>/``: ``release.jsonl``, ``model.jsonl``,
``sourceset.jsonl``, ``source.jsonl`` (one JSON object each), then ``features/batch-N.jsonl.gz`` (table ``Neuron``),
``activations/batch-N.jsonl.gz`` (``Activation``) and ``explanations/batch-N.jsonl.gz`` (``Explanation``), each
line inserted as a row whose keys name the table's columns. The field names and types below are those of
Neuronpedia's exporter models (``utils/neuronpedia-utils/neuronpedia_utils/db_models/*.py``), checked against the
webapp's database schema (``apps/webapp/prisma/schema.prisma``) and importer (``apps/webapp/app/api/admin/import/
route.ts``, ``apps/webapp/lib/db/import.ts``) in hijohnnylin/neuronpedia at commit
ebb8426fc550ad5d1f76d52c271a624af3c08a57. See docs/export.md for how each saescope column maps onto them.
"""

from __future__ import annotations

import hashlib
import math
import re
from datetime import datetime
from typing import Any

import numpy as np

from ..run.rows import Example, FeatureRow

DEFAULT_CREATOR_ID = "clkht01d40000jv08hvalcvly"
"""The user a fresh Neuronpedia instance seeds (``prisma/seed.ts``) and its converters default to."""
BATCH_FEATURES = 1024
"""Latents per ``batch-N.jsonl.gz`` file, as Neuronpedia's own exporter writes them."""

# field -> (type, required). Types: str, int, float, bool, datetime (ISO 8601 string), list[str|int|float].
SCHEMAS: dict[str, dict[str, tuple[str, bool]]] = {
    "Neuron": {
        "modelId": ("str", True), "layer": ("str", True), "index": ("str", True), "creatorId": ("str", False),
        "createdAt": ("datetime", False), "maxActApprox": ("float", False), "hasVector": ("bool", False),
        "vector": ("list[float]", False), "vectorLabel": ("str", False), "vectorDefaultSteerStrength": ("float", False),
        "hookName": ("str", False), "topkCosSimIndices": ("list[int]", False), "topkCosSimValues": ("list[float]", False),
        "neuron_alignment_indices": ("list[int]", False), "neuron_alignment_values": ("list[float]", False),
        "neuron_alignment_l1": ("list[float]", False), "correlated_neurons_indices": ("list[int]", False),
        "correlated_neurons_pearson": ("list[float]", False), "correlated_neurons_l1": ("list[float]", False),
        "correlated_features_indices": ("list[int]", False), "correlated_features_pearson": ("list[float]", False),
        "correlated_features_l1": ("list[float]", False), "neg_str": ("list[str]", False),
        "neg_values": ("list[float]", False), "pos_str": ("list[str]", False), "pos_values": ("list[float]", False),
        "frac_nonzero": ("float", False), "freq_hist_data_bar_heights": ("list[float]", False),
        "freq_hist_data_bar_values": ("list[float]", False), "logits_hist_data_bar_heights": ("list[float]", False),
        "logits_hist_data_bar_values": ("list[float]", False), "decoder_weights_dist": ("list[float]", False),
        "sourceSetName": ("str", False),
    },
    "Activation": {
        "id": ("str", True), "tokens": ("list[str]", True), "index": ("str", True), "layer": ("str", True),
        "modelId": ("str", True), "maxValue": ("float", True), "maxValueTokenIndex": ("int", True),
        "minValue": ("float", True), "values": ("list[float]", True), "creatorId": ("str", True),
        "dataSource": ("str", False), "dataIndex": ("str", False), "dfaValues": ("list[float]", False),
        "dfaTargetIndex": ("int", False), "dfaMaxValue": ("float", False), "createdAt": ("datetime", False),
        "lossValues": ("list[float]", False), "logitContributions": ("str", False), "binMin": ("float", False),
        "binMax": ("float", False), "binContains": ("float", False), "qualifyingTokenIndex": ("int", False),
    },
    "Explanation": {
        "id": ("str", True), "modelId": ("str", True), "layer": ("str", True), "index": ("str", True),
        "description": ("str", True), "authorId": ("str", True), "embedding": ("list[float]", False),
        "typeName": ("str", False), "explanationModelName": ("str", False), "notes": ("str", False),
        "createdAt": ("datetime", False),
    },
    "Model": {
        "id": ("str", True), "instruct": ("bool", True), "creatorId": ("str", True), "displayNameShort": ("str", False),
        "displayName": ("str", False), "tlensId": ("str", False), "dimension": ("int", False),
        "visibility": ("str", False), "defaultSourceSetName": ("str", False), "defaultSourceId": ("str", False),
        "inferenceEnabled": ("bool", False), "layers": ("int", True), "neuronsPerLayer": ("int", True),
        "createdAt": ("datetime", False), "owner": ("str", True), "updatedAt": ("datetime", False),
        "website": ("str", False),
    },
    "SourceSet": {
        "modelId": ("str", True), "name": ("str", True), "creatorId": ("str", True), "hasDashboards": ("bool", False),
        "visibility": ("str", False), "description": ("str", True), "type": ("str", False),
        "creatorName": ("str", True), "urls": ("list[str]", True), "creatorEmail": ("str", False),
        "releaseName": ("str", False), "defaultOfModelId": ("str", False), "defaultRange": ("int", False),
        "defaultShowBreaks": ("bool", False), "showDfa": ("bool", False), "showCorrelated": ("bool", False),
        "showHeadAttribution": ("bool", False), "showUmap": ("bool", False), "createdAt": ("datetime", False),
    },
    "Source": {
        "id": ("str", True), "modelId": ("str", True), "setName": ("str", True), "creatorId": ("str", True),
        "hasDashboards": ("bool", False), "inferenceEnabled": ("bool", False), "inferenceHosts": ("list[str]", False),
        "saelensConfig": ("str", False), "saelensRelease": ("str", False), "saelensSaeId": ("str", False),
        "hfRepoId": ("str", False), "hfFolderId": ("str", False), "visibility": ("str", False),
        "defaultOfModelId": ("str", False), "hasUmap": ("bool", False), "hasUmapLogSparsity": ("bool", False),
        "hasUmapClusters": ("bool", False), "num_prompts": ("int", False), "num_tokens_in_prompt": ("int", False),
        "dataset": ("str", False), "notes": ("str", False), "createdAt": ("datetime", False),
    },
    "SourceRelease": {
        "name": ("str", True), "description": ("str", True), "creatorName": ("str", True), "creatorId": ("str", True),
        "visibility": ("str", False), "isNewUi": ("bool", False), "featured": ("bool", False),
        "descriptionShort": ("str", False), "urls": ("list[str]", True), "creatorEmail": ("str", False),
        "creatorNameShort": ("str", False), "defaultSourceSetName": ("str", False), "defaultSourceId": ("str", False),
        "defaultUmapSourceIds": ("list[str]", False), "createdAt": ("datetime", False),
    },
}
FILES = {"release.jsonl": "SourceRelease", "model.jsonl": "Model", "sourceset.jsonl": "SourceSet", "source.jsonl": "Source",
         "features": "Neuron", "activations": "Activation", "explanations": "Explanation"}
"""File (or folder of batch-N.jsonl.gz files) -> the table its lines fill."""
VISIBILITIES = ("PUBLIC", "PRIVATE", "UNLISTED")
_ID = re.compile(r"^[a-z0-9_-]+$")
_HOOK_KINDS = {"hook_resid_post": "res", "hook_resid_pre": "res-pre", "hook_resid_mid": "res-mid", "hook_mlp_out": "mlp",
               "hook_attn_out": "att-out", "hook_z": "att"}


def _ok(value: Any, kind: str) -> bool:
    if kind == "str":
        return isinstance(value, str)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "datetime":
        try:
            datetime.fromisoformat(value)
        except (TypeError, ValueError):
            return False
        return True
    return isinstance(value, list) and all(_ok(v, kind[5:-1]) for v in value)


def validate(table: str, record: dict[str, Any]) -> None:
    """Raise ValueError unless ``record`` has only ``table``'s columns, its required ones, each of its type."""
    schema = SCHEMAS[table]
    unknown = sorted(set(record) - set(schema))
    if unknown:
        raise ValueError(f"Neuronpedia {table} has no field(s) {unknown}")
    for name, (kind, required) in schema.items():
        if name not in record or record[name] is None:
            if required:
                raise ValueError(f"Neuronpedia {table} record lacks required field {name!r}")
            continue
        if not _ok(record[name], kind):
            raise ValueError(f"Neuronpedia {table}.{name} must be {kind}, got {record[name]!r:.80}")


def slug(text: str) -> str:
    """``text`` as a Neuronpedia id: lower case letters, digits, ``-`` and ``_``."""
    out = re.sub(r"[^a-z0-9_-]+", "-", text.lower()).strip("-")
    return out or "model"


def check_id(value: str, what: str) -> str:
    if not _ID.match(value):
        raise ValueError(f"{what} {value!r} must be lower-case letters, digits, '-' or '_' (Neuronpedia ids)")
    return value


def default_names(manifest: dict) -> tuple[str, str, int | None]:
    """(model id, source set name, layer) Neuronpedia would use for a run, from its manifest."""
    model = slug(str(manifest.get("model", {}).get("name", "model")).rstrip("/").split("/")[-1])
    hook = str(manifest.get("sae", {}).get("hook", ""))
    match = re.match(r"^blocks\.(\d+)\.(?:attn\.)?(\w+)$", hook)
    layer = int(match.group(1)) if match else None
    kind = _HOOK_KINDS.get(match.group(2), slug(match.group(2))) if match else slug(hook or "sae")
    width = int(manifest.get("sae", {}).get("d_sae", 0))
    size = f"{width // 1024}k" if width % 1024 == 0 and width >= 1024 else str(width)
    return model, f"saescope-{kind}-{size}", layer


def record_id(*parts: object) -> str:
    """A stable cuid-shaped id (25 characters starting with ``c``): re-exporting a run gives the same ids."""
    return "c" + hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()[:24]


DECIMALS = 5
"""Activation values are written rounded to this many decimals (Neuronpedia shows two or three): short JSON."""


def _floats(values, decimals: int | None = None) -> list[float]:
    """Finite floats (NaN and infinities become 0) for JSON, optionally rounded."""
    array = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    return (array if decimals is None else np.round(array, decimals)).tolist()


def neuron(feature: FeatureRow, decode, *, model_id: str, source_id: str, set_name: str, creator_id: str,
           created: str) -> dict[str, Any]:
    """One latent as a ``Neuron`` row: density, maximum, logit effects, histogram, decoder-cosine neighbours."""
    edges = feature.hist_edges or []
    centers = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:], strict=False)]
    return {
        "modelId": model_id, "layer": source_id, "index": str(feature.feature_id), "creatorId": creator_id,
        "createdAt": created, "maxActApprox": _floats([feature.max_act])[0], "hasVector": False,
        "topkCosSimIndices": [int(i) for i in feature.neighbor_ids or []],
        "topkCosSimValues": _floats(feature.neighbor_cos or []),
        "neg_str": decode(feature.bottom_logit_ids or []), "neg_values": _floats(feature.bottom_logit_values or []),
        "pos_str": decode(feature.top_logit_ids or []), "pos_values": _floats(feature.top_logit_values or []),
        "frac_nonzero": _floats([feature.density])[0],
        "freq_hist_data_bar_heights": _floats(feature.hist_counts or []), "freq_hist_data_bar_values": _floats(centers),
        "sourceSetName": set_name,
    }


def activation(example: Example, feature: FeatureRow, *, model_id: str, source_id: str, creator_id: str, created: str,
               data_source: str, run_hash: str) -> dict[str, Any]:
    """One top or quantile example as an ``Activation`` row (quantile examples carry their bin's bounds)."""
    values = _floats(example.acts, DECIMALS)
    peak = int(np.argmax(values)) if values else 0
    record: dict[str, Any] = {
        "id": record_id(run_hash, source_id, feature.feature_id, example.kind, example.rank),
        "tokens": list(example.tokens), "index": str(feature.feature_id), "layer": source_id, "modelId": model_id,
        "maxValue": values[peak] if values else 0.0, "maxValueTokenIndex": peak, "minValue": min(values, default=0.0),
        "values": values, "creatorId": creator_id, "createdAt": created, "dataSource": data_source,
        "dataIndex": str(example.context_id), "qualifyingTokenIndex": peak,
    }
    if example.kind == "quantile" and example.quantile_bin is not None and feature.max_act > 0:
        low, high = example.quantile_bin * feature.max_act / 10, (example.quantile_bin + 1) * feature.max_act / 10
        edges, counts = feature.hist_edges or [], feature.hist_counts or []
        inside = sum(c for c, a, b in zip(counts, edges[:-1], edges[1:], strict=False) if low <= (a + b) / 2 < high)
        total = sum(counts)
        record.update(binMin=float(low), binMax=float(high), binContains=inside / total if total else 0.0)
    return record


def explanation(feature_id: int, text: str, *, model_id: str, source_id: str, creator_id: str, created: str,
                notes: str, key: str) -> dict[str, Any]:
    """An explanation as an ``Explanation`` row (type and model left unset: they must name rows Neuronpedia has)."""
    return {
        "id": record_id(key, source_id, feature_id), "modelId": model_id, "layer": source_id, "index": str(feature_id),
        "description": text, "authorId": creator_id, "notes": notes, "createdAt": created,
    }
