"""`lmerge reproduce FILE`: re-run the recipe a merged file records and check the result is the same.

The record (`lineage.record` in FILE's metadata) names every input by path and AutoV3. Inputs are
found, in this order, among the paths the user gives, the files the registry has seen with that
AutoV3, and the recorded path. The recipe is re-run (by default into a temporary file next to FILE,
removed afterwards) and the new output's AutoV3 is compared with FILE's own.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lineage.errors import LineageError
from lineage.graph.metadata import LINEAGE_RECORD_KEY, lineage_from_metadata
from lineage.io.atomic import file_destination
from lineage.io.safetensors import SafetensorsFile

from .api import DEFAULT_WORKERS, merge
from .engine import data_section_autov3
from .recipe import Recipe


@dataclass(frozen=True)
class Reproduction:
    path: str
    expected_autov3: str  # FILE's own
    autov3: str  # of the re-run
    inputs: list[str]  # the files used
    output: str | None  # where the re-run was kept (None: it was a temporary file)

    @property
    def matches(self) -> bool:
        return self.expected_autov3 == self.autov3


def recorded_recipe(path: str | os.PathLike) -> tuple[Recipe, str]:
    """The recipe a merged file records, and the file's own AutoV3."""
    with SafetensorsFile(path) as f:
        record = lineage_from_metadata(f.metadata).get("lineage")
        if not isinstance(record, dict) or "unparsed" in record:
            raise LineageError(f"has no readable `{LINEAGE_RECORD_KEY}` metadata: it was not made by "
                               "`lmerge merge`, or its metadata was stripped", f.path)
        try:
            recipe = Recipe.from_dict(record)
        except LineageError as e:
            raise LineageError(f"its merge record cannot be replayed: {e}", f.path) from None
        expected = data_section_autov3(f)
    assert expected is not None
    return recipe, expected


def _registry_paths(autov3: str | None, registry: Any) -> list[str]:
    if not autov3:
        return []
    from lineage.graph.registry import open_registry

    reg = open_registry(registry)
    try:
        return reg.find_paths(autov3)
    finally:
        if reg is not registry:
            reg.close()


def locate_inputs(recipe: Recipe, given: Sequence[str | os.PathLike] = (), registry: Any = None) -> list[str]:
    """A path for every recorded input: the given paths (all of them, in order), else the registry's
    files with the recorded AutoV3, else the recorded path. The merge verifies each hash."""
    if given:
        if len(given) != len(recipe.inputs):
            raise LineageError(f"the record names {len(recipe.inputs)} inputs, {len(given)} were given")
        return [os.fspath(p) for p in given]
    found = []
    for inp in recipe.inputs:
        candidates = [*_registry_paths(inp.autov3, registry), inp.path]
        existing = next((c for c in candidates if os.path.isfile(c)), None)
        if existing is None:
            raise LineageError(f"input {inp.name!r} (AutoV3 {(inp.autov3 or '?')[:12]}) was not found: not at "
                               f"{inp.path} and not in the registry; give the inputs with --input")
        found.append(existing)
    return found


def reproduce(path: str | os.PathLike, *, inputs: Sequence[str | os.PathLike] = (), registry: Any = None,
              output: str | os.PathLike | None = None, workers: int = DEFAULT_WORKERS,
              progress: bool = True) -> Reproduction:
    """Re-run the recipe recorded in `path` and compare AutoV3s (keep the re-run at `output` if given)."""
    path = os.fspath(path)
    recipe, expected = recorded_recipe(path)
    recipe = recipe.with_paths(locate_inputs(recipe, inputs, registry))
    if output is not None:
        file_destination(output, [path])  # the re-run must not replace the file it checks
        result = merge(recipe, output, record=False, workers=workers, progress=progress)
        return Reproduction(path, expected, result.autov3, [i.path for i in recipe.inputs], os.fspath(output))
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(path)), prefix=".lmerge-reproduce-") as tmp:
        result = merge(recipe, os.path.join(tmp, os.path.basename(path)), record=False, workers=workers,
                       progress=progress)
    return Reproduction(path, expected, result.autov3, [i.path for i in recipe.inputs], None)
