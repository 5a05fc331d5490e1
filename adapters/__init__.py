"""lineage.adapters: SDXL adapters (LoRA, LoCon, LoKr, LoHa, full diffs) — which modules they adapt
(modules.py), how each file format names its tensors (dialects.py), reading (reader.py), writing keys
and metadata (writer.py, metadata.py) and conversion between dialects (convert.py). docs/adapters.md.

`lineage.adapters.convert(source, output, to="peft")` converts: the submodule `convert` is itself
callable (see adapters/convert.py), so the name works as a function and as a module. Nothing here
imports torch.
"""
from __future__ import annotations

import importlib
from types import ModuleType


def __getattr__(name: str) -> ModuleType:
    """Submodules on first use (`lineage.adapters.convert(...)` without importing it first)."""
    try:
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
