"""lineage: family trees, streaming merges and adapters for SDXL checkpoints.

The public API is the names below; the `lmerge` command line is a thin layer over them. Each name
is imported from its module on first use (PEP 562), so `import lineage` and `lmerge hash` do not
pay for torch until they need it, and the subpackages that build on the core (merge/, adapters/,
train/) can import the core without an import cycle.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> "module:attribute" (or a subpackage), relative to this package
_API: dict[str, str] = {
    "CheckpointError": ".errors:CheckpointError",
    "LineageError": ".errors:LineageError",
    "FileHashes": ".io.hashing:FileHashes",
    "hash_file": ".io.hashing:hash_file",
    "SafetensorsFile": ".io.safetensors:SafetensorsFile",
    "SafetensorsWriter": ".io.safetensors:SafetensorsWriter",
    "read_header": ".io.safetensors:read_header",
    "save_file": ".io.safetensors:save_file",
    "detect": ".sdxl.detection:detect",
    "require_sdxl": ".sdxl.detection:require_sdxl",
    "inspect": ".sdxl.inspection:inspect_path",
    "write_base": ".sdxl.synthetic:write_base",
    "write_child": ".sdxl.synthetic:write_child",
    "merge": ".merge",  # the package, callable: lineage.merge(inputs, output, ...)
    "record": ".graph.recording:record",
    "sample": ".train.sampling:sample",
}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    try:
        module, _, attribute = _API[name].partition(":")
    except KeyError:
        raise AttributeError(f"module 'lineage' has no attribute {name!r}") from None
    value = importlib.import_module(module, __name__)
    if attribute:
        value = getattr(value, attribute)
    globals()[name] = value  # cache: the next access is a plain lookup
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
