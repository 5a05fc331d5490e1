"""lineage: family trees, streaming merges and adapters for SDXL checkpoints.

The public API is this module's functions; the `lmerge` command line is a thin layer over them.
Subpackages that build on the core (merging, adapters, training) are imported on first use, so
`import lineage` stays fast and they can import the core without a cycle.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .detect import detect, require_sdxl
from .errors import CheckpointError, LineageError
from .hashing import FileHashes, hash_file
from .inspection import inspect_path as inspect
from .safetensors_io import SafetensorsFile, SafetensorsWriter, read_header, save_file
from .synthetic import write_base, write_child

__all__ = [
    "CheckpointError", "FileHashes", "LineageError", "SafetensorsFile", "SafetensorsWriter",
    "detect", "hash_file", "inspect", "read_header", "require_sdxl", "save_file", "write_base", "write_child",
]
