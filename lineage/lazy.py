"""Modules imported on first use, so that commands which only read headers start without torch.

Importing torch takes over a second, and `lmerge inspect`, `methods`, `compat` and `merge --dry-run`
never touch a tensor: they parse headers and recipes. Modules that need torch only inside their
functions import it as

    from lineage.lazy import torch

and get a stand-in module: the first attribute looked up on it (`torch.empty`, `torch.float16`, ...)
imports the real torch, and each name looked up is taken from it (and kept on the stand-in). Nothing
else changes for the code using it.
A table of torch objects at module level (safetensors dtype names -> torch dtypes) is a `LazyDict`,
built the first time it is read.

The stand-in imports through `importlib.import_module`, which holds the import system's lock for the
module while it initialises, so threads that reach torch for the first time together all get the one
fully initialised module. (`importlib.util.LazyLoader` has no such lock in Python 3.11: four threads
touching a torch loaded through it together got AttributeErrors from the half-initialised module.)
"""
from __future__ import annotations

import importlib
import types
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class LazyModule(types.ModuleType):
    """A stand-in for the module `name`, which is imported when an attribute is first looked up."""

    def __getattr__(self, attribute: str) -> Any:  # called only for names the stand-in itself lacks
        value = getattr(importlib.import_module(self.__name__), attribute)
        setattr(self, attribute, value)  # so later lookups (hot loops make many) find it without this call
        return value

    def __dir__(self) -> list[str]:
        return dir(importlib.import_module(self.__name__))

    def __repr__(self) -> str:
        return f"<lazily imported module {self.__name__!r}>"


class LazyDict(Mapping[K, V]):
    """A read-only dict that `build()` makes on first use."""

    def __init__(self, build: Callable[[], dict[K, V]]) -> None:
        self._build = build
        self._dict: dict[K, V] | None = None

    def _data(self) -> dict[K, V]:
        if self._dict is None:  # two threads may both build it: the same dict, so either one does
            self._dict = self._build()
        return self._dict

    def __getitem__(self, key: K) -> V:
        return self._data()[key]

    def __iter__(self) -> Iterator[K]:
        return iter(self._data())

    def __len__(self) -> int:
        return len(self._data())


if TYPE_CHECKING:  # type checkers see the real module and its annotations
    import torch
else:
    torch = LazyModule("torch")
