"""The types of merge-method parameters: what values each accepts, checked before any work.

A method declares each keyword parameter's type in its signature, either as a plain `float`
(any finite number) or `int`, or as `Annotated[..., spec]` with one of the specs below; the
aliases at the end name the common ones:

    def ties(base, *models, weights: PositiveWeights = None, density: Share = 0.2, alpha: Finite = 1.0): ...

`problem(value, model_count)` returns what is wrong with a value (None when it is fine), in words
that follow the parameter's name: "must be in [0, 1], got 1.5". Values come from TOML, JSON and
the command line, so numbers may be int or float; bool is never a number here.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any


def is_number(value: Any) -> bool:
    """An int or a float, as JSON and TOML give numbers; never a bool (which Python counts as an int)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _interval(low: float | None, high: float | None, low_open: bool) -> str:
    left = "(" if low_open else "["
    return f"{left}{'-inf' if low is None else _number_text(low)}, {'inf' if high is None else _number_text(high)}]"


def _number_text(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


@dataclass(frozen=True)
class Real:
    """A finite number, optionally within [low, high] (or (low, high] with low_open)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    varies_per_key = True  # block weights and overrides may give it a value per key

    def problem(self, value: Any, model_count: int) -> str | None:
        if not is_number(value):
            return f"must be a number, got {value!r}"
        if not math.isfinite(value):
            return f"must be a finite number, got {value!r}"
        below = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        if below or (self.high is not None and value > self.high):
            return f"must be in {_interval(self.low, self.high, self.low_open)}, got {value!r}"
        return None

    def describe(self) -> str:
        if self.low is None and self.high is None:
            return "finite number"
        return f"number in {_interval(self.low, self.high, self.low_open)}"


@dataclass(frozen=True)
class Integer:
    """A whole number of at least `low`."""

    low: int | None = None
    varies_per_key = False

    def problem(self, value: Any, model_count: int) -> str | None:
        if not is_number(value) or not math.isfinite(value) or value != int(value):
            return f"must be a whole number, got {value!r}"
        if self.low is not None and value < self.low:
            return f"must be at least {self.low}, got {value!r}"
        return None

    def describe(self) -> str:
        return "whole number" + (f" >= {self.low}" if self.low is not None else "")


@dataclass(frozen=True)
class Choice:
    """One of a few words."""

    options: tuple[str, ...]
    varies_per_key = False

    def problem(self, value: Any, model_count: int) -> str | None:
        if value not in self.options:
            return f"must be one of {', '.join(map(repr, self.options))}, got {value!r}"
        return None

    def describe(self) -> str:
        return " | ".join(self.options)


@dataclass(frozen=True)
class ModelWeights:
    """One finite number per model (after the base, for methods over a base), or None for all 1."""

    positive: bool = False  # the weights of a mean: each must be > 0
    varies_per_key = False

    def problem(self, value: Any, model_count: int) -> str | None:
        if value is None:
            return None
        if isinstance(value, str) or not isinstance(value, Sequence) or not all(is_number(w) for w in value):
            return f"must be a list of numbers, one per model, got {value!r}"
        if len(value) != model_count:
            return f"takes one number per model ({model_count}), got {len(value)}: {list(value)!r}"
        if not all(math.isfinite(w) for w in value):
            return f"must be finite numbers, got {list(value)!r}"
        if self.positive and any(w <= 0 for w in value):
            return f"must be positive (they weight a mean), got {list(value)!r}"
        return None

    def describe(self) -> str:
        return f"list of {'positive' if self.positive else 'finite'} numbers, one per model"


ParamType = Real | Integer | Choice | ModelWeights
PLAIN_TYPES: dict[Any, ParamType] = {float: Real(), int: Integer()}  # unannotated `float` / `int` parameters


def param_type(annotation: Any) -> ParamType | None:
    """The spec an annotation declares: the first spec in `Annotated[...]`, or a plain float / int."""
    for extra in getattr(annotation, "__metadata__", ()):
        if isinstance(extra, (Real, Integer, Choice, ModelWeights)):
            return extra
    return PLAIN_TYPES.get(annotation)


# The common parameter types, by meaning.
Finite = Annotated[float, Real()]  # a multiplier or weight that may be negative or above 1
Share = Annotated[float, Real(0.0, 1.0)]  # a share of entries, 0 to 1
KeepRate = Annotated[float, Real(0.0, 1.0, low_open=True)]  # a share kept that must not be 0 (it divides)
Positive = Annotated[float, Real(0.0, low_open=True)]
Count = Annotated[int, Integer(1)]  # a number of steps, at least one
NonNegative = Annotated[float, Real(0.0)]
Weights = Annotated[Sequence[float] | None, ModelWeights()]
PositiveWeights = Annotated[Sequence[float] | None, ModelWeights(positive=True)]
Threshold = Annotated[str, Choice(("exact", "sampled"))]  # how a magnitude threshold is found
