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
- Methods marked `elementwise` compute each output entry from the same entry of the inputs alone
  (no whole-tensor statistic such as a norm or a top-k), so the engine may run them on pieces.
- A method may also declare `statistics`: a cheap per-tensor step, `statistics(inputs, params)`,
  that computes scalars (e.g. TIES' magnitude thresholds) from each input's whole flat tensor as
  stored (any dtype; the engine passes them before converting anything), reading the entries at
  `ranking_positions(numel)` only, and gives the same result on the fp32 inputs. The method takes
  them as its keyword `statistics` (None: it computes them itself); given them, an `elementwise`
  method is elementwise, so the engine computes them once per tensor and then runs it on pieces.

Shared parameter names (b = base, θᵢ = the other models, τᵢ = θᵢ − b, the task vectors):
- `alpha`: for two-model methods the weight of the second model B (A1111's convention); for methods
  over a base the multiplier λ of the merged delta (mergekit's `lambda`).
- `weights`: one float per model after the base (None: all 1).
- `density`: the share of each τᵢ's entries that is KEPT (a keep-rate: sd-mecha's dropout
  "probability" is the share dropped, 1 − density).

Register a new one from a script:

    from lineage.merge.methods import merge_method

    @merge_method("my_average", min_models=2)
    def my_average(*models, weights=None): ...
"""
from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from lineage.errors import LineageError

from . import kernels, rng


@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: Callable[..., torch.Tensor]
    needs_base: bool  # the first input is the base the others are fine-tunes of
    min_models: int  # counting the base
    max_models: int | None
    random: bool  # takes a per-tensor `seed`
    defaults: dict[str, Any] = field(default_factory=dict)  # keyword parameters and their defaults
    elementwise: bool = False  # each output entry depends only on the same entry of the inputs (and the statistics)
    # Per-tensor scalars from the inputs' whole flat tensors as stored, passed to fn as `statistics` (module doc).
    statistics: Callable[[Sequence[torch.Tensor], Mapping[str, Any]], Any] | None = None

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
                 random: bool = False, elementwise: bool = False,
                 statistics: Callable[[Sequence[torch.Tensor], Mapping[str, Any]], Any] | None = None,
                 ) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """Register `fn` as the merge method `name`; its keyword-only parameters are the method's parameters
    (except `seed` and `statistics`, which the engine supplies)."""

    def register(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        sig = inspect.signature(fn)
        defaults = {p.name: p.default for p in sig.parameters.values()
                    if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in ("seed", "statistics")}
        METHODS[name] = MergeMethod(name, fn, needs_base, min_models, max_models, random, defaults, elementwise,
                                    statistics)
        return fn

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

# Magnitude thresholds (TIES, breadcrumbs) are exact order statistics up to this many entries; larger
# tensors take them from this many evenly spread entries (a full selection on 13M entries costs
# ~0.3 s, the sample ~5 ms; the kept share is then within ~0.2% of the requested one).
EXACT_RANK_LIMIT = 1 << 18


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


def _model_weights(method: str, weights: Sequence[float] | None, count: int, positive: bool = False) -> list[float]:
    """The per-model weights as floats, one per model (after the base), checked."""
    if weights is None:
        return [1.0] * count
    values = [float(w) for w in weights]
    if len(values) != count:
        raise LineageError(f"merge method {method!r}: {len(values)} weights given for {count} models")
    if positive and any(w <= 0 for w in values):
        raise LineageError(f"merge method {method!r}: weights must be positive (they weight a mean), got {values}")
    return values


def _check_fraction(method: str, name: str, value: float, *, allow_zero: bool = True) -> None:
    if not (0 <= value <= 1) or (value == 0 and not allow_zero):
        interval = "[0, 1]" if allow_zero else "(0, 1]"
        raise LineageError(f"merge method {method!r}: {name} must be in {interval}, got {value}")


def _deltas(base: torch.Tensor, models: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [m - base for m in models]


def _cosine(x: torch.Tensor, y: torch.Tensor) -> float | None:
    """Cosine of the angle between two flattened tensors; None when either is zero."""
    norms = torch.linalg.vector_norm(x).item() * torch.linalg.vector_norm(y).item()
    if norms == 0:
        return None
    return max(-1.0, min(1.0, torch.dot(x.reshape(-1), y.reshape(-1)).item() / norms))


RANKING_RUN = 16  # consecutive entries per sampled spot: one cache line of fp16, not 16 scattered ones


@functools.lru_cache(maxsize=64)
def _sample_run_starts(numel: int) -> torch.Tensor:
    """Where the EXACT_RANK_LIMIT // RANKING_RUN runs of RANKING_RUN consecutive entries spread over
    [0, numel) begin: one run per equal stratum, at an offset inside it from the golden-ratio
    sequence, so no row or column period of the tensor lines up. (Runs rather than single entries:
    the sample is read from memory-mapped fp16, where every scattered entry costs a cache miss.)"""
    runs = EXACT_RANK_LIMIT // RANKING_RUN
    stratum = numel / runs  # >= RANKING_RUN: only larger tensors are sampled
    j = torch.arange(runs, dtype=torch.float64)
    offset_in_stratum = torch.frac(j * ((math.sqrt(5) - 1) / 2)) * (stratum - RANKING_RUN)
    return (j * stratum + offset_in_stratum).long()  # each run ends inside its own stratum


def ranking_positions(numel: int) -> torch.Tensor | None:
    """The flat positions magnitude statistics rank, in increasing order: None (every entry) up to
    EXACT_RANK_LIMIT entries, else EXACT_RANK_LIMIT evenly spread ones. A tensor of ranking entries
    is at most EXACT_RANK_LIMIT long, so taking them again returns them unchanged."""
    if numel <= EXACT_RANK_LIMIT:
        return None
    return (_sample_run_starts(numel)[:, None] + torch.arange(RANKING_RUN)).reshape(-1)


def ranking_entries(x: torch.Tensor) -> torch.Tensor:
    """x flattened, at `ranking_positions` (in x's dtype)."""
    flat = x.reshape(-1)
    if flat.numel() <= EXACT_RANK_LIMIT:
        return flat
    # The runs are rows of the overlapping-windows view: gathering rows copies RANKING_RUN entries at a time.
    windows = flat.unfold(0, RANKING_RUN, 1)
    return windows.index_select(0, _sample_run_starts(flat.numel()).to(flat.device)).reshape(-1)


def _delta_magnitudes_for_ranking(base: torch.Tensor, model: torch.Tensor) -> torch.Tensor:
    """|model − base| at the ranking positions (every entry for small tensors, a sample above)."""
    return (ranking_entries(model).float() - ranking_entries(base).float()).abs_()


def _kth_largest(values: torch.Tensor, count: int) -> float:
    """The count-th largest value (count >= 1); +inf for count 0, so `x >= it` selects nothing."""
    if count == 0:
        return math.inf
    rank = values.numel() - count  # its index in ascending order
    if values.is_cpu:  # numpy's introselect finds the same order statistic about 3x faster than torch.kthvalue
        return float(np.partition(values.numpy(), rank)[rank])
    return torch.kthvalue(values, rank + 1).values.item()


def _share_count(share: float, numel: int) -> int:
    """`share` of `numel` entries as a count, rounded half up."""
    return math.floor(share * numel + 0.5)


def _kept_count(share: float, numel: int) -> int:
    """How many of `numel` entries a keep-rate selects: rounded, but at least one when share > 0 (a
    small tensor is never emptied by rounding) and at most all of them."""
    return 0 if share == 0 else min(numel, max(1, _share_count(share, numel)))


def _top_magnitude_threshold(base: torch.Tensor, model: torch.Tensor, density: float) -> float:
    """The |τ| at or above which an entry is among the `density` share of largest |τ| (TIES' top-k)."""
    magnitudes = _delta_magnitudes_for_ranking(base, model)
    return _kth_largest(magnitudes, _kept_count(density, magnitudes.numel()))


def _trim(delta: torch.Tensor, threshold: float) -> torch.Tensor:
    """delta with the entries below `threshold` in magnitude set to 0 (in place)."""
    # fp32 0/1 masks: arithmetic mixing bool and float tensors takes a slow path in torch.
    return delta.mul_(delta.abs().ge_(threshold))


def _elect_and_fuse(deltas: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """TIES' sign election and disjoint mean over sparsified deltas (dropped entries are 0):
    s = sign(Σ wᵢδᵢ); the result is Σ wᵢδᵢ / Σ wᵢ over the δᵢ whose sign is s (0 where none)."""
    elected = deltas[0] * weights[0]
    for delta, w in zip(deltas[1:], weights[1:]):
        elected.add_(delta, alpha=w)
    agreeing_sum = torch.zeros_like(elected)
    agreeing_weight = torch.zeros_like(elected)
    for delta, w in zip(deltas, weights):
        agrees = (delta * elected).gt_(0)  # same sign as the elected one, and not dropped
        agreeing_sum.addcmul_(delta, agrees, value=w)
        agreeing_weight.add_(agrees, alpha=w)
    # Where no entry agrees both sums are 0, and 0/0 becomes 0.
    return agreeing_sum.div_(agreeing_weight).nan_to_num_(0.0)


def _band(delta: torch.Tensor, lower: float, upper: float) -> torch.Tensor:
    """delta with the entries whose magnitude is outside [lower, upper) set to 0 (in place)."""
    magnitude = delta.abs()
    at_least_lower = magnitude.clone().ge_(lower)  # fp32 0/1, as in _trim
    return delta.mul_(at_least_lower.mul_(magnitude.lt_(upper)))


def _dare_masks(base: torch.Tensor, model_count: int, seed: int, density: float) -> list[torch.Tensor]:
    """DARE's keep masks: model i keeps an entry with probability `density`, from RNG stream i (1-based)."""
    return [rng.keep_mask(seed, stream, base.shape, density, base.device) for stream in range(1, model_count + 1)]


def _dare_deltas(base: torch.Tensor, models: Sequence[torch.Tensor], masks: Sequence[torch.Tensor],
                 density: float) -> list[torch.Tensor]:
    """Each τᵢ with its masked-out entries set to 0 and the kept ones rescaled by 1/density, so that
    its expectation is τᵢ."""
    return [delta.mul_(mask).div_(density) for delta, mask in zip(_deltas(base, models), masks)]


# ---------------------------------------------------------------------------------------------
# Two models


@merge_method("weighted_sum", min_models=2, max_models=2, elementwise=True)
def weighted_sum(a: torch.Tensor, b: torch.Tensor, *, alpha: float = 0.5) -> torch.Tensor:
    """(1 - alpha)·A + alpha·B. `alpha` is the weight of the second model B, as in A1111/supermerger
    (ComfyUI's ratio is the weight of the first model: alpha = 1 - ratio)."""
    if kernels.use_kernels(a, b):
        return kernels.linear_combination((a, b), (1 - alpha, alpha))
    return torch.lerp(a, b, alpha)


@merge_method("add_difference", min_models=3, max_models=3, elementwise=True)
def add_difference(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, *, alpha: float = 1.0) -> torch.Tensor:
    """A + alpha·(B - C): add what B learned over C to A (A1111's "Add difference", alpha = multiplier)."""
    if kernels.use_kernels(a, b, c):
        return kernels.linear_combination((a, b, c), (1.0, alpha, -alpha))
    return torch.sub(b, c).mul_(alpha).add_(a)  # one full-size allocation instead of three


@merge_method("train_difference", min_models=3, max_models=3, elementwise=True)
def train_difference(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, *, alpha: float = 1.0) -> torch.Tensor:
    """supermerger's "Train Difference": A + 1.8·alpha·(B − C)·|B − A| / (|B − C| + |B − A|), 0 where
    both distances are 0. Like add difference, but each entry of B − C is scaled by how far B is from
    A relative to how far it moved from C, so A keeps what it already shares with B (1.8 is
    supermerger's constant: alpha = 1 adds at most 1.8× the difference)."""

    def on_slice(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        learned = b - c
        distance_to_a = (b - a).abs_()
        share = distance_to_a / learned.abs().add_(distance_to_a)
        return learned.mul_(share.nan_to_num_(0.0)).mul_(1.8 * alpha).add_(a)

    return _elementwise(on_slice, a, b, c)


@merge_method("slerp", min_models=2, max_models=2)
def slerp(a: torch.Tensor, b: torch.Tensor, *, alpha: float = 0.5) -> torch.Tensor:
    """Spherical interpolation of the flattened tensors: A·sin((1−alpha)θ)/sin θ + B·sin(alpha·θ)/sin θ,
    θ the angle between A and B. `alpha` is the weight of B, as in weighted_sum (0 gives A, 1 gives B).
    Falls back to the weighted sum when |cos θ| > 0.9995 (nearly parallel: the formula is unstable)
    or when either tensor is zero (no angle)."""
    cos = _cosine(a, b)
    if cos is None or abs(cos) > 0.9995:
        return weighted_sum(a, b, alpha=alpha)
    theta = math.acos(cos)
    return torch.add(a * (math.sin((1 - alpha) * theta) / math.sin(theta)), b,
                     alpha=math.sin(alpha * theta) / math.sin(theta))


# ---------------------------------------------------------------------------------------------
# Any number of models


@merge_method("linear", min_models=2, elementwise=True)
def linear(*models: torch.Tensor, weights: Sequence[float] | None = None) -> torch.Tensor:
    """Weighted average of N models: Σ wᵢθᵢ / Σ wᵢ. `weights` (one per model, None: equal) are
    normalised by their sum, so [1, 1, 2] and [0.25, 0.25, 0.5] mean the same (mergekit's "linear"
    with normalize: true; for two models, weights [1 − alpha, alpha] is weighted_sum)."""
    w = _model_weights("linear", weights, len(models))
    total = sum(w)
    if total == 0:
        raise LineageError(f"merge method 'linear': the weights sum to 0: {w}")
    coefficients = [x / total for x in w]
    if kernels.use_kernels(*models):
        return kernels.linear_combination(models, coefficients)
    out = models[0] * coefficients[0]
    for model, c in zip(models[1:], coefficients[1:]):
        out.add_(model, alpha=c)
    return out


def _gram_matrix(points: Sequence[torch.Tensor]) -> torch.Tensor:
    """Gram matrix (fp64) of the points taken relative to the first one, accumulated slice by slice."""
    flats = [p.reshape(-1) for p in points]
    gram = torch.zeros(len(points), len(points), dtype=torch.float64, device=flats[0].device)
    for start in range(0, flats[0].numel(), SLICE_ELEMENTS):
        origin = flats[0][start:start + SLICE_ELEMENTS]
        rows = torch.stack([f[start:start + SLICE_ELEMENTS] - origin for f in flats]).double()
        gram += rows @ rows.T
    return gram


@merge_method("geometric_median", min_models=3)
def geometric_median(*models: torch.Tensor, weights: Sequence[float] | None = None, eps: float = 1e-6,
                     max_iter: int = 1000, tol: float = 1e-9) -> torch.Tensor:
    """The point minimising Σ wᵢ·‖x − θᵢ‖ over the flattened tensors (robust to an outlier model),
    by Weiszfeld's iteration from the weighted mean. `weights` (positive, None: equal) weight the
    distances; `eps` is the smallest distance used (so an iterate on a model stays finite); stops
    after `max_iter` steps or when no model's share of the median changes by more than `tol`."""
    w = torch.tensor(_model_weights("geometric_median", weights, len(models), positive=True), dtype=torch.float64)
    # Every iterate is Σ cᵢθᵢ with Σ cᵢ = 1, and its distances to the models follow from the Gram
    # matrix, so the iteration runs on the N coefficients and the tensors are combined once at the end.
    gram = _gram_matrix(models).cpu()
    shares = w / w.sum()
    for _ in range(max_iter):
        gram_shares = gram @ shares
        squared_distances = gram.diagonal() - 2 * gram_shares + shares @ gram_shares
        inverse_distances = w / squared_distances.clamp(min=0).sqrt().clamp(min=eps)
        previous, shares = shares, inverse_distances / inverse_distances.sum()
        if (shares - previous).abs().max() <= tol:
            break
    return linear(*models, weights=shares.tolist())


# ---------------------------------------------------------------------------------------------
# Over a base: b + alpha·(a merge of the task vectors τᵢ = θᵢ − b)


@merge_method("task_arithmetic", needs_base=True, min_models=2, elementwise=True)
def task_arithmetic(base: torch.Tensor, *models: torch.Tensor, weights: Sequence[float] | None = None,
                    alpha: float = 1.0) -> torch.Tensor:
    """b + alpha·Σ wᵢτᵢ (Ilharco 2023). `weights` (None: all 1) are not normalised: two fine-tunes
    with weights 1 add both their deltas in full; a negative weight subtracts a model's delta.
    With one model and weight 1 it is weighted_sum(b, θ, alpha)."""
    w = _model_weights("task_arithmetic", weights, len(models))
    if kernels.use_kernels(base, *models):
        return kernels.linear_combination((base, *models), (1 - alpha * sum(w), *(alpha * x for x in w)))

    def on_slice(base: torch.Tensor, *models: torch.Tensor) -> torch.Tensor:
        out = base.clone()
        for model, wi in zip(models, w):
            out.add_(model - base, alpha=alpha * wi)
        return out

    return _elementwise(on_slice, base, *models)


def _ties_thresholds(inputs: Sequence[torch.Tensor], params: Mapping[str, Any]) -> list[float]:
    """TIES' statistics: each model's top-magnitude threshold, from the base (first) and the models."""
    density = params["density"]
    _check_fraction("ties", "density", density)
    base, *models = inputs
    return [_top_magnitude_threshold(base, m, density) for m in models]


@merge_method("ties", needs_base=True, min_models=2, elementwise=True, statistics=_ties_thresholds)
def ties(base: torch.Tensor, *models: torch.Tensor, weights: Sequence[float] | None = None, density: float = 0.2,
         alpha: float = 1.0, statistics: Sequence[float] | None = None) -> torch.Tensor:
    """TIES-merging (Yadav 2023): trim each τᵢ to its `density` share of largest-|τᵢ| entries (a
    keep-rate; at least one entry; ties with the smallest kept magnitude are kept too), elect the
    sign s = sign(Σ wᵢτᵢ) over the kept entries, then average the kept entries whose sign is s,
    weighted: Σ wᵢτᵢ / Σ wᵢ over them (the disjoint mean: weights only matter relative to each
    other, like mergekit's normalize: true). Result b + alpha·that. The top-k threshold is exact up
    to 262,144 entries and estimated from 262,144 spread entries above that."""
    w = _model_weights("ties", weights, len(models), positive=True)
    thresholds = statistics if statistics is not None else _ties_thresholds((base, *models), {"density": density})
    if kernels.use_kernels(base, *models):
        return kernels.ties(base, models, thresholds, w, alpha)

    def on_slice(base: torch.Tensor, *models: torch.Tensor) -> torch.Tensor:
        trimmed = [_trim(delta, t) for delta, t in zip(_deltas(base, models), thresholds)]
        return _elect_and_fuse(trimmed, w).mul_(alpha).add_(base)

    return _elementwise(on_slice, base, *models)


@merge_method("dare_linear", needs_base=True, min_models=2, random=True)
def dare_linear(base: torch.Tensor, *models: torch.Tensor, weights: Sequence[float] | None = None,
                density: float = 0.5, alpha: float = 1.0, seed: int) -> torch.Tensor:
    """DARE (Yu 2023) then task arithmetic: keep each entry of τᵢ with probability `density` (a
    keep-rate; independent masks per model and per tensor, from `seed`), rescale the kept ones by
    1/density so the expected delta is unchanged, result b + alpha·Σ wᵢτ̂ᵢ (weights not normalised).
    mergekit rescales to match the L1 norm instead; sd-mecha's "probability" is 1 − density."""
    w = _model_weights("dare_linear", weights, len(models))
    _check_fraction("dare_linear", "density", density, allow_zero=False)
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


@merge_method("dare_ties", needs_base=True, min_models=2, random=True)
def dare_ties(base: torch.Tensor, *models: torch.Tensor, weights: Sequence[float] | None = None,
              density: float = 0.5, alpha: float = 1.0, seed: int) -> torch.Tensor:
    """DARE's random drop and 1/density rescale (as dare_linear: `density` is the keep-rate), then
    TIES' sign election and disjoint mean over the kept entries (as ties: positive weights, only
    relative). Result b + alpha·that."""
    w = _model_weights("dare_ties", weights, len(models), positive=True)
    _check_fraction("dare_ties", "density", density, allow_zero=False)
    if kernels.use_kernels(base, *models):
        return kernels.dare(base, models, seed, w, density, alpha, elect_sign=True)
    masks = _dare_masks(base, len(models), seed, density)

    def on_slice(base: torch.Tensor, *models_then_masks: torch.Tensor) -> torch.Tensor:
        models, masks = models_then_masks[:len(w)], models_then_masks[len(w):]
        return _elect_and_fuse(_dare_deltas(base, models, masks, density), w).mul_(alpha).add_(base)

    return _elementwise(on_slice, base, *models, *masks)


def _della_deltas(base: torch.Tensor, models: Sequence[torch.Tensor], seed: int, density: float,
                  epsilon: float) -> list[torch.Tensor]:
    """DELLA's MagPrune: per row (the first dimension; a 0/1-d tensor is one row), the entry of rank r
    (0 = smallest |τ| of n) is kept with probability density − epsilon + 2·epsilon·(r + ½)/n and
    rescaled by 1/that probability. Ties in |τ| are ranked by position."""
    pruned = []
    for stream, delta in enumerate(_deltas(base, models), start=1):
        rows = delta.flatten(1) if delta.dim() >= 2 else delta.reshape(1, -1)
        n = rows.shape[1]
        order = rows.abs().argsort(dim=1, stable=True)
        ranks = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=delta.device).expand_as(order))
        keep_probability = (ranks.float() + 0.5).mul_(2 * epsilon / max(n, 1)).add_(density - epsilon)
        keep = rng.keep_mask(seed, stream, rows.shape, keep_probability, delta.device)
        pruned.append(rows.mul_(keep).div_(keep_probability).reshape(delta.shape))
    return pruned


@merge_method("della", needs_base=True, min_models=2, random=True)
def della(base: torch.Tensor, *models: torch.Tensor, weights: Sequence[float] | None = None, density: float = 0.5,
          epsilon: float = 0.1, alpha: float = 1.0, seed: int) -> torch.Tensor:
    """DELLA (Deep 2024): like dare_ties, but within each row (output channel) the keep probability
    rises linearly with the rank of |τ|, from density − epsilon for the smallest to density + epsilon
    for the largest (mean `density`, a keep-rate), and each kept entry is rescaled by 1/its own
    probability; then sign election and disjoint mean (positive weights, only relative), b + alpha·that.
    Needs 0 <= epsilon <= min(density, 1 − density) (mergekit's epsilon means the same ±)."""
    w = _model_weights("della", weights, len(models), positive=True)
    _check_fraction("della", "density", density, allow_zero=False)
    if not 0 <= epsilon <= min(density, 1 - density):
        raise LineageError(f"merge method 'della': epsilon must be in [0, min(density, 1 - density)] = "
                           f"[0, {min(density, 1 - density)}], got {epsilon}")
    return _elect_and_fuse(_della_deltas(base, models, seed, density, epsilon), w).mul_(alpha).add_(base)


def _breadcrumbs_bands(inputs: Sequence[torch.Tensor], params: Mapping[str, Any]) -> list[tuple[float, float]]:
    """Breadcrumbs' statistics: each model's kept band [lower, upper) of |τ|, from the base (first)
    and the models."""
    density, gamma = params["density"], params["gamma"]
    _check_fraction("breadcrumbs", "density", density)
    _check_fraction("breadcrumbs", "gamma", gamma)
    if density + gamma > 1:
        raise LineageError(f"merge method 'breadcrumbs': density + gamma must be at most 1, got {density} + {gamma}")
    base, *models = inputs
    bands = []
    for model in models:
        magnitudes = _delta_magnitudes_for_ranking(base, model)
        dropped_on_top = _share_count(gamma, magnitudes.numel())
        kept = min(_kept_count(density, magnitudes.numel()), magnitudes.numel() - dropped_on_top)
        bands.append((_kth_largest(magnitudes, dropped_on_top + kept), _kth_largest(magnitudes, dropped_on_top)))
    return bands


@merge_method("breadcrumbs", needs_base=True, min_models=2, elementwise=True, statistics=_breadcrumbs_bands)
def breadcrumbs(base: torch.Tensor, *models: torch.Tensor, weights: Sequence[float] | None = None,
                density: float = 0.9, gamma: float = 0.01, alpha: float = 1.0,
                statistics: Sequence[tuple[float, float]] | None = None) -> torch.Tensor:
    """Model Breadcrumbs (Davari 2023): in each τᵢ drop the `gamma` share of largest-|τ| entries (the
    outliers) and keep the next `density` share (a keep-rate: the smallest 1 − gamma − density are
    dropped), then b + alpha·Σ wᵢτ̂ᵢ (weights not normalised). Shares are rounded to entry counts,
    at least one entry kept, so tiny tensors keep their entries (mergekit drops every entry of a
    tensor under 1/gamma entries). Ties at the upper cut are dropped, at the lower cut kept."""
    w = _model_weights("breadcrumbs", weights, len(models))
    bands = statistics if statistics is not None else _breadcrumbs_bands((base, *models),
                                                                         {"density": density, "gamma": gamma})

    def on_slice(base: torch.Tensor, *models: torch.Tensor) -> torch.Tensor:
        out = base.clone()
        for delta, (lower, upper), wi in zip(_deltas(base, models), bands, w):
            out.add_(_band(delta, lower, upper), alpha=alpha * wi)
        return out

    return _elementwise(on_slice, base, *models)


@merge_method("model_stock", needs_base=True, min_models=3)
def model_stock(base: torch.Tensor, *models: torch.Tensor) -> torch.Tensor:
    """Model Stock (Jang 2024): t·avg + (1 − t)·b with avg the mean of the k fine-tunes and
    t = k·cos θ / (1 + (k − 1)·cos θ), cos θ the mean of the pairwise cosines between their τᵢ
    (clipped to [0, 1]; a zero τ counts as orthogonal). No parameters: t comes from the weights themselves."""
    deltas = _deltas(base, models)
    cosines = [_cosine(x, y) for i, x in enumerate(deltas) for y in deltas[i + 1:]]
    cos = min(1.0, max(0.0, sum(c or 0.0 for c in cosines) / len(cosines)))
    k = len(models)
    t = k * cos / (1 + (k - 1) * cos)
    return torch.lerp(base, linear(*models), t)
