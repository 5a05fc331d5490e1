"""Lineage that other tools leave in safetensors metadata (HANDBOOK §5), read into plain dicts.

- ModelSpec (`modelspec.*`), including `merged_from` and `prediction_type`;
- A1111 / supermerger: `sd_merge_recipe` and `sd_merge_models` (the parents' flattened ancestry);
- sd-mecha: `mecha_recipe` (text);
- kohya LoRA training: `ss_*` and `sshs_*` keys (which base the adapter was trained on);
- our own full record under `lineage.record`.
Metadata written by hand is often broken: a value that should be JSON and is not is reported as
such, never raised.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lineage.io import strict_json

LINEAGE_RECORD_KEY = "lineage.record"
KOHYA_KEYS = (
    "ss_base_model_version", "ss_sd_model_name", "ss_sd_model_hash", "ss_new_sd_model_hash",
    "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args", "ss_output_name",
    "ss_training_comment", "ss_v2", "ss_v_parameterization", "ss_zero_terminal_snr",
    "ss_num_train_images", "ss_dataset_dirs", "ss_training_started_at", "sshs_model_hash", "sshs_legacy_hash",
)


def _json(value: str) -> Any:
    """A JSON value from metadata, parsed strictly: NaN, infinities, overflowing numbers, duplicate keys
    and lone surrogates make it unparsed, so they never reach the registry or our JSON output."""
    try:
        return strict_json.loads(value)
    except strict_json.JSONError as e:
        return {"unparsed": value, "error": f"not valid JSON ({e})"}


def lineage_from_metadata(metadata: Mapping[str, str]) -> dict[str, Any]:
    """Everything in `metadata` that says where a model came from, keyed by the tool that wrote it."""
    found: dict[str, Any] = {}
    modelspec = {k.removeprefix("modelspec."): v for k, v in metadata.items() if k.startswith("modelspec.")}
    if modelspec:
        if "merged_from" in modelspec:
            modelspec["merged_from"] = [s.strip() for s in modelspec["merged_from"].split(",") if s.strip()]
        found["modelspec"] = modelspec
    a1111 = {}
    if "sd_merge_recipe" in metadata:
        a1111["sd_merge_recipe"] = _json(metadata["sd_merge_recipe"])
    if "sd_merge_models" in metadata:
        a1111["sd_merge_models"] = _json(metadata["sd_merge_models"])
    if a1111:
        found["a1111"] = a1111
    if "mecha_recipe" in metadata:
        found["sd_mecha"] = {"recipe": metadata["mecha_recipe"]}
    kohya = {k: metadata[k] for k in KOHYA_KEYS if k in metadata}
    if "ss_network_args" in kohya:
        kohya["ss_network_args"] = _json(kohya["ss_network_args"])
    if kohya:
        found["kohya"] = kohya
    if LINEAGE_RECORD_KEY in metadata:
        found["lineage"] = _json(metadata[LINEAGE_RECORD_KEY])
    return found
