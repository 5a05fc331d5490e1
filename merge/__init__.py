"""lineage.merge: streaming merges of SDXL checkpoints (methods, per-key weights, recipes, the merge planner).

The package itself is callable, so `lineage.merge(inputs, output, ...)` runs a merge as the
top-level API promises while `lineage.merge.methods`, `lineage.merge.recipe`, … stay importable as
modules (a package and a function cannot share the name `lineage.merge` otherwise). Nothing heavy is
imported until a merge is called: `lmerge` starts without torch.
"""
from __future__ import annotations

import sys
import types
from typing import Any


class _CallablePackage(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from .api import merge

        return merge(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
