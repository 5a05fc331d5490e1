"""The metadata a merged checkpoint carries, so other tools and `lmerge reproduce` see its lineage
(HANDBOOK §5):

- `lineage.record`: our full record, JSON — the recipe (method, params, per-key weights, seed, dtype,
  mismatch policy, prediction type), every input with its path, name and AutoV3, and the library
  version. `Recipe.from_dict` reads it back.
- ModelSpec 1.0.0 (`modelspec.*`): architecture, implementation, title, resolution, date,
  `merged_from` (the inputs' names), `prediction_type` and `hash_sha256` (the output's AutoV3, which
  ModelSpec and kohya define as the sha256 of the data section).
- A1111 / supermerger: `sd_merge_recipe` (what this merge did) and `sd_merge_models` (each input and,
  folded in, the inputs' own `sd_merge_models`: the flattened ancestry). A1111 keys these by the
  whole-file sha256; we key them by AutoV3, the content identity we compute while merging (the
  whole-file hash would need a second read of every input), and say so in `sd_merge_recipe.hash_kind`.
"""
from __future__ import annotations

import datetime
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lineage import __version__
from lineage.graph.metadata import LINEAGE_RECORD_KEY, lineage_from_metadata

from .recipe import Recipe

MODELSPEC_VERSION = "1.0.0"
SDXL_ARCHITECTURE = "stable-diffusion-xl-v1-base"
SDXL_RESOLUTION = "1024x1024"

# Our prediction types -> ModelSpec's `prediction_type` values (ModelSpec knows only these two).
MODELSPEC_PREDICTION: dict[str, str] = {"epsilon": "epsilon", "epsilon+ztsnr": "epsilon", "v": "v",
                                        "v+ztsnr": "v", "edm-v": "v"}
# Our method names -> A1111's `interp_method` labels, where A1111 has the same method.
A1111_METHODS: dict[str, str] = {"weighted_sum": "Weighted sum", "add_difference": "Add difference"}
A1111_HASH_ROLES = ("primary_model_hash", "secondary_model_hash", "tertiary_model_hash")

# Each input's nominal weight in the result (the scalar parameters; block weights vary it per key),
# for the weighted edges of the lineage graph. Methods not listed give each input its `weights`
# entry when the method takes such a list, else no weight.
EDGE_WEIGHTS: dict[str, Callable[[Mapping[str, Any]], list[float]]] = {
    "weighted_sum": lambda p: [1 - p["alpha"], p["alpha"]],  # (1-α)A + αB
    "add_difference": lambda p: [1.0, p["alpha"], -p["alpha"]],  # A + α(B - C)
}


def edge_weights(recipe: Recipe) -> list[float | None]:
    """The nominal weight of each input in the merge (None where the method has no such notion)."""
    params = {**recipe.merge_method.defaults, **recipe.params}
    if recipe.method in EDGE_WEIGHTS:
        return [float(w) for w in EDGE_WEIGHTS[recipe.method](params)]
    weights = params.get("weights")
    if isinstance(weights, (list, tuple)) and len(weights) == len(recipe.inputs):
        return [float(w) for w in weights]
    return [None] * len(recipe.inputs)


def record_of(recipe: Recipe) -> dict[str, Any]:
    """Our full record: the recipe with its inputs' hashes, each input's nominal weight and the library."""
    return {**recipe.to_dict(), "weights": edge_weights(recipe), "library": f"lineage {__version__}"}


def _a1111_recipe(recipe: Recipe, output_name: str) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "lineage", "hash_kind": "autov3",
                           "interp_method": A1111_METHODS.get(recipe.method, recipe.method)}
    for role, inp in zip(A1111_HASH_ROLES, recipe.inputs):
        out[role] = inp.autov3
    if "alpha" in recipe.params or "alpha" in recipe.merge_method.defaults:
        out["multiplier"] = recipe.scalar("alpha")
    out.update(save_as_half=recipe.dtype == "fp16", custom_name=output_name)
    return out


def _a1111_models(recipe: Recipe, input_metadata: Sequence[Mapping[str, str]]) -> dict[str, Any]:
    """{hash: {name, sd_merge_recipe}} for every input, with each input's own ancestry folded in."""
    models: dict[str, Any] = {}
    for inp, metadata in zip(recipe.inputs, input_metadata):
        found = lineage_from_metadata(metadata).get("a1111", {})
        ancestry = found.get("sd_merge_models")
        if isinstance(ancestry, dict) and "unparsed" not in ancestry:
            models.update(ancestry)
        models[inp.autov3 or inp.name] = {"name": inp.name,
                                                   "sd_merge_recipe": found.get("sd_merge_recipe")}
    return models


def merge_metadata(recipe: Recipe, prediction_type: str, output: str | os.PathLike, output_autov3: str,
                   input_metadata: Sequence[Mapping[str, str]], title: str | None = None) -> dict[str, str]:
    """Every metadata key a merged checkpoint gets. `recipe` carries the inputs' AutoV3 hashes."""
    name = title or Path(output).stem
    metadata = {
        LINEAGE_RECORD_KEY: json.dumps(record_of(recipe), ensure_ascii=False),
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": SDXL_ARCHITECTURE,
        "modelspec.implementation": "sgm",
        "modelspec.title": name,
        "modelspec.resolution": SDXL_RESOLUTION,
        "modelspec.date": datetime.date.today().isoformat(),
        "modelspec.merged_from": ", ".join(i.name for i in recipe.inputs),
        "modelspec.hash_sha256": "0x" + output_autov3,
        "modelspec.description": f"{recipe.method} merge of {', '.join(i.name for i in recipe.inputs)} "
                                 f"made with lineage {__version__}",
        "sd_merge_recipe": json.dumps(_a1111_recipe(recipe, name), ensure_ascii=False),
        "sd_merge_models": json.dumps(_a1111_models(recipe, input_metadata), ensure_ascii=False),
    }
    if prediction_type in MODELSPEC_PREDICTION:
        metadata["modelspec.prediction_type"] = MODELSPEC_PREDICTION[prediction_type]
    return metadata
