"""`lmerge reproduce FILE`: re-run the recipe a merged file records and check the result is the same.

The record (`lineage.record` in FILE's metadata) names every input and adapter by file name and
AutoV3. These files are found, in this order, among the paths the user gives, the files the registry has seen with that
AutoV3, and the file of that name next to FILE. The recipe is re-run and the new output's AutoV3 is
compared with FILE's own. Unless the re-run is to be kept (`output`), nothing is written: the run
only hashes what it would write, so there is no temporary file to leave behind.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lineage.engine.inputs import InputFile
from lineage.errors import LineageError
from lineage.graph.metadata import LINEAGE_RECORD_KEY, lineage_from_metadata
from lineage.io.atomic import file_destination

from .api import DEFAULT_WORKERS, merge, run_recipe
from .recipe import Adapter, Recipe


@dataclass(frozen=True)
class Reproduction:
    path: str
    expected_autov3: str  # FILE's own
    autov3: str  # of the re-run
    inputs: list[str]  # the files used
    output: str | None  # where the re-run was kept (None: it was only hashed)

    @property
    def matches(self) -> bool:
        return self.expected_autov3 == self.autov3


def recorded_recipe(path: str | os.PathLike) -> tuple[Recipe, str]:
    """The recipe a merged file records, and the file's own AutoV3."""
    with InputFile(path) as f:
        record = lineage_from_metadata(f.header.metadata).get("lineage")
        if not isinstance(record, dict) or "unparsed" in record:
            raise LineageError(f"has no readable `{LINEAGE_RECORD_KEY}` metadata: it was not made by "
                               "`lmerge merge`, or its metadata was stripped", f.path)
        try:
            recipe = Recipe.from_dict(record)
        except LineageError as e:
            raise LineageError(f"its merge record cannot be replayed: {e}", f.path) from None
        expected = f.data_autov3()
    assert expected is not None
    return recipe, expected


def locate_inputs(recipe: Recipe, near: str | os.PathLike, given: Sequence[str | os.PathLike] = (),
                  registry: Any = None) -> list[str]:
    """A path for every recorded input, then every recorded adapter (`recipe.files`): the given paths
    (all of them, in that order), else the registry's files with the recorded AutoV3, else the recorded
    file name next to `near` (the merged file). The merge verifies each hash."""
    if given:
        if len(given) != len(recipe.files):
            adapters = f" and {len(recipe.adapters)} adapters" if recipe.adapters else ""
            raise LineageError(f"the record names {len(recipe.inputs)} inputs{adapters}, {len(given)} files were "
                               "given")
        return [os.fspath(p) for p in given]
    from lineage.graph.registry import using_registry

    folder = os.path.dirname(os.path.abspath(near))
    found = []
    with using_registry(registry) as reg:
        for inp in recipe.files:
            candidates = [*(reg.find_paths(inp.autov3) if inp.autov3 else []), os.path.join(folder, inp.path)]
            existing = next((c for c in candidates if os.path.isfile(c)), None)
            if existing is None:
                what = "adapter" if isinstance(inp, Adapter) else "input"
                raise LineageError(f"{what} {inp.name!r} (AutoV3 {(inp.autov3 or '?')[:12]}) was not found: not in "
                                   f"the registry and not next to the merged file as {inp.path}; give the "
                                   "inputs and adapters with --input")
            found.append(existing)
    return found


def reproduce(path: str | os.PathLike, *, inputs: Sequence[str | os.PathLike] = (), registry: Any = None,
              output: str | os.PathLike | None = None, workers: int = DEFAULT_WORKERS,
              progress: bool = True) -> Reproduction:
    """Re-run the recipe recorded in `path` and compare AutoV3s (keep the re-run at `output` if given)."""
    path = os.fspath(path)
    recipe, expected = recorded_recipe(path)
    recipe = recipe.with_paths(locate_inputs(recipe, path, inputs, registry))
    used = [f.path for f in recipe.files]
    if output is not None:
        file_destination(output, [path])  # the re-run must not replace the file it checks
        result = merge(recipe, output, record=False, registry=registry, workers=workers, progress=progress)
        return Reproduction(path, expected, result.autov3, used, os.fspath(output))
    _, run, _ = run_recipe(recipe, None, registry=registry, workers=workers, progress=progress)
    return Reproduction(path, expected, run.output_autov3, used, None)
