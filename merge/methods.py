"""Merge methods: each one small function over fp32 tensors, registered by name (docs/merging.md).

Declaring a method: its signature says everything the engine needs, nothing is repeated in the
decorator (as mergekit's `easy_define`):
- the models are its positional parameters, in the order the user lists them: a fixed number
  (`a, b`) or any number (`*models`, at least two in all). A first parameter named `base` makes it
  a method over a base model, `fn(base, m1, m2, ...)`, the task vectors being τᵢ = θᵢ − base;
- its keyword-only parameters are the user's parameters, each with a default and a type that
  bounds its values (merge/parameters.py: `density: Share = 0.2` is a number in [0, 1],
  `weights: Weights = None` one finite number per model, a plain `float` any finite number);
- a keyword parameter `seed` makes it random: the engine passes a per-tensor seed derived from the
  recipe's seed and the key, so the same recipe reproduces bit for bit;
- a keyword parameter `statistics` receives the output of the decorator's `statistics` function
  (below).
The decorator adds only what a signature cannot say: `elementwise`, a `statistics` function, a
`stored_loop`, a `constraint` between parameters, a larger `min_models` for `*models`, and `peers`,
how the method differs from sd-mecha's and mergekit's (`lmerge methods` prints it).

Every parameter value of a recipe (per-key values included) is checked against these types before
any work, so `lmerge merge --dry-run` catches `density=1.5`. The function the decorator returns
checks its arguments the same way when called directly; the engine calls `MergeMethod.fn`, the
unchecked function, with values already checked.

Contract of a method function:
- inputs are fp32 tensors of one shape; it returns a new fp32 tensor of that shape and never
  modifies its inputs;
- `elementwise` methods compute each output entry from the same entry of the inputs alone (given
  their statistics), so the engine may run them on pieces;
- `statistics(inputs, params)` computes per-tensor scalars (e.g. TIES' magnitude thresholds) from
  each input's WHOLE flat tensor as stored (memory-mapped, e.g. fp16: it converts pieces to fp32
  itself and makes no full fp32 copy of a large tensor). The method takes them as its keyword
  `statistics` (None: it computes them itself), so the engine computes them once per tensor and
  then runs the method on pieces;
- `stored_loop(out, inputs, params)` (optional, with `statistics`) computes the same output as the
  method in one compiled pass over the inputs as stored, writing `out` in its own dtype (float16,
  bfloat16 or float32 each; merge/cpu_loops.py), and returns the positions of the inputs holding a
  NaN or ±Inf. The engine uses it on the CPU for those dtypes, where converting every input to fp32
  and the result back, and looking for non-finite values, would cost more than the method's own
  arithmetic; the method function stays the reference that tests hold it to.

Shared parameter names:
- `alpha`: for two-model methods the weight of the second model B (A1111's convention); for methods
  over a base the multiplier λ of the merged delta (mergekit's `lambda`).
- `weights`: one number per model after the base (None: all 1).
- `density`: the share of each τᵢ's entries that is KEPT (a keep-rate: sd-mecha's dropout
  "probability" is the share dropped, 1 − density).

Non-finite inputs (NaN, +Inf, −Inf): one rule for every method.
1. An entry a method drops (TIES' and breadcrumbs' trims, DARE's and DELLA's random drops)
   contributes nothing, whatever its value: a dropped NaN never reaches the output.
2. Rankings and per-tensor statistics use finite values only: a NaN or ±Inf |τ| ranks below every
   finite one, so it never takes a TIES or breadcrumbs slot (and is dropped by rule 1); cosines
   (slerp, model_stock) and distances (geometric_median) leave out the entries that are not finite
   in every input.
3. Everywhere else arithmetic is IEEE's: an output entry computed from a kept non-finite value is
   NaN or ±Inf, never clamped to ±3.4e38 nor zeroed (a kept NaN makes TIES' elected sign, and so
   the entry, NaN). The merge lists such input tensors, or stops with `--fail-on-nonfinite`.

Register a new one from a script:

    from lineage.merge.methods import merge_method
    from lineage.merge.parameters import Share

    @merge_method("my_average")
    def my_average(*models, share: Share = 0.5): ...
"""
from __future__ import annotations

import functools
import inspect
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lineage.errors import LineageError
from lineage.lazy import LazyModule, torch

from . import ranking, rng
from .parameters import (
    Count,
    Finite,
    KeepRate,
    NonNegative,
    ParamType,
    Positive,
    PositiveWeights,
    Share,
    Threshold,
    Weights,
    param_type,
)

kernels = LazyModule("lineage.merge.kernels")  # imports Triton (~0.1 s): only when a merge runs
np = LazyModule("numpy")

ENGINE_SUPPLIED = ("seed", "statistics")  # keyword parameters the engine fills in, not the user


def _section(doc: str | None, heading: str) -> str:
    """The paragraph of `doc` that starts with `heading`, up to the next blank line ("" where
    docstrings are stripped, python -OO)."""
    if not doc or heading not in doc:
        return ""
    start = doc.index(heading)
    end = doc.find("\n\n", start)
    return doc[start:end if end >= 0 else None]


NONFINITE_RULE = _section(__doc__, "Non-finite inputs")  # `lmerge methods` prints it


@dataclass(frozen=True)
class Param:
    """One user parameter of a method: its type (what values it accepts) and its default."""

    name: str
    type: ParamType
    default: Any


