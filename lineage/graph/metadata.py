"""Lineage in safetensors metadata (docs/metadata.md): read from what other tools leave, and written so they see ours.

Read into plain dicts (`lineage_from_metadata`):
- ModelSpec (`modelspec.*`), including `merged_from` and `prediction_type`;
- A1111 / supermerger: `sd_merge_recipe` and `sd_merge_models` (the parents' flattened ancestry);
- sd-mecha: `mecha_recipe` (text);
- kohya LoRA training: `ss_*` and `sshs_*` keys (which base the adapter was trained on);
- our own full record under `lineage.record`.
Metadata written by hand is often broken: a value that should be JSON and is not is reported as
such, never raised.

Written by the same conventions (`modelspec_metadata`, `a1111_merge_metadata`), so what we write
reads back through the functions above. Names only, never local paths: a file's metadata is published
with it.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from lineage.io import strict_json

LINEAGE_RECORD_KEY = "lineage.record"
KOHYA_KEYS = (
    "ss_base_model_version", "ss_sd_model_name", "ss_sd_model_hash", "ss_new_sd_model_hash",
    "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args", "ss_output_name",
    "ss_training_comment", "ss_v2", "ss_v_parameterization", "ss_zero_terminal_snr",
    "ss_num_train_images", "ss_dataset_dirs", "ss_training_started_at", "sshs_model_hash", "sshs_legacy_hash",
)
MODELSPEC_VERSION = "1.0.0"
# Our prediction types -> ModelSpec's `prediction_type` values (ModelSpec knows only these two).
MODELSPEC_PREDICTION: dict[str, str] = {"epsilon": "epsilon", "epsilon+ztsnr": "epsilon", "v": "v",
                                        "v+ztsnr": "v", "edm-v": "v"}
A1111_HASH_ROLES = ("primary_model_hash", "secondary_model_hash", "tertiary_model_hash")


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


# ---------------------------------------------------------------------------------------------
# Writing


def modelspec_metadata(*, architecture: str, implementation: str, title: str, resolution: str, date: str,
                       prediction_type: str | None = None, merged_from: Sequence[str] = (),
                       autov3: str | None = None, description: str | None = None) -> dict[str, str]:
    """ModelSpec 1.0.0 keys: the required ones, and those of the optional ones given. `merged_from`
    names the sources (comma-separated, as read back above); `autov3` is written as `hash_sha256`
    ("0x" + hex: ModelSpec and kohya define it as the sha256 of the data section, our AutoV3)."""
    metadata = {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": architecture,
        "modelspec.implementation": implementation,
        "modelspec.title": title,
        "modelspec.resolution": resolution,
        "modelspec.date": date,
    }
    if merged_from:
        metadata["modelspec.merged_from"] = ", ".join(merged_from)
    if autov3:
        metadata["modelspec.hash_sha256"] = "0x" + autov3
    if description:
        metadata["modelspec.description"] = description
    if prediction_type in MODELSPEC_PREDICTION:
        metadata["modelspec.prediction_type"] = MODELSPEC_PREDICTION[prediction_type]
    return metadata


def a1111_merge_metadata(*, interp_method: str, inputs: Sequence[tuple[str, str | None]], multiplier: float | None,
                         save_as_half: bool, name: str, input_metadata: Sequence[Mapping[str, str]]) -> dict[str, str]:
    """A1111 / supermerger's keys for a merge of `inputs` ((name, AutoV3 or None), in order):
    `sd_merge_recipe` (what the merge did; the first three inputs' hashes in A1111's roles) and
    `sd_merge_models` ({hash: {name, sd_merge_recipe}} for every input, with each input's own
    `sd_merge_models` folded in: the flattened ancestry; an input without a hash is keyed by name).
    A1111 keys these by the whole-file sha256; ours are AutoV3, the content identity computed while
    merging (the whole-file hash would need a second read of every input), and `hash_kind` says so."""
    recipe: dict[str, Any] = {"type": "lineage", "hash_kind": "autov3", "interp_method": interp_method}
    for role, (_, autov3) in zip(A1111_HASH_ROLES, inputs):
        recipe[role] = autov3
    if multiplier is not None:
        recipe["multiplier"] = multiplier
    recipe.update(save_as_half=save_as_half, custom_name=name)
    models: dict[str, Any] = {}
    for (input_name, autov3), metadata in zip(inputs, input_metadata):
        found = lineage_from_metadata(metadata).get("a1111", {})
        ancestry = found.get("sd_merge_models")
        if isinstance(ancestry, dict) and "unparsed" not in ancestry:
            models.update(ancestry)
        models[autov3 or input_name] = {"name": input_name, "sd_merge_recipe": found.get("sd_merge_recipe")}
    return {"sd_merge_recipe": json.dumps(recipe, ensure_ascii=False),
            "sd_merge_models": json.dumps(models, ensure_ascii=False)}
