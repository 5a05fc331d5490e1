"""`lineage.merge(...)`: build a recipe, plan it, run it, stamp the output's metadata, record it.

    import lineage
    lineage.merge(["a.safetensors", "b.safetensors"], "out.safetensors", alpha=0.3)      # (1-α)A + αB
    lineage.merge(["a.safetensors", "b.safetensors"], "out.safetensors",
                  blocks="0,1,1,1,1,1,1,1,1,1,0.5,0,0,0,0,0,0,0,0,0", preset="supermerger")
    lineage.merge(["base.safetensors", "x.safetensors", "y.safetensors"], "ties.safetensors",
                  method="ties", params={"density": 0.2})
    lineage.merge(["a.safetensors", "b.safetensors"], "out.safetensors", alpha=0.5,
                  adapters=[("style.safetensors", 0.7)])          # then a LoRA added at strength 0.7
    lineage.merge(lineage_recipe, "out.safetensors")                                     # a Recipe
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lineage.errors import LineageError
from lineage.io.atomic import file_destination
from lineage.io.hashing import FileHashes
from lineage.io.safetensors import SafetensorsFile

from .planner import MergePlan, plan_merge
from .recipe import Adapter, Input, ParamValue, Recipe
from .records import edge_weights, merge_metadata, record_of
from .weights import DEFAULT_PRESET, KeyWeights, parse_blocks

if TYPE_CHECKING:
    from lineage.engine.executor import RunResult

DEFAULT_WORKERS = min(4, os.cpu_count() or 2)


@dataclass(frozen=True)
class MergeResult:
    path: str
    autov3: str  # of the output's tensor data: the same recipe on the same inputs gives the same value
    recipe: Recipe  # with the inputs' AutoV3 filled in
    plan: MergePlan
    nonfinite: list[tuple[str, str]]  # (input path, key) of merged input tensors holding NaN / Inf
    node: str | None  # the registry node id; None with record=False or when recording failed
    record_error: str | None = None  # why the written output could not be recorded (`lmerge scan` it later)


AdapterSpec = str | os.PathLike | tuple[str | os.PathLike, float] | Adapter


def adapter_of(spec: AdapterSpec) -> Adapter:
    """An adapter of a recipe from a path (strength 1), a (path, strength) pair or an Adapter; the path and
    pair are read as `lmerge apply` reads them (adapters/apply.py: `adapter_inputs`)."""
    from lineage.adapters.apply import adapter_inputs

    if isinstance(spec, Adapter):
        return spec
    (found,) = adapter_inputs([spec])
    return Adapter(found.path, strength=found.strength)


def build_recipe(inputs: Sequence[str | os.PathLike], *, method: str = "weighted_sum", alpha: float | None = None,
                 params: Mapping[str, ParamValue] | None = None, blocks: str | Mapping[str, float] | None = None,
                 preset: str | None = None, per_key: Mapping[str, KeyWeights] | None = None, seed: int = 0,
                 dtype: str = "fp16", mismatch: str = "error", prediction_type: str | None = None,
                 adapters: Sequence[AdapterSpec] = ()) -> Recipe:
    """A recipe from the options the CLI and `merge` take. `alpha` is a shorthand for params["alpha"];
    `blocks` varies alpha per block of `preset` (a string in the preset's convention, or a mapping
    block -> value in the method's convention); `adapters` (paths or (path, strength) pairs) are added
    to the merged result in order."""
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
                  per_key=variations, seed=seed, dtype=dtype, mismatch=mismatch, prediction_type=prediction_type,
                  adapters=tuple(adapter_of(a) for a in adapters))


def plan(recipe: Recipe, workers: int = DEFAULT_WORKERS) -> MergePlan:
    """The plan of a recipe (what `--dry-run` shows), from the inputs' headers only."""
    with ExitStack() as stack:
        files = [stack.enter_context(SafetensorsFile(i.path)) for i in recipe.inputs]
        return plan_merge(recipe, files, workers)


def run_recipe(recipe: Recipe, output: str | None, *, registry: Any = None, title: str | None = None,
               workers: int = DEFAULT_WORKERS, progress: bool = True, fail_on_nonfinite: bool = False,
               device: str | None = None) -> tuple[MergePlan, RunResult, list[tuple[str, str]]]:
    """Plan and run a recipe into `output` with its metadata (None: only compute the output's AutoV3),
    computing on `device` ("cpu", "cuda", "cuda:N"; None: the CPU). The run's inputs are the recipe's
    files: its models, then its adapters (each hashed and checked against a recorded AutoV3 alike).
    Returns the plan, the executor's result and the (input path, key) of tensors holding NaN / Inf."""
    from lineage.engine.device import compute_device
    from lineage.engine.executor import run_jobs
    from lineage.engine.inputs import InputFile
    from lineage.graph.registry import known_hashes
    from lineage.io.hashing import file_autov1

    from .jobs import MergeJobs

    compute_on = compute_device(device)
    with ExitStack() as stack:
        inputs = [stack.enter_context(InputFile(f.path)) for f in recipe.files]
        models = inputs[:len(recipe.inputs)]
        # after opening: a later change shows in the run's own checks
        known = known_hashes([f.path for f in recipe.files], registry)
        # A1111 names a merge's inputs by their whole-file sha256: taken in the run's hashing pass unless known
        # (not when only the output's AutoV3 is wanted: no metadata is written then)
        input_sha256 = [h.get("sha256") for h in known] if output is not None else None
        input_autov1 = [h.get("autov1") or file_autov1(f.path) for h, f in zip(known, inputs)] if output else []
        merge_plan = plan_merge(recipe, [f.header for f in models], workers)
        jobs = MergeJobs(merge_plan, [f.path for f in inputs], fail_on_nonfinite)
        name = title or Path(output or "").stem

        def metadata(input_autov3: list[str | None], output_autov3: str | None) -> dict[str, str]:
            return merge_metadata(recipe.with_hashes(input_autov3), merge_plan.prediction_type, name, output_autov3,
                                  [f.header.metadata for f in models], list(zip(input_sha256 or [], input_autov1)))

        result = run_jobs(inputs, jobs.jobs(), output, metadata=metadata, known_autov3=[h.get("autov3") for h in known],
                          input_sha256=input_sha256, expected_autov3=[f.autov3 for f in recipe.files],
                          workers=workers, progress=progress, description="merge", device=compute_on)
    return merge_plan, result, jobs.nonfinite


def merge(inputs: Recipe | Sequence[str | os.PathLike], output: str | os.PathLike, *, record: bool = True,
          registry: Any = None, title: str | None = None, workers: int = DEFAULT_WORKERS, progress: bool = True,
          fail_on_nonfinite: bool = False, device: str | None = None, **options: Any) -> MergeResult:
    """Merge `inputs` (a Recipe, or input paths plus the options of `build_recipe`) into `output`.

    The output appears at its path only once complete. The inputs' AutoV3 are computed while
    merging, unless the registry has seen the unchanged files. Unless `record=False` the output is
    registered in the lineage registry (`registry`: a Registry, a path or None for the default) as a
    `merge` node with an edge from each input weighted by its nominal weight and from each adapter
    weighted by its strength (`adapters=[(path, strength), ...]` are added to the merged result); if that fails, the
    output stays and `record_error` says why. Input tensors with NaN/Inf are listed in the result,
    or raise with `fail_on_nonfinite`. `device` ("cuda", "cuda:N"; None: the CPU) is where the
    merged tensors are computed; the files stream through the host either way.
    """
    recipe = inputs if isinstance(inputs, Recipe) else build_recipe(inputs, **options)
    if isinstance(inputs, Recipe) and options:
        raise LineageError(f"options {', '.join(options)} are part of the recipe; set them on the Recipe")
    output = os.fspath(output)
    file_destination(output, [f.path for f in recipe.files])  # never onto an input or adapter, a device or a pipe
    merge_plan, result, nonfinite = run_recipe(recipe, output, registry=registry, title=title, workers=workers,
                                               progress=progress, fail_on_nonfinite=fail_on_nonfinite, device=device)
    hashed = recipe.with_hashes(result.input_autov3)
    node, record_error = None, None
    if record:
        try:
            node = _record(output, hashed, result.output_autov3, result.input_sha256, registry)
        except (LineageError, OSError) as e:
            record_error = str(e)
    return MergeResult(output, result.output_autov3, hashed, merge_plan, nonfinite, node, record_error)


def _record(output: str, recipe: Recipe, output_autov3: str, input_sha256: list[str | None], registry: Any) -> str:
    """Register the written output with an edge from each input and adapter (a `merge` edge, as `lmerge
    apply` records an adapter, weighted by its strength); every hash comes from the run (the
    output's from the write stream, the inputs' from the registry or the run's own hashing, kept so
    that the next merge of these inputs need not hash them again)."""
    from lineage.graph.recording import record as record_file

    def hashes(path: str, autov3: str | None, sha256: str | None = None) -> FileHashes:
        return FileHashes(path, sha256, None, sha256[:10] if sha256 else None, autov3, None)

    weights = edge_weights(recipe)
    known = [w for w in weights if w is not None]
    return record_file(output, parents=[f.path for f in recipe.files], relation="merge",
                       weights=known if len(known) == len(weights) else None,
                       params={"method": recipe.method, "recipe": record_of(recipe)}, registry=registry,
                       hashes=hashes(output, output_autov3),
                       parent_hashes=[hashes(f.path, f.autov3, sha) for f, sha in zip(recipe.files, input_sha256)])