if typing.TYPE_CHECKING:  # (an alias evaluated at import would import torch, which declarations do without)
    # (out, inputs as stored, params with the statistics) -> positions of the inputs holding NaN or ±Inf
    StoredLoop = Callable[[torch.Tensor, Sequence[torch.Tensor], Mapping[str, Any]], list[int]]


@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: Callable[..., torch.Tensor]  # unchecked: the engine calls it with checked parameters
    needs_base: bool  # the first input is the base the others are fine-tunes of
    min_models: int  # counting the base
    max_models: int | None
    random: bool  # takes a per-tensor `seed`
    params: Mapping[str, Param] = field(default_factory=dict)
    elementwise: bool = False  # each output entry depends only on the same entry of the inputs (and the statistics)
    # Per-tensor scalars from the inputs' whole flat tensors, passed to fn as `statistics` (module doc).
    statistics: Callable[[Sequence[torch.Tensor], Mapping[str, Any]], Any] | None = None
    # fn's output in one compiled pass over the stored inputs, given the statistics (module doc).
    stored_loop: StoredLoop | None = None
    # A rule between parameters: what is wrong with a complete set of values, or None.
    constraint: Callable[[Mapping[str, Any]], str | None] | None = None
    peers: str = ""  # where the method differs from sd-mecha's / mergekit's

    @property
    def doc(self) -> str:
        return inspect.getdoc(self.fn) or ""

    @property
    def defaults(self) -> dict[str, Any]:
        return {name: p.default for name, p in self.params.items()}

    def models_described(self) -> str:
        """How many models it takes, in words."""
        if self.max_models == self.min_models:
            count = str(self.min_models)
        elif self.max_models is None:
            count = f"at least {self.min_models}"
        else:
            count = f"{self.min_models} to {self.max_models}"
        return f"{count} models" + (" (the base first)" if self.needs_base else "")

    def check_model_count(self, n: int) -> None:
        if n < self.min_models or (self.max_models is not None and n > self.max_models):
            raise LineageError(f"merge method {self.name!r} takes {self.models_described()}, got {n}")

    def _error(self, message: str) -> LineageError:
        return LineageError(f"merge method {self.name!r}: {message}")

    def check_names(self, names: Sequence[str]) -> None:
        unknown = [n for n in names if n not in self.params]
        if unknown:
            raise LineageError(f"merge method {self.name!r} has no parameter {', '.join(map(repr, unknown))} "
                               f"(its parameters: {', '.join(self.params) or 'none'})")

    def check_value(self, name: str, value: Any, model_count: int, where: str = "") -> None:
        """Raise a one-line error naming the parameter if `value` is not one it accepts; `where`
        says where a per-key value comes from."""
        self.check_names([name])
        problem = self.params[name].type.problem(value, self.weight_count(model_count))
        if problem:
            raise self._error(f"parameter {name!r} {problem}" + (f" ({where})" if where else ""))

    def check_params(self, params: Mapping[str, Any], model_count: int, where: str = "") -> dict[str, Any]:
        """Check every given value and the constraint between them; returns the complete parameters
        (defaults filled in)."""
        for name, value in params.items():
            self.check_value(name, value, model_count, where)
        complete = {**self.defaults, **params}
        self.check_constraint(complete, where)
        return complete

    def check_constraint(self, complete: Mapping[str, Any], where: str = "") -> None:
        problem = self.constraint(complete) if self.constraint else None
        if problem:
            raise self._error(problem + (f" ({where})" if where else ""))

    def weight_count(self, model_count: int) -> int:
        """How many models `weights` has one number for: every model but the base."""
        return model_count - 1 if self.needs_base else model_count


METHODS: dict[str, MergeMethod] = {}


