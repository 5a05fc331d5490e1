"""The metadata a merged checkpoint carries, so other tools and `lmerge reproduce` see its lineage
(the ModelSpec and A1111 conventions are written by lineage/graph/metadata.py, beside their readers):

- `lineage.record`: our full record, JSON — the recipe (method, params, per-key weights, seed, dtype,
  mismatch policy, prediction type), every input and adapter by file name, name and AutoV3, each
  one's nominal weight (an adapter's: its strength) and the library version. `Recipe.from_dict` reads
  it back; `lmerge reproduce` finds the files by AutoV3 (the registry) or next to the merged file.
- ModelSpec 1.0.0 (`modelspec.*`): SDXL architecture, title, resolution, date, `merged_from` (the
  inputs' and adapters' names), `prediction_type` and `hash_sha256` (the output's AutoV3).
- A1111 / supermerger: `sd_merge_recipe` and `sd_merge_models` (the flattened ancestry), the inputs
  keyed by their whole-file sha256 as A1111 keys them.
A published file carries no local paths: inputs appear by file name and hash only.
"""
from __future__ import annotations

import datetime
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from lineage import __version__
from lineage.graph.metadata import LINEAGE_RECORD_KEY, a1111_merge_metadata, modelspec_metadata

from .recipe import Recipe

SDXL_ARCHITECTURE = "stable-diffusion-xl-v1-base"
SDXL_IMPLEMENTATION = "sgm"
SDXL_RESOLUTION = "1024x1024"

# Our method names -> A1111's `interp_method` labels, where A1111 has the same method.
A1111_METHODS: dict[str, str] = {"weighted_sum": "Weighted sum", "add_difference": "Add difference"}

# Each input's nominal weight in the result (the scalar parameters; block weights vary it per key),
# for the weighted edges of the lineage graph. Methods not listed give each input its `weights`
# entry when the method takes such a list, else no weight.
EDGE_WEIGHTS: dict[str, Callable[[Mapping[str, Any]], list[float]]] = {
    "weighted_sum": lambda p: [1 - p["alpha"], p["alpha"]],  # (1-α)A + αB
    "add_difference": lambda p: [1.0, p["alpha"], -p["alpha"]],  # A + α(B - C)
}


def edge_weights(recipe: Recipe) -> list[float | None]:
    """The nominal weight of each file in the merge, in the order of `recipe.files`: each input's (None
    where the method has no such notion), then each adapter's strength."""
    strengths: list[float | None] = [float(a.strength) for a in recipe.adapters]
    params = {**recipe.merge_method.defaults, **recipe.params}
    if recipe.method in EDGE_WEIGHTS:
        return [float(w) for w in EDGE_WEIGHTS[recipe.method](params)] + strengths
    weights = params.get("weights")
    if isinstance(weights, (list, tuple)) and len(weights) == len(recipe.inputs):
        return [float(w) for w in weights] + strengths
    return [None] * len(recipe.inputs) + strengths


def record_of(recipe: Recipe) -> dict[str, Any]:
    """Our full record: the recipe with its inputs and adapters by file name and hash, the nominal
    weight of each (`edge_weights`) and the library."""
    published = recipe.with_paths([os.path.basename(f.path) for f in recipe.files])
    return {**published.to_dict(), "weights": edge_weights(recipe), "library": f"lineage {__version__}"}


def merge_metadata(recipe: Recipe, prediction_type: str, title: str, output_autov3: str | None,
                   input_metadata: Sequence[Mapping[str, str]],
                   input_files: Sequence[tuple[str | None, str | None]] = ()) -> dict[str, str]:
    """Every metadata key a merged checkpoint gets. `recipe` carries the inputs' AutoV3 hashes as far
    as they are known; `output_autov3` is None until the output is written; `input_files` gives each
    input's whole-file (sha256, AutoV1) as far as known, by which A1111 names the inputs."""
    names = [i.name for i in recipe.inputs]
    applied = "".join(f", {a.name} applied at {a.strength:g}" for a in recipe.adapters)
    description = f"{recipe.method} merge of {', '.join(names)}{applied} made with lineage {__version__}"
    # A1111's multiplier is one alpha for every key: written only when that is what the merge did.
    # A block merge leaves it out and says per block (the recipe's per-key table) instead, so a reader
    # never takes a block merge for a plain weighted sum at the scalar alpha.
    uniform = "alpha" in recipe.merge_method.defaults and "alpha" not in recipe.per_key
    multiplier = recipe.scalar("alpha") if uniform else None
    per_key = {name: variation.to_dict() for name, variation in recipe.per_key.items()}
    return {
        LINEAGE_RECORD_KEY: json.dumps(record_of(recipe), ensure_ascii=False),
        **modelspec_metadata(architecture=SDXL_ARCHITECTURE, implementation=SDXL_IMPLEMENTATION, title=title,
                             resolution=SDXL_RESOLUTION, date=datetime.date.today().isoformat(),
                             prediction_type=prediction_type, merged_from=[f.name for f in recipe.files],
                             autov3=output_autov3,
                             description=description),
        **a1111_merge_metadata(interp_method=A1111_METHODS.get(recipe.method, recipe.method),
                               inputs=[(os.path.basename(i.path), *file_ids) for i, file_ids in
                                       zip(recipe.inputs, [*input_files, *[(None, None)] * len(recipe.inputs)])],
                               multiplier=multiplier,
                               save_as_half=recipe.dtype == "fp16", name=title, input_metadata=input_metadata,
                               per_key=per_key),
    }
