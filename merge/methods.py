"""Merge methods: each one small function over fp32 tensors, registered by name (HANDBOOK §7).

Conventions every method follows:
- Inputs are positional fp32 tensors of the same shape, in the order the user listed the models.
  Methods marked `needs_base` take the base model first: `fn(base, m1, m2, ..., **params)`.
- Parameters are keyword scalars (or a list of per-model floats for `weights`). The engine may give a
  parameter a different value per key (block weights, regex overrides) and calls the function once
  per tensor with that key's values.
- Random methods take `seed: int`, already derived by the engine from the recipe seed and the key,
  so the same recipe reproduces bit-for-bit.
- A method returns a new fp32 tensor of the inputs' shape; it never modifies its inputs.

Register a new one from a script:

    from merge.methods import merge_method

    @merge_method("my_average", min_models=2)
    def my_average(*models, weights=None): ...
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from lineage.errors import LineageError


@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: Callable[..., torch.Tensor]
    needs_base: bool  # the first input is the base the others are fine-tunes of
    min_models: int  # counting the base
    max_models: int | None
    random: bool  # takes a per-tensor `seed`
    defaults: dict[str, Any] = field(default_factory=dict)  # keyword parameters and their defaults

    @property
    def doc(self) -> str:
        return inspect.getdoc(self.fn) or ""

    def check_model_count(self, n: int) -> None:
        if n < self.min_models or (self.max_models is not None and n > self.max_models):
            want = str(self.min_models) if self.max_models == self.min_models else \
                f"at least {self.min_models}" if self.max_models is None else f"{self.min_models} to {self.max_models}"
            base = " (the base first)" if self.needs_base else ""
            raise LineageError(f"merge method {self.name!r} takes {want} models{base}, got {n}")


METHODS: dict[str, MergeMethod] = {}


def merge_method(name: str, *, needs_base: bool = False, min_models: int = 2, max_models: int | None = None,
                 random: bool = False) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """Register `fn` as the merge method `name`; its keyword-only parameters are the method's parameters."""

    def register(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        sig = inspect.signature(fn)
        defaults = {p.name: p.default for p in sig.parameters.values()
                    if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name != "seed"}
        METHODS[name] = MergeMethod(name, fn, needs_base, min_models, max_models, random, defaults)
        return fn

    return register


def get_method(name: str) -> MergeMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise LineageError(f"unknown merge method {name!r}; known: {', '.join(sorted(METHODS))}") from None


# ---------------------------------------------------------------------------------------------
# Two models


@merge_method("weighted_sum", min_models=2, max_models=2)
def weighted_sum(a: torch.Tensor, b: torch.Tensor, *, alpha: float = 0.5) -> torch.Tensor:
    """(1 - alpha)·A + alpha·B. `alpha` is the weight of the second model B, as in A1111/supermerger
    (ComfyUI's ratio is the weight of the first model: alpha = 1 - ratio)."""
    return torch.lerp(a, b, alpha)


@merge_method("add_difference", min_models=3, max_models=3)
def add_difference(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, *, alpha: float = 1.0) -> torch.Tensor:
    """A + alpha·(B - C): add what B learned over C to A (A1111's "Add difference", alpha = multiplier)."""
    return a + alpha * (b - c)
