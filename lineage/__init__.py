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

# public name -> "module:attribute" (modules relative to this package unless they start with a top-level package)
_API: dict[str, str] = {
    "CheckpointError": ".errors:CheckpointError",
    "LineageError": ".errors:LineageError",
    "FileHashes": ".hashing:FileHashes",
    "hash_file": ".hashing:hash_file",
    "SafetensorsFile": ".safetensors_io:SafetensorsFile",
    "SafetensorsWriter": ".safetensors_io:SafetensorsWriter",
    "read_header": ".safetensors_io:read_header",
    "save_file": ".safetensors_io:save_file",
    "detect": ".detection:detect",
    "require_sdxl": ".detection:require_sdxl",
    "inspect": ".inspection:inspect_path",
    "write_base": ".synthetic:write_base",
    "write_child": ".synthetic:write_child",
    "merge": "merge.api:merge",
    "record": ".recording:record",
}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    try:
        module, attribute = _API[name].split(":")
    except KeyError:
        raise AttributeError(f"module 'lineage' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module, __name__), attribute)
    globals()[name] = value  # cache: the next access is a plain lookup
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
