"""`lmerge convert`: legacy pickle checkpoints (.ckpt/.pt/.bin) to safetensors.

Unpickling can run arbitrary code, so nothing else in lineage opens a pickle. Here the user asks
for it explicitly, and even then torch.load runs with `weights_only=True`, which refuses any
object other than tensors and plain containers. The whole file is loaded: that is the one
operation where the user has asked for it.
"""
from __future__ import annotations

import os

import torch

from lineage.errors import CheckpointError
from lineage.io.safetensors import DTYPE_NAMES, refuse_overwriting_inputs, save_file


def _flatten(obj: object, prefix: str = "") -> dict[str, torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return {prefix.rstrip("."): obj}
    if isinstance(obj, dict):
        out: dict[str, torch.Tensor] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {}  # step counters, optimizer hyper-parameters, ...: not weights


def convert_pickle(src: str | os.PathLike, dst: str | os.PathLike, metadata: dict[str, str] | None = None) -> int:
    """Convert a pickle checkpoint to safetensors; returns the number of tensors written."""
    src, dst = os.fspath(src), os.fspath(dst)
    refuse_overwriting_inputs(dst, [src])
    try:
        loaded = torch.load(src, map_location="cpu", weights_only=True, mmap=False)
    except FileNotFoundError:
        raise CheckpointError("no such file", src) from None
    except Exception as e:  # torch raises many kinds for bad or unsafe pickles
        raise CheckpointError(f"cannot load as a weights-only pickle checkpoint ({str(e).splitlines()[0]})", src) from None
    state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else loaded
    tensors = _flatten(state)
    if not tensors:
        raise CheckpointError("holds no tensors", src)
    unsupported = [k for k, t in tensors.items() if t.dtype not in DTYPE_NAMES]
    if unsupported:
        raise CheckpointError(f"tensor {unsupported[0]!r} has dtype {tensors[unsupported[0]].dtype}, which safetensors cannot store", src)
    # Tensors that share storage in the pickle must be written as separate copies.
    save_file({k: t.contiguous().clone() for k, t in tensors.items()}, dst, metadata)
    return len(tensors)
