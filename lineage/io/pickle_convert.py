"""`lmerge convert`: legacy pickle checkpoints (.ckpt/.pt/.bin) to safetensors.

Unpickling can run arbitrary code, so nothing else in lineage opens a pickle. Here the user asks
for it explicitly, and even then torch.load runs with `weights_only=True`, which refuses any
object other than tensors and plain containers. The whole file is loaded: that is the one
operation where the user has asked for it.

A checkpoint is a tree of dicts (and sometimes lists) with tensors as leaves. Its tensors are
written under their dotted paths (`model.diffusion_model.x.weight`; list items by index, as torch
names the children of a ModuleList). Nothing is dropped without a word:

- entries that are not tensors (step counters, hyper-parameters) and, when the checkpoint has a
  `state_dict`, the other top-level entries beside it (optimizer state, EMA copies) are left out
  and listed in the result;
- a tensor safetensors cannot store (sparse, meta, nested, quantized or complex), two entries that
  flatten to the same name, an empty name, a container holding itself or a key that is not text
  or an integer stop the conversion with an error naming the entry.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from lineage.errors import CheckpointError, brief
from lineage.io.atomic import file_destination
from lineage.io.inputs import open_input
from lineage.io.safetensors import DTYPE_NAMES, save_file

STATE_KEY = "state_dict"  # Lightning / A1111 checkpoints keep the weights under this key


@dataclass
class Conversion:
    """What `convert_pickle` wrote and what it left out (each as "name (type)")."""

    tensors: int
    left_out: list[str] = field(default_factory=list)


def _child_name(prefix: str, key: object, src: str) -> str:
    if isinstance(key, bool) or not isinstance(key, (str, int)):
        raise CheckpointError(f"entry {brief(prefix or '<top level>')} has a key of type {type(key).__name__} "
                              f"({brief(key)}); only text and integer keys make tensor names", src)
    return f"{prefix}.{key}" if prefix else str(key)


def _unstorable(tensor: torch.Tensor) -> str | None:
    """Why safetensors cannot store this tensor, or None."""
    if tensor.is_nested:
        return "is a nested tensor"
    if tensor.layout != torch.strided:
        return f"is a sparse tensor ({tensor.layout}); safetensors stores dense tensors only — save it with .to_dense()"
    if tensor.is_meta:
        return "is a meta tensor: it has a shape but no data"
    if tensor.dtype not in DTYPE_NAMES:
        return f"has dtype {tensor.dtype}, which safetensors cannot store"
    return None


# The keys leading to an entry, as a linked list (parent, key): each level costs O(1) however deep.
_Keys = tuple["_Keys", object] | None


@dataclass(frozen=True)
class _Leave:
    """Stack marker: every entry of this container has been walked."""

    container: int


def _keys_text(keys: _Keys) -> str:
    parts = []
    while keys is not None:
        keys, key = keys
        parts.append(f"[{key!r}]")
    return "".join(reversed(parts))


def flatten_checkpoint(obj: object, src: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The tensors of a loaded checkpoint by dotted name, and the non-tensor entries left out.

    Walks the tree with an explicit stack, so however deep the nesting it never hits Python's
    recursion limit; a container met again inside itself is an error, not an endless walk."""
    tensors: dict[str, torch.Tensor] = {}
    origin: dict[str, _Keys] = {}  # name -> the keys leading to it, to explain a collision
    left_out: list[str] = []
    on_path: set[int] = set()  # ids of the containers being walked (meeting one again is a cycle)
    stack: list[tuple[object, str, _Keys] | _Leave] = [(obj, "", None)]
    while stack:
        entry = stack.pop()
        if isinstance(entry, _Leave):
            on_path.discard(entry.container)
            continue
        item, name, keys = entry
        if isinstance(item, torch.Tensor):
            if not name:
                raise CheckpointError("holds a tensor without a name (the checkpoint is a bare tensor, not a "
                                      "dict of named tensors)", src)
            problem = _unstorable(item)
            if problem:
                raise CheckpointError(f"tensor {brief(name)} {problem}", src)
            if name in tensors:
                raise CheckpointError(f"two entries flatten to the same tensor name {brief(name)}: "
                                      f"{_keys_text(origin[name])} and {_keys_text(keys)}", src)
            tensors[name], origin[name] = item, keys
        elif isinstance(item, (dict, list, tuple)):
            if id(item) in on_path:
                raise CheckpointError(f"entry {brief(name or '<top level>')} contains itself", src)
            on_path.add(id(item))
            stack.append(_Leave(id(item)))
            children = item.items() if isinstance(item, dict) else enumerate(item)
            for key, value in reversed(list(children)):  # reversed: the stack pops them in file order
                stack.append((value, _child_name(name, key, src), (keys, key)))
        else:
            left_out.append(f"{name or '<top level>'} ({type(item).__name__})")
    return tensors, left_out


def convert_pickle(src: str | os.PathLike, dst: str | os.PathLike,
                   metadata: dict[str, str] | None = None) -> Conversion:
    """Convert a pickle checkpoint to safetensors; returns how many tensors were written and what was left out."""
    src, dst = os.fspath(src), os.fspath(dst)
    file_destination(dst, [src])
    with os.fdopen(open_input(src), "rb") as f:  # a FIFO or device is refused before torch reads from it
        try:
            loaded = torch.load(f, map_location="cpu", weights_only=True, mmap=False)
        except Exception as e:  # torch raises many kinds for bad or unsafe pickles
            first_line = (str(e).splitlines() or [type(e).__name__])[0]
            raise CheckpointError(f"cannot load as a weights-only pickle checkpoint ({first_line})", src) from None
    left_out: list[str] = []
    state = loaded
    if isinstance(loaded, dict) and STATE_KEY in loaded:
        state = loaded[STATE_KEY]
        left_out = [f"{k} (beside {STATE_KEY}, {type(v).__name__})" for k, v in loaded.items() if k != STATE_KEY]
    tensors, skipped = flatten_checkpoint(state, src)
    if not tensors:
        raise CheckpointError("holds no tensors", src)
    # Tensors that share storage in the pickle must be written as separate copies.
    save_file({k: t.contiguous().clone() for k, t in tensors.items()}, dst, metadata)
    return Conversion(len(tensors), left_out + skipped)
