"""`lineage.merge(...)`: build a recipe, plan it, run it, stamp the output's metadata, record it.

    import lineage
    lineage.merge(["a.safetensors", "b.safetensors"], "out.safetensors", alpha=0.3)      # (1-α)A + αB
    lineage.merge(["a.safetensors", "b.safetensors"], "out.safetensors",
                  blocks="0,1,1,1,1,1,1,1,1,1,0.5,0,0,0,0,0,0,0,0,0", preset="supermerger")
    lineage.merge(["base.safetensors", "x.safetensors", "y.safetensors"], "ties.safetensors",
                  method="ties", params={"density": 0.2})
    lineage.merge(lineage_recipe, "out.safetensors")                                     # a Recipe
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lineage.errors import LineageError
from lineage.io.hashing import FileHashes
from lineage.io.atomic import file_destination
from lineage.io.safetensors import SafetensorsFile

from .engine import MergePlan, plan_merge, run_plan
from .recipe import Input, ParamValue, Recipe
from .records import edge_weights, merge_metadata
from .weights import DEFAULT_PRESET, KeyWeights, parse_blocks

DEFAULT_WORKERS = min(4, os.cpu_count() or 2)


@dataclass(frozen=True)
class MergeResult:
    path: str
    autov3: str  # of the output's tensor data: the same recipe on the same inputs gives the same value
    recipe: Recipe  # with the inputs' AutoV3 filled in
    plan: MergePlan
    nonfinite: list[tuple[str, str]]  # (input path, key) of input tensors holding NaN / Inf
    node: str | None  # the registry node id, None with record=False


def build_recipe(inputs: Sequence[str | os.PathLike], *, method: str = "weighted_sum", alpha: float | None = None,
                 params: Mapping[str, ParamValue] | None = None, blocks: str | Mapping[str, float] | None = None,
                 preset: str | None = None, per_key: Mapping[str, KeyWeights] | None = None, seed: int = 0,
                 dtype: str = "fp16", mismatch: str = "error", prediction_type: str | None = None) -> Recipe:
    """A recipe from the options the CLI and `merge` take. `alpha` is a shorthand for params["alpha"];
    `blocks` varies alpha per block of `preset` (a string in the preset's convention, or a mapping
    block -> value in the method's convention)."""
    all_params = dict(params or {})
    if alpha is not None:
        all_params["alpha"] = alpha
    variations = dict(per_key or {})
    if blocks is not None:
        chosen = preset or DEFAULT_PRESET
        values = parse_blocks(blocks, chosen) if isinstance(blocks, str) else dict(blocks)
        variations["alpha"] = KeyWeights(preset=chosen, blocks=values)
    elif preset is not None:
        raise LineageError("--preset names the blocks of --blocks; give the block weights too")
    return Recipe(method=method, inputs=tuple(Input(os.fspath(p)) for p in inputs), params=all_params,
                  per_key=variations, seed=seed, dtype=dtype, mismatch=mismatch, prediction_type=prediction_type)


def _known_hashes(recipe: Recipe, registry: Any) -> list[str | None]:
    """Inputs' AutoV3 from an existing registry that has seen the unchanged files (saves hashing
    them); a registry that does not exist yet is not created for this."""
    from lineage.graph.registry import Registry, default_registry_path, open_registry

    if not isinstance(registry, Registry) and not Path(registry or default_registry_path()).exists():
        return [None] * len(recipe.inputs)
    reg = open_registry(registry)
    try:
        known = [reg.known_file(i.path) for i in recipe.inputs]
    finally:
        if reg is not registry:
            reg.close()
    return [k[1]["autov3"] if k else None for k in known]


def plan(recipe: Recipe, workers: int = DEFAULT_WORKERS) -> MergePlan:
    """The plan of a recipe (what `--dry-run` shows), from the inputs' headers only."""
    with ExitStack() as stack:
        files = [stack.enter_context(SafetensorsFile(i.path)) for i in recipe.inputs]
        return plan_merge(recipe, files, workers)


def merge(inputs: Recipe | Sequence[str | os.PathLike], output: str | os.PathLike, *, record: bool = True,
          registry: Any = None, title: str | None = None, workers: int = DEFAULT_WORKERS, progress: bool = True,
          fail_on_nonfinite: bool = False, **options: Any) -> MergeResult:
    """Merge `inputs` (a Recipe, or input paths plus the options of `build_recipe`) into `output`.

    The output is written to a temporary file and renamed into place when complete. The inputs'
    AutoV3 are computed while merging, unless the registry has seen the unchanged files. Unless
    `record=False` it is registered in the lineage registry (`registry`: a Registry, a path or None
    for the default) as a `merge` node with an edge from each input weighted by its nominal weight.
    Input tensors with NaN/Inf are listed in the result, or raise with `fail_on_nonfinite`.
    """
    recipe = inputs if isinstance(inputs, Recipe) else build_recipe(inputs, **options)
    if isinstance(inputs, Recipe) and options:
        raise LineageError(f"options {', '.join(options)} are part of the recipe; set them on the Recipe")
    recipe = recipe.with_paths([os.path.abspath(i.path) for i in recipe.inputs])  # the record names files exactly
    output = os.fspath(output)
    file_destination(output, [i.path for i in recipe.inputs])  # never onto an input, a device or a pipe
    known = _known_hashes(recipe, registry)
    with ExitStack() as stack:
        files = [stack.enter_context(SafetensorsFile(i.path)) for i in recipe.inputs]
        merge_plan = plan_merge(recipe, files, workers)

        def metadata(input_hashes: list[str], output_autov3: str) -> dict[str, str]:
            return merge_metadata(recipe.with_hashes(input_hashes), merge_plan.prediction_type, output, output_autov3,
                                  [f.metadata for f in files], title)

        result = run_plan(merge_plan, files, output, metadata, known_autov3=known,
                          fail_on_nonfinite=fail_on_nonfinite, progress=progress)
    hashed = recipe.with_hashes(result.input_autov3)
    node = None
    if record:
        from lineage.graph.recording import record as record_file

        # The AutoV3 came from the write stream: no second read of the output just to register it.
        stream_hashes = FileHashes(output, None, None, None, result.output_autov3, None)
        node = record_file(output, parents=[i.path for i in recipe.inputs], relation="merge",
                           weights=None if None in edge_weights(hashed) else edge_weights(hashed),
                           params={"method": recipe.method, "recipe": hashed.to_dict()}, registry=registry,
                           hashes=stream_hashes)
    return MergeResult(output, result.output_autov3, hashed, merge_plan, result.nonfinite, node)