def _declare(name: str, fn: Callable[..., torch.Tensor], elementwise: bool,
             statistics: Callable[[Sequence[torch.Tensor], Mapping[str, Any]], Any] | None,
             constraint: Callable[[Mapping[str, Any]], str | None] | None, min_models: int | None,
             peers: str, stored_loop: StoredLoop | None = None) -> MergeMethod:
    """A MergeMethod from the function's signature (module doc). Mistakes in a declaration are
    TypeErrors: they are the method author's, not the user's."""
    def wrong(message: str) -> TypeError:
        return TypeError(f"merge method {name!r}: {message}")

    signature = inspect.signature(fn)
    keywords = {p.name for p in signature.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    # Only the keyword parameters' annotations are evaluated: the models' (`torch.Tensor`) would import
    # torch, and `lmerge methods` / `merge --dry-run` read declarations without it.
    keyword_annotations = {n: a for n, a in fn.__annotations__.items() if n in keywords}
    declared_only = types.SimpleNamespace(__annotations__=keyword_annotations)
    try:
        hints = typing.get_type_hints(declared_only, globalns=fn.__globals__, include_extras=True)
    except Exception as e:  # an annotation that does not evaluate in the function's module
        raise wrong(f"cannot read its parameter types ({type(e).__name__}: {e})") from None
    kinds = [p.kind for p in signature.parameters.values()]
    if inspect.Parameter.VAR_KEYWORD in kinds:
        raise wrong("**kwargs is not allowed: every parameter is declared")
    positional = [p for p in signature.parameters.values()
                  if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    any_number = inspect.Parameter.VAR_POSITIONAL in kinds
    if any_number:
        least = max(2, len(positional) + 1)
        if min_models is not None and min_models < least:
            raise wrong(f"min_models={min_models} is below the {least} its signature needs")
        least = min_models or least
    elif min_models is not None:
        raise wrong("min_models is for methods taking *models; the signature fixes the count")
    elif not positional:
        raise wrong("takes no models (positional parameters)")

    params: dict[str, Param] = {}
    for p in signature.parameters.values():
        if p.kind is not inspect.Parameter.KEYWORD_ONLY or p.name in ENGINE_SUPPLIED:
            continue
        declared = param_type(hints.get(p.name))
        if declared is None:
            raise wrong(f"parameter {p.name!r} needs a type: float, int or Annotated[..., a merge.parameters spec]")
        if p.default is inspect.Parameter.empty:
            raise wrong(f"parameter {p.name!r} needs a default")
        problem = declared.problem(p.default, 0)
        if problem:
            raise wrong(f"the default of {p.name!r} {problem}")
        params[p.name] = Param(p.name, declared, p.default)
    if ("statistics" in signature.parameters) != (statistics is not None):
        raise wrong("a `statistics` function and a `statistics` keyword parameter go together")
    if stored_loop is not None and (statistics is None or not elementwise):
        raise wrong("a `stored_loop` is for elementwise methods with `statistics`")
    return MergeMethod(name, fn, needs_base=bool(positional) and positional[0].name == "base",
                       min_models=least if any_number else len(positional),
                       max_models=None if any_number else len(positional), random="seed" in signature.parameters,
                       params=params, elementwise=elementwise, statistics=statistics, constraint=constraint,
                       peers=peers, stored_loop=stored_loop)


def merge_method(name: str, *, elementwise: bool = False,
                 statistics: Callable[[Sequence[torch.Tensor], Mapping[str, Any]], Any] | None = None,
                 constraint: Callable[[Mapping[str, Any]], str | None] | None = None,
                 min_models: int | None = None, peers: str = "",
                 stored_loop: StoredLoop | None = None,
                 ) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """Register `fn` as the merge method `name` (its signature declares it: module doc). Returns
    `fn` wrapped to check the model count and the parameters of a direct call."""

    def register(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        method = _declare(name, fn, elementwise, statistics, constraint, min_models, peers, stored_loop)
        METHODS[name] = method

        @functools.wraps(fn)
        def checked(*models: torch.Tensor, **params: Any) -> torch.Tensor:
            method.check_model_count(len(models))
            method.check_params({k: v for k, v in params.items() if k not in ENGINE_SUPPLIED}, len(models))
            return fn(*models, **params)

        return checked

    return register


def get_method(name: str) -> MergeMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise LineageError(f"unknown merge method {name!r}; known: {', '.join(sorted(METHODS))}") from None


# ---------------------------------------------------------------------------------------------
# Helpers shared by the methods

# Elements per slice in `_elementwise`: the slice's temporaries stay in the CPU cache, where a
# full-size temporary would cost a fresh allocation (page faults) and a trip to memory per operation.
# The merge engine feeds elementwise methods pieces of this size, which pass through unsliced.
SLICE_ELEMENTS = 1 << 18
SMALLEST_FLOAT = 2.0 ** -149  # the smallest positive fp32 (subnormal)


def _elementwise(fn: Callable[..., torch.Tensor], *tensors: torch.Tensor) -> torch.Tensor:
    """fn(*tensors) for an elementwise fn, computed slice by slice on the CPU (same result, faster)."""
    if not tensors[0].is_cpu or tensors[0].numel() <= SLICE_ELEMENTS:
        return fn(*tensors)
    out = torch.empty(tensors[0].shape, dtype=torch.float32)
    flat_out = out.view(-1)
    flats = [t.reshape(-1) for t in tensors]
    for start in range(0, flat_out.numel(), SLICE_ELEMENTS):
        flat_out[start:start + SLICE_ELEMENTS] = fn(*(f[start:start + SLICE_ELEMENTS] for f in flats))
    return out


def use_cpu_loops(*tensors: torch.Tensor) -> bool:
    """True when the compiled loops of merge/cpu_loops.py take these tensors (fp32, on the CPU); the
    torch code is then the reference the tests hold them to."""
    return all(t.is_cpu and t.dtype == torch.float32 for t in tensors)


def _weights(weights: Sequence[float] | None, count: int) -> list[float]:
    """The (checked) per-model weights as floats; None means 1 for each of `count` models."""
    return [1.0] * count if weights is None else [float(w) for w in weights]


def _deltas(base: torch.Tensor, models: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [m - base for m in models]


def _dot_and_norms(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """x·y and ‖x‖·‖y‖ of two flat tensors."""
    return torch.dot(x, y).item(), torch.linalg.vector_norm(x).item() * torch.linalg.vector_norm(y).item()


def _cosine(x: torch.Tensor, y: torch.Tensor) -> float | None:
    """Cosine of the angle between two flattened tensors, over the entries finite in both (rule 2 of
    the module doc); None when either is zero there (no angle)."""
    x, y = x.reshape(-1), y.reshape(-1)
    dot, norms = _dot_and_norms(x, y)
    if not math.isfinite(dot) or not math.isfinite(norms):  # a non-finite entry: leave those out
        finite = torch.isfinite(x).logical_and_(torch.isfinite(y))
        dot, norms = _dot_and_norms(torch.where(finite, x, 0.0), torch.where(finite, y, 0.0))
    if norms == 0 or not math.isfinite(dot / norms):
        return None
    return max(-1.0, min(1.0, dot / norms))


def _share_count(share: float, numel: int) -> int:
    """`share` of `numel` entries as a count, rounded half up."""
    return math.floor(share * numel + 0.5)


def _kept_count(share: float, numel: int) -> int:
    """How many of `numel` entries a keep-rate selects: rounded, but at least one when share > 0 (a
    small tensor is never emptied by rounding) and at most all of them."""
    return 0 if share == 0 else min(numel, max(1, _share_count(share, numel)))


def _flat(inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [x.reshape(-1) for x in inputs]


def _ranked_magnitudes(delta: torch.Tensor) -> torch.Tensor:
    """|delta| as DELLA ranks it: non-finite entries as ranking.NON_FINITE (below every finite magnitude)."""
    return delta.abs().nan_to_num_(nan=ranking.NON_FINITE, posinf=ranking.NON_FINITE)


# Selecting entries with fp32 0/1 masks: torch.where and masked_fill with a bool mask cost ~20x
# more per entry on the CPU. A product leaks a dropped NaN or Inf (NaN·0 = NaN), which the helpers
# below rule out.

def _trim(delta: torch.Tensor, threshold: float) -> torch.Tensor:
    """delta with the entries below `threshold` in magnitude, and the non-finite ones, set to 0."""
    # hardshrink zeroes |x| <= lambd in one pass (abs, compare and multiply would be three); with
    # lambd the fp32 just below the threshold it keeps exactly |x| >= threshold. The threshold is
    # the magnitude of an fp32 entry (or +inf, or 0: keep every finite entry).
    below = float(np.nextafter(np.float32(threshold), np.float32(0))) if threshold > 0 else -1.0
    trimmed = torch.nn.functional.hardshrink(delta, below) if below >= 0 else delta.clone()
    # A non-finite entry is never kept (it takes no rank, module doc). One sum tells whether any is
    # left (kept values come from stored weights: their sum does not overflow fp32 in practice, and
    # if it does, zeroing non-finite entries of a finite tensor changes nothing).
    if not bool(torch.isfinite(trimmed.sum())):
        trimmed.nan_to_num_(0.0, 0.0, 0.0)
    return trimmed


def _band(delta: torch.Tensor, lower: float, upper: float) -> torch.Tensor:
    """delta with the entries whose magnitude is outside [lower, upper), and the non-finite ones, set
    to 0 (in place)."""
    magnitude = delta.abs()
    at_least_lower = magnitude.clone().ge_(lower)
    return delta.mul_(at_least_lower.mul_(magnitude.lt_(upper))).nan_to_num_(0.0, 0.0, 0.0)


def _masked(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """values (in place) where the fp32 0/1 `keep` is 1, exactly 0 where it is 0: a dropped NaN or Inf
    included, a kept one left as it is."""
    if bool(torch.isfinite(values.sum())):  # the common case: a product is exact
        return values.mul_(keep)
    return torch.where(keep > 0, values, 0.0)


def _elect_and_fuse(base: torch.Tensor, deltas: Sequence[torch.Tensor], weights: Sequence[float],
                    alpha: float) -> torch.Tensor:
    """base + alpha · TIES' sign election and disjoint mean over sparsified deltas (dropped entries
    are 0; the deltas are consumed): s = sign(Σ wᵢδᵢ); the mean is Σ wᵢδᵢ / Σ wᵢ over the δᵢ whose
    sign is s; 0 where none agrees, NaN where the election itself is NaN (a kept NaN, or +Inf
    against −Inf)."""
    elected = deltas[0] * weights[0]
    for delta, w in zip(deltas[1:], weights[1:]):
        elected.add_(delta, alpha=w)
    agreeing_sum = torch.zeros_like(elected)
    agreeing_weight = torch.zeros_like(elected)
    for delta, w in zip(deltas, weights):
        agrees = (delta * elected).gt_(0)  # same sign as the elected one, and not dropped
        agreeing_sum.addcmul_(delta, agrees, value=w)  # a kept NaN or ±Inf makes the election NaN, and this sum
        agreeing_weight.add_(agrees, alpha=w)
    # Where none agrees the sum is 0 (NaN after a NaN election): dividing by the smallest float keeps
    # that, where 0/0 would make every such entry NaN.
    return torch.addcdiv(base, agreeing_sum, agreeing_weight.clamp_(min=SMALLEST_FLOAT), value=alpha)


def _dare_masks(base: torch.Tensor, model_count: int, seed: int, density: float) -> list[torch.Tensor]:
    """DARE's keep masks: model i keeps an entry with probability `density`, from RNG stream i (1-based)."""
    return [rng.keep_mask(seed, stream, base.shape, density, base.device) for stream in range(1, model_count + 1)]


def _dare_deltas(base: torch.Tensor, models: Sequence[torch.Tensor], masks: Sequence[torch.Tensor],
                 density: float) -> list[torch.Tensor]:
    """Each τᵢ with its masked-out entries set to 0 (NaN included) and the kept ones rescaled by
    1/density, so that its expectation is τᵢ."""
    return [_masked(delta, mask).div_(density) for delta, mask in zip(_deltas(base, models), masks)]


# ---------------------------------------------------------------------------------------------
# Two models


@merge_method("weighted_sum", elementwise=True,
              peers="A1111 and sd-mecha use the same alpha; ComfyUI's ratio is the weight of model 1 "
                    "(alpha = 1 − ratio).")
def weighted_sum(a: torch.Tensor, b: torch.Tensor, *, alpha: Finite = 0.5) -> torch.Tensor:
    """(1 - alpha)·A + alpha·B. `alpha` is the weight of the second model B, as in A1111/supermerger
    (ComfyUI's ratio is the weight of the first model: alpha = 1 - ratio)."""
    if kernels.use_kernels(a, b):
        return kernels.linear_combination((a, b), (1 - alpha, alpha))
    return torch.lerp(a, b, alpha)


@merge_method("add_difference", elementwise=True)
def add_difference(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, *, alpha: Finite = 1.0) -> torch.Tensor:
    """A + alpha·(B - C): add what B learned over C to A (A1111's "Add difference", alpha = multiplier)."""
    if kernels.use_kernels(a, b, c):
        return kernels.linear_combination((a, b, c), (1.0, alpha, -alpha))
    return torch.sub(b, c).mul_(alpha).add_(a)  # one full-size allocation instead of three


@merge_method("train_difference", elementwise=True)
def train_difference(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, *, alpha: Finite = 1.0) -> torch.Tensor:
    """supermerger's "Train Difference": A + 1.8·alpha·(B − C)·|B − A| / (|B − C| + |B − A|), 0 where
    both distances are 0. Like add difference, but each entry of B − C is scaled by how far B is from
    A relative to how far it moved from C, so A keeps what it already shares with B (1.8 is
    supermerger's constant: alpha = 1 adds at most 1.8× the difference)."""

    def on_slice(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        learned = b - c
        distance_to_a = (b - a).abs_()
        share = distance_to_a / learned.abs().add_(distance_to_a)
        # 0/0 where both distances are 0. (A NaN share from a non-finite input multiplies a non-finite
        # B − C or is added to a non-finite A: the entry stays non-finite.)
        return learned.mul_(share.nan_to_num_(nan=0.0)).mul_(1.8 * alpha).add_(a)

    return _elementwise(on_slice, a, b, c)


@merge_method("slerp", peers="sd-mecha interpolates the directions on the unit sphere and rescales the result to "
                             "lerp(‖A‖, ‖B‖, alpha); we (as mergekit) apply the spherical weights to A and B "
                             "themselves, so the norms follow the arc. sd-mecha falls back to the lerp only when "
                             "the formula gives NaN, we (as mergekit) when |cos θ| > 0.9995.")
def slerp(a: torch.Tensor, b: torch.Tensor, *, alpha: Share = 0.5) -> torch.Tensor:
    """Spherical interpolation of the flattened tensors: A·sin((1−alpha)θ)/sin θ + B·sin(alpha·θ)/sin θ,
    θ the angle between A and B (over their finite entries). `alpha` is the weight of B, as in
    weighted_sum (0 gives A, 1 gives B). Falls back to the weighted sum when |cos θ| > 0.9995 (nearly
    parallel: the formula is unstable) or when either tensor is zero (no angle)."""
    cos = _cosine(a, b)
    if cos is None or abs(cos) > 0.9995:
        return weighted_sum(a, b, alpha=alpha)
    theta = math.acos(cos)
    return torch.add(a * (math.sin((1 - alpha) * theta) / math.sin(theta)), b,
                     alpha=math.sin(alpha * theta) / math.sin(theta))


# ---------------------------------------------------------------------------------------------
# Any number of models


def _weights_do_not_cancel(params: Mapping[str, Any]) -> str | None:
    weights = params["weights"]
    return f"the weights sum to 0: {list(weights)}" if weights is not None and sum(weights) == 0 else None


@merge_method("linear", elementwise=True, constraint=_weights_do_not_cancel)
def linear(*models: torch.Tensor, weights: Weights = None) -> torch.Tensor:
    """Weighted average of N models: Σ wᵢθᵢ / Σ wᵢ. `weights` (one per model, None: equal) are
    normalised by their sum, so [1, 1, 2] and [0.25, 0.25, 0.5] mean the same (mergekit's "linear"
    with normalize: true; for two models, weights [1 − alpha, alpha] is weighted_sum)."""
    w = _weights(weights, len(models))
    total = sum(w)
    coefficients = [x / total for x in w]
    if kernels.use_kernels(*models):
        return kernels.linear_combination(models, coefficients)
    out = models[0] * coefficients[0]
    for model, c in zip(models[1:], coefficients[1:]):
        out.add_(model, alpha=c)
    return out


def _gram_matrix(points: Sequence[torch.Tensor]) -> torch.Tensor:
    """Gram matrix (fp64) of the points taken relative to the first one, accumulated slice by slice,
    over the entries finite in every point."""
    flats = _flat(points)
    gram = torch.zeros(len(points), len(points), dtype=torch.float64, device=flats[0].device)
    for start in range(0, flats[0].numel(), SLICE_ELEMENTS):
        origin = flats[0][start:start + SLICE_ELEMENTS]
        rows = torch.stack([f[start:start + SLICE_ELEMENTS] - origin for f in flats]).double()
        if not torch.isfinite(rows.sum()):  # leave out the entries not finite in every point
            rows = torch.where(torch.isfinite(rows).all(dim=0), rows, 0.0)
        gram += rows @ rows.T
    return gram


def _median_model(gram: np.ndarray, w: np.ndarray, eps: float) -> int | None:
    """The model that is the weighted geometric median, if one is, from the Gram matrix of the models:
    θₖ is the median when the weighted pull of the others, ‖Σᵢ wᵢ(θᵢ − θₖ)/‖θᵢ − θₖ‖‖ over the models
    farther than `eps`, is at most the weight at θₖ (its own and that of the models within `eps`)
    (Kuhn's optimality condition at a data point)."""
    for k in range(len(w)):
        # <θᵢ − θₖ, θⱼ − θₖ> for all i, j; its diagonal holds the squared distances to θₖ
        relative = gram - gram[k][None, :] - gram[:, k][:, None] + gram[k, k]
        distances = np.sqrt(np.maximum(relative.diagonal(), 0.0))
        apart = distances > eps
        pull = np.where(apart, w / np.maximum(distances, eps), 0.0)
        if np.sqrt(max(pull @ relative @ pull, 0.0)) <= w[~apart].sum():
            return k
    return None


@merge_method("geometric_median", min_models=3,
              peers="sd-mecha stops after 100 steps on a relative change of the objective; we iterate on the "
                    "models' shares of the median, up to max_iter.")
def geometric_median(*models: torch.Tensor, weights: PositiveWeights = None, eps: Positive = 1e-6,
                     max_iter: Count = 1000, tol: NonNegative = 1e-9) -> torch.Tensor:
    """The point minimising Σ wᵢ·‖x − θᵢ‖ over the flattened tensors (robust to an outlier model),
    by Weiszfeld's iteration from the weighted mean. `weights` (positive, None: equal) weight the
    distances; `eps` is the smallest distance used (so an iterate on a model stays finite); stops
    after `max_iter` steps or when no model's share of the median changes by more than `tol`. When
    a model is itself the median (say two of three models are equal on this tensor, as fine-tunes
    often are on the text encoders), that model is the result at once: Weiszfeld's iteration only
    creeps towards such a point."""
    w = np.array(_weights(weights, len(models)), dtype=np.float64)
    # Every iterate is Σ cᵢθᵢ with Σ cᵢ = 1, and its distances to the models follow from the Gram
    # matrix, so the iteration runs on the N coefficients and the tensors are combined once at the end.
    # In numpy: a step is a dozen operations on N numbers, which numpy does ~10 times faster than torch
    # (and a step may run a thousand times per tensor).
    gram = _gram_matrix(models).cpu().numpy()
    vertex = _median_model(gram, w, eps)
    if vertex is not None:
        return linear(*models, weights=[float(i == vertex) for i in range(len(models))])
    shares = w / w.sum()
    for _ in range(max_iter):
        gram_shares = gram @ shares
        squared_distances = gram.diagonal() - 2 * gram_shares + shares @ gram_shares
        inverse_distances = w / np.maximum(np.sqrt(np.maximum(squared_distances, 0.0)), eps)
        previous, shares = shares, inverse_distances / inverse_distances.sum()
        if np.abs(shares - previous).max() <= tol:
            break
    return linear(*models, weights=shares.tolist())


# ---------------------------------------------------------------------------------------------
# Over a base: b + alpha·(a merge of the task vectors τᵢ = θᵢ − b)


@merge_method("task_arithmetic", elementwise=True)
def task_arithmetic(base: torch.Tensor, *models: torch.Tensor, weights: Weights = None,
                    alpha: Finite = 1.0) -> torch.Tensor:
    """b + alpha·Σ wᵢτᵢ (Ilharco 2023). `weights` (None: all 1) are not normalised: two fine-tunes
    with weights 1 add both their deltas in full; a negative weight subtracts a model's delta.
    With one model and weight 1 it is weighted_sum(b, θ, alpha)."""
    w = _weights(weights, len(models))
    if kernels.use_kernels(base, *models):
        return kernels.linear_combination((base, *models), (1 - alpha * sum(w), *(alpha * x for x in w)))

    def on_slice(base: torch.Tensor, *models: torch.Tensor) -> torch.Tensor:
        out = base.clone()
        for model, wi in zip(models, w):
            out.add_(model - base, alpha=alpha * wi)
        return out

    return _elementwise(on_slice, base, *models)


def _ties_stored(out: torch.Tensor, inputs: Sequence[torch.Tensor], params: Mapping[str, Any]) -> list[int]:
    """`ties` from the stored inputs straight into `out`, given the thresholds (MergeMethod.stored_loop)."""
    from . import cpu_loops  # imports numba: only when a TIES merge runs

    base, *models = inputs
    return cpu_loops.ties_into(out, base, models, params["statistics"], _weights(params["weights"], len(models)),
                               params["alpha"])


def _ties_thresholds(inputs: Sequence[torch.Tensor], params: Mapping[str, Any]) -> list[float]:
    """TIES' statistics: each model's top-magnitude threshold, from the base (first) and the models'
    whole flat tensors."""
    base, *models = _flat(inputs)
    density = params["density"]
    found = ranking.kth_largest_magnitudes(base, models, lambda n: [_kept_count(density, n)],
                                           sampled=params["threshold"] == "sampled")
    return [thresholds[0] for thresholds in found]


@merge_method("ties", elementwise=True, statistics=_ties_thresholds, stored_loop=_ties_stored,
              peers="Count rule: we keep round(density·n) entries of each τ (at least one, plus any tied with the "
                    "smallest kept); sd-mecha's k keeps n − int((1 − k)·n) + 1 (one more), mergekit int(density·n). "
                    "Signs: we elect sign(Σ wᵢτᵢ) by mass as the paper does; sd-mecha by default by count of "
                    "signs (vote_sgn=false); mergekit by mass, but gives + where the sum is exactly 0. Our "
                    "thresholds are exact order statistics (threshold='sampled' estimates them).")
def ties(base: torch.Tensor, *models: torch.Tensor, weights: PositiveWeights = None, density: Share = 0.2,
         alpha: Finite = 1.0, threshold: Threshold = "exact",
         statistics: Sequence[float] | None = None) -> torch.Tensor:
    """TIES-merging (Yadav 2023): trim each τᵢ to its `density` share of largest-|τᵢ| entries (a
    keep-rate; at least one entry; ties with the smallest kept magnitude are kept too), elect the
    sign s = sign(Σ wᵢτᵢ) over the kept entries, then average the kept entries whose sign is s,
    weighted: Σ wᵢτᵢ / Σ wᵢ over them (the disjoint mean: weights only matter relative to each
    other, like mergekit's normalize: true). Result b + alpha·that. `threshold`: "exact" ranks every
    entry (the default, on every tensor size); "sampled" takes each cut from 262,144 spread entries
    of larger tensors (faster, ~0.4% of the kept entries differ)."""
    w = _weights(weights, len(models))
    thresholds = statistics if statistics is not None else _ties_thresholds(
        (base, *models), {"density": density, "threshold": threshold})
    if kernels.use_kernels(base, *models):
        return kernels.ties(base, models, thresholds, w, alpha)
    if use_cpu_loops(base, *models):
        from . import cpu_loops  # imports numba: only when a TIES merge runs

        return cpu_loops.ties(base, models, thresholds, w, alpha)

    def on_slice(base: torch.Tensor, *models: torch.Tensor) -> torch.Tensor:
        trimmed = [_trim(model - base, t) for model, t in zip(models, thresholds)]
        return _elect_and_fuse(base, trimmed, w, alpha)

    return _elementwise(on_slice, base, *models)


DARE_PEERS = ("density is the share kept: sd-mecha's dropout probability is 1 − density. Kept entries are rescaled "
              "by 1/density as in the paper (mergekit's rescale matches the L1 norm instead). sd-mecha draws the "
              "same mask for every same-shaped key; we seed each key apart.")


@merge_method("dare_linear", peers=DARE_PEERS)
def dare_linear(base: torch.Tensor, *models: torch.Tensor, weights: Weights = None,
                density: KeepRate = 0.5, alpha: Finite = 1.0, seed: int) -> torch.Tensor:
    """DARE (Yu 2023) then task arithmetic: keep each entry of τᵢ with probability `density` (a
    keep-rate; independent masks per model and per tensor, from `seed`), rescale the kept ones by
    1/density so the expected delta is unchanged, result b + alpha·Σ wᵢτ̂ᵢ (weights not normalised).
    mergekit rescales to match the L1 norm instead; sd-mecha's "probability" is 1 − density."""
    w = _weights(weights, len(models))
    if kernels.use_kernels(base, *models):
        return kernels.dare(base, models, seed, w, density, alpha, elect_sign=False)
    masks = _dare_masks(base, len(models), seed, density)

    def on_slice(base: torch.Tensor, *models_then_masks: torch.Tensor) -> torch.Tensor:
        models, masks = models_then_masks[:len(w)], models_then_masks[len(w):]
        out = base.clone()
        for delta, wi in zip(_dare_deltas(base, models, masks, density), w):
            out.add_(delta, alpha=alpha * wi)
        return out

    return _elementwise(on_slice, base, *models, *masks)


@merge_method("dare_ties", peers=DARE_PEERS + " Signs are elected by mass, as in ties.")
def dare_ties(base: torch.Tensor, *models: torch.Tensor, weights: PositiveWeights = None,
              density: KeepRate = 0.5, alpha: Finite = 1.0, seed: int) -> torch.Tensor:
    """DARE's random drop and 1/density rescale (as dare_linear: `density` is the keep-rate), then
    TIES' sign election and disjoint mean over the kept entries (as ties: positive weights, only
    relative). Result b + alpha·that."""
    w = _weights(weights, len(models))
    if kernels.use_kernels(base, *models):
        return kernels.dare(base, models, seed, w, density, alpha, elect_sign=True)
    masks = _dare_masks(base, len(models), seed, density)

    def on_slice(base: torch.Tensor, *models_then_masks: torch.Tensor) -> torch.Tensor:
        models, masks = models_then_masks[:len(w)], models_then_masks[len(w):]
        return _elect_and_fuse(base, _dare_deltas(base, models, masks, density), w, alpha)

    return _elementwise(on_slice, base, *models, *masks)


def _della_deltas(base: torch.Tensor, models: Sequence[torch.Tensor], seed: int, density: float,
                  epsilon: float) -> list[torch.Tensor]:
    """DELLA's MagPrune: per row (the first dimension; a 0/1-d tensor is one row), the entry of rank r
    (0 = smallest |τ| of n; non-finite ones rank lowest) is kept with probability
    density − epsilon + 2·epsilon·(r + ½)/n and rescaled by 1/that probability. Ties in |τ| are
    ranked by position."""
    pruned = []
    for stream, delta in enumerate(_deltas(base, models), start=1):
        rows = delta.flatten(1) if delta.dim() >= 2 else delta.reshape(1, -1)
        n = rows.shape[1]
        order = _ranked_magnitudes(rows).argsort(dim=1, stable=True)
        ranks = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=delta.device).expand_as(order))
        keep_probability = (ranks.float() + 0.5).mul_(2 * epsilon / max(n, 1)).add_(density - epsilon)
        keep = rng.keep_mask(seed, stream, rows.shape, keep_probability, delta.device)
        pruned.append(_masked(rows, keep).div_(keep_probability).reshape(delta.shape))
    return pruned


def _epsilon_within_density(params: Mapping[str, Any]) -> str | None:
    density, epsilon = params["density"], params["epsilon"]
    if epsilon > min(density, 1 - density):
        return (f"epsilon must be in [0, min(density, 1 - density)] = [0, {min(density, 1 - density)}], "
                f"got {epsilon}")
    return None


@merge_method("della", constraint=_epsilon_within_density,
              peers="sd-mecha's della_eps ranks |τ| over the whole tensor, spreads the keep probability over "
                    "±eps/2 and rescales every kept entry by the same 1/(1 − probability), which biases the "
                    "delta; we (as the paper) rank within each row, spread it over ±epsilon and rescale each "
                    "entry by 1/its own probability. mergekit ranks per row but rescales to the L1 norm.")
def della(base: torch.Tensor, *models: torch.Tensor, weights: PositiveWeights = None, density: KeepRate = 0.5,
          epsilon: Share = 0.1, alpha: Finite = 1.0, seed: int) -> torch.Tensor:
    """DELLA (Deep 2024): like dare_ties, but within each row (output channel) the keep probability
    rises linearly with the rank of |τ|, from density − epsilon for the smallest to density + epsilon
    for the largest (mean `density`, a keep-rate), and each kept entry is rescaled by 1/its own
    probability; then sign election and disjoint mean (positive weights, only relative), b + alpha·that.
    Needs 0 <= epsilon <= min(density, 1 − density) (mergekit's epsilon means the same ±)."""
    w = _weights(weights, len(models))
    return _elect_and_fuse(base, _della_deltas(base, models, seed, density, epsilon), w, alpha)


def _breadcrumbs_counts(density: float, gamma: float) -> Callable[[int], list[int]]:
    """For n ranked entries: the count whose magnitude is the band's lower end (the dropped outliers
    plus the kept ones), and the count of dropped outliers (the upper end)."""
    def counts(n: int) -> list[int]:
        dropped_on_top = _share_count(gamma, n)
        kept = min(_kept_count(density, n), n - dropped_on_top)
        return [dropped_on_top + kept, dropped_on_top]
    return counts


def _breadcrumbs_bands(inputs: Sequence[torch.Tensor], params: Mapping[str, Any]) -> list[tuple[float, float]]:
    """Breadcrumbs' statistics: each model's kept band [lower, upper) of |τ|, from the base (first)
    and the models' whole flat tensors."""
    base, *models = _flat(inputs)
    found = ranking.kth_largest_magnitudes(base, models, _breadcrumbs_counts(params["density"], params["gamma"]),
                                           sampled=params["threshold"] == "sampled")
    return [(lower, upper) for lower, upper in found]


def _shares_fit(params: Mapping[str, Any]) -> str | None:
    if params["density"] + params["gamma"] > 1:
        return f"density + gamma must be at most 1, got {params['density']} + {params['gamma']}"
    return None


@merge_method("breadcrumbs", elementwise=True, statistics=_breadcrumbs_bands, constraint=_shares_fit,
              peers="mergekit's version drops every entry of a tensor with fewer than 1/gamma entries; we keep "
                    "at least one. Our cuts are exact order statistics (threshold='sampled' estimates them).")
def breadcrumbs(base: torch.Tensor, *models: torch.Tensor, weights: Weights = None,
                density: Share = 0.9, gamma: Share = 0.01, alpha: Finite = 1.0, threshold: Threshold = "exact",
                statistics: Sequence[tuple[float, float]] | None = None) -> torch.Tensor:
    """Model Breadcrumbs (Davari 2023): in each τᵢ drop the `gamma` share of largest-|τ| entries (the
    outliers) and keep the next `density` share (a keep-rate: the smallest 1 − gamma − density are
    dropped), then b + alpha·Σ wᵢτ̂ᵢ (weights not normalised). Shares are rounded to entry counts,
    at least one entry kept, so tiny tensors keep their entries (mergekit drops every entry of a
    tensor under 1/gamma entries). Ties at the upper cut are dropped, at the lower cut kept.
    `threshold` is "exact" or "sampled", as for ties."""
    w = _weights(weights, len(models))
    bands = statistics if statistics is not None else _breadcrumbs_bands(
        (base, *models), {"density": density, "gamma": gamma, "threshold": threshold})

    def on_slice(base: torch.Tensor, *models: torch.Tensor) -> torch.Tensor:
        out = base.clone()
        for delta, (lower, upper), wi in zip(_deltas(base, models), bands, w):
            out.add_(_band(delta, lower, upper), alpha=alpha * wi)
        return out

    return _elementwise(on_slice, base, *models)


@merge_method("model_stock", min_models=3,
              peers="sd-mecha takes one cosine per row (output channel) and only between consecutive models; "
                    "we take one per tensor, the mean over every pair.")
def model_stock(base: torch.Tensor, *models: torch.Tensor) -> torch.Tensor:
    """Model Stock (Jang 2024): t·avg + (1 − t)·b with avg the mean of the k fine-tunes and
    t = k·cos θ / (1 + (k − 1)·cos θ), cos θ the mean of the pairwise cosines between their τᵢ
    (over the entries finite in both, clipped to [0, 1]; a zero τ counts as orthogonal). No
    parameters: t comes from the weights themselves."""
    deltas = _deltas(base, models)
    cosines = [_cosine(x, y) for i, x in enumerate(deltas) for y in deltas[i + 1:]]
    cos = min(1.0, max(0.0, sum(c or 0.0 for c in cosines) / len(cosines)))
    k = len(models)
    t = k * cos / (1 + (k - 1) * cos)
    return torch.lerp(base, linear(*models), t)
