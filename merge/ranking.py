"""Order statistics of task-vector magnitudes |θ − b| over whole tensors (TIES' top-k threshold,
breadcrumbs' band), exact by default and cheap on every tensor size.

`kth_largest_magnitudes(base, models, counts_for)` gives, for each model, the c-th largest |θ − b|
for each count c that `counts_for(n)` asks for, n being the number of entries ranked. The inputs
are flat tensors as stored (memory-mapped fp16 views, say): the exact pass reads float16, bfloat16 and
float32 as they are, so no fp32 copy of a large tensor is made.

Exact selection (the default) on a tensor larger than the sample:
1. a spread sample (`bracket_sample_size(n)` entries) gives, for each wanted rank, a bracket
   [lo, hi] of magnitudes that holds the answer unless the sample is off by more than
   BRACKET_SIGMAS standard deviations of a binomial count (on 13M entries, a bracket around the 20%
   rank holds ~1.5% of them);
2. one pass over the whole tensor, every model at once (merge/cpu_loops.py: count_magnitudes,
   compiled), counts the entries above hi and makes a histogram of the float32 bit patterns of those
   inside the bracket. For floats >= 0 the patterns, read as integers, are in the order of the
   values, so with one bin per pattern the histogram holds every distinct value in the bracket with
   its count: walking it down from the top finds the answer exactly, with no entry collected and
   nothing sorted. A bracket holding more than MAX_BINS patterns gets bins of 2, 4, … patterns; each
   of those also keeps the lowest and highest pattern seen, so a bin holding one value (the rule for
   differences of fp16 or bf16 weights, whose values are far apart as patterns) still gives the
   answer, and only a bin holding several takes a second pass;
3. when the counts show that the answer lies outside the bracket (never a guess), the pass is
   repeated with a bracket FALLBACK_WIDENING times wider and then, if needed, with every entry: the
   result is always the exact order statistic.
A tensor of at most SAMPLE_SIZE entries is ranked directly. `sampled=True` instead takes the order
statistic of a SAMPLE_SIZE-entry sample itself (the ranks scaled to its size): faster, but the kept
share is ~0.2% off the requested one, and ~0.4% of TIES' kept entries differ from exact ones.

Non-finite magnitudes (an input entry that is NaN or ±Inf) rank below every finite one: they never
take one of the top c places. When fewer than c entries are finite, the c-th largest is 0.0, so
that `|τ| >= it` keeps every finite entry.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from lineage.lazy import LazyModule, torch

np = LazyModule("numpy")

SAMPLE_SIZE = 1 << 18  # entries of the `sampled` estimate; tensors up to this size are always ranked whole
MIN_BRACKET_SAMPLE = 1 << 12
RUN = 16  # consecutive entries per sampled spot: one cache line of fp16, not 16 scattered ones
BRACKET_SIGMAS = 5.0  # half-width of a bracket, in standard deviations of the sample's rank count
FALLBACK_WIDENING = 4.0  # a missed bracket is retried this many times wider, then over every entry
NON_FINITE = -1.0  # what a NaN or ±Inf magnitude is ranked as: below every finite magnitude
MAX_BINS = 1 << 19  # of a bracket's histogram (4 MiB of counts): fp16/bf16 differences fall one value to a bin
GROUP_BITS = 9  # the bins are also counted in groups of 512 (a 4 KiB page of counts): finding the answer reads
#   the group totals and then only the group that holds it, not every bin
FLOAT32_MAX = 3.4028234663852886e38  # float32's largest finite value


def bracket_sample_size(numel: int) -> int:
    """Sample entries for the brackets of an exact selection over `numel` entries: ~73,000 for 13M.
    Ranking the sample costs ~10 ns per sample entry. The bracket's share of the entries shrinks as
    1/sqrt(sample); a narrow one keeps the pass's walk over the entries inside it short and the
    histogram within MAX_BINS bins of one float32 value each (so one pass finds the answer)."""
    size = int((1.5 * numel) ** (2 / 3)) // RUN * RUN
    return max(MIN_BRACKET_SAMPLE, min(SAMPLE_SIZE, size))


@functools.lru_cache(maxsize=128)
def _sample_run_starts(numel: int, size: int) -> torch.Tensor:
    """Where the size // RUN runs of RUN consecutive entries spread over [0, numel) begin:
    one run per equal stratum, at an offset inside it from the golden-ratio sequence, so no row or
    column period of the tensor lines up. (Runs rather than single entries: the sample is read from
    memory-mapped fp16, where every scattered entry costs a cache miss.)"""
    runs = size // RUN
    stratum = numel / runs  # >= RUN: only larger tensors are sampled
    j = torch.arange(runs, dtype=torch.float64)
    offset_in_stratum = torch.frac(j * ((math.sqrt(5) - 1) / 2)) * (stratum - RUN)
    return (j * stratum + offset_in_stratum).long()  # each run ends inside its own stratum


def sample_entries(flat: torch.Tensor, size: int = SAMPLE_SIZE) -> torch.Tensor:
    """`size` entries (a multiple of RUN) spread over a flat tensor, in its dtype; a tensor no
    larger is returned whole."""
    if flat.numel() <= size:
        return flat
    # The runs are rows of the overlapping-windows view: gathering rows copies RUN entries at a time.
    windows = flat.unfold(0, RUN, 1)
    return windows.index_select(0, _sample_run_starts(flat.numel(), size).to(flat.device)).reshape(-1)


def _magnitudes(base: torch.Tensor, model: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """|model − base| in fp32 (into `out` if given), non-finite entries as NON_FINITE."""
    if out is None:
        out = model.to(torch.float32, copy=True)
    else:
        out.copy_(model)
    return out.sub_(base).abs_().nan_to_num_(nan=NON_FINITE, posinf=NON_FINITE)


def _kth_largest(values: np.ndarray, count: int) -> float:
    """The count-th largest of `values` (1 <= count <= values.size), by introselect."""
    rank = values.size - count  # its index in ascending order
    return float(np.partition(values, rank)[rank])


def _largest_at(values: np.ndarray, count: int) -> float:
    """The count-th largest magnitude of ranked `values` with the module's conventions: +inf for
    count 0 (nothing is at least that), 0.0 when fewer than `count` are finite."""
    if count == 0:
        return math.inf
    answer = _kth_largest(values, min(count, values.size))
    return 0.0 if count > values.size or answer < 0 else answer


@dataclass
class _Search:
    """The search for the `count`-th largest magnitude among those whose float32 bit patterns lie in
    [low, high], counted in bins of 2**shift patterns (at most MAX_BINS bins)."""

    count: int
    low: int
    high: int
    shift: int = field(init=False)
    above: int = 0  # magnitudes seen whose pattern is larger than high
    counts: np.ndarray | None = None  # magnitudes seen per bin, from low up
    groups: np.ndarray | None = None  # and per group of 2**GROUP_BITS bins
    lowest: np.ndarray | None = None  # the lowest and highest pattern seen in each bin
    highest: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.shift = max(0, (self.high - self.low).bit_length() - MAX_BINS.bit_length() + 1)

    @property
    def bins(self) -> int:
        return ((self.high - self.low) >> self.shift) + 1

    def outcome(self) -> float | _Search | None:
        """After a pass: the order statistic; or, when the bin that holds it holds other values too,
        the search within that bin; or None when the counts show it lies outside [low, high]."""
        assert self.counts is not None and self.groups is not None
        assert self.lowest is not None and self.highest is not None
        place = self.count - self.above  # its place from the top among the magnitudes in the bracket
        if place <= 0:
            return None  # above high
        groups = self.groups[::-1]  # from the top
        from_top = np.cumsum(groups)
        if place > from_top[-1]:
            return 0.0 if self.low == 0 else None  # fewer than `count` finite magnitudes; or below low
        g = int(np.searchsorted(from_top, place))  # the group that holds it, from the top
        place -= int(from_top[g] - groups[g])  # its place from the top of that group
        first = (groups.size - 1 - g) << GROUP_BITS  # the group's first bin
        group = self.counts[first:first + (1 << GROUP_BITS)]
        filled = np.flatnonzero(group)[::-1]  # the group's bins anything fell in, from the top
        b = first + int(filled[np.searchsorted(np.cumsum(group[filled]), place)])
        if self.shift == 0:  # bins of one pattern (count_magnitudes keeps no lowest and highest for them)
            return _value(self.low + b)
        if self.lowest[b] == self.highest[b]:  # one value in the bin
            return _value(int(self.highest[b]))
        return _Search(self.count, int(self.lowest[b]), int(self.highest[b]))


def _value(pattern: int) -> float:
    """The float32 whose bit pattern is `pattern` (>= 0)."""
    return float(np.int32(pattern).view(np.float32))


def _pattern(magnitude: float) -> int:
    """The float32 bit pattern of a magnitude >= 0, as an integer (+inf: the largest finite one's)."""
    return int(np.float32(min(magnitude, FLOAT32_MAX)).view(np.int32))


def _search(sample: np.ndarray, numel: int, count: int, sigmas: float) -> _Search:
    """A search for the count-th largest of `numel` magnitudes within a bracket around the sample's
    corresponding order statistic, `sigmas` binomial standard deviations wide (inf: every entry)."""
    if math.isinf(sigmas):
        return _Search(count, 0, _pattern(math.inf))
    size = sample.size
    share = count / numel
    expected = share * size  # the answer's place from the top of the sample
    margin = sigmas * math.sqrt(size * share * (1 - share)) + 1
    upper_place = math.floor(expected - margin)  # places from the top; < 1: no upper bound
    lower_place = math.ceil(expected + margin)  # > size: no lower bound
    indices = [size - p for p in (upper_place, lower_place) if 1 <= p <= size]  # ascending-order indices
    ordered = np.partition(sample, indices) if indices else sample
    hi = max(0.0, float(ordered[size - upper_place])) if upper_place >= 1 else math.inf
    lo = max(0.0, float(ordered[size - lower_place])) if lower_place <= size else 0.0
    return _Search(count, _pattern(lo), _pattern(hi))


def _scan(base: torch.Tensor, models: Sequence[torch.Tensor], searches: Sequence[Sequence[_Search]]) -> None:
    """One pass over the inputs as stored, counting each model's magnitudes for its searches."""
    from . import cpu_loops  # imports numba: only when an exact selection runs

    flat = [(j, search) for j, model_searches in enumerate(searches) for search in model_searches]
    model_of = np.array([j for j, _ in flat], dtype=np.int64)
    lows, highs, shifts = (np.array([getattr(s, name) for _, s in flat], dtype=np.int64)
                           for name in ("low", "high", "shift"))
    above = np.zeros(len(flat), dtype=np.int64)
    bins = max(s.bins for _, s in flat)
    counts = np.zeros((len(flat), bins), dtype=np.int64)
    groups = np.zeros((len(flat), ((bins - 1) >> GROUP_BITS) + 1), dtype=np.int64)
    # Only counts need zeroing: a bin's lowest and highest are set by its first magnitude. (In a merge
    # freed memory is kept for reuse, so zeroing clears every page rather than mapping fresh ones.)
    lowest, highest = np.empty(counts.shape, dtype=np.int32), np.empty(counts.shape, dtype=np.int32)
    cpu_loops.count_magnitudes(cpu_loops.stored_bits(base), cpu_loops.stored_models(models), model_of,
                               lows, highs, shifts, above, counts, groups, lowest, highest)
    for k, (_, search) in enumerate(flat):
        in_search = slice(0, search.bins)
        search.above = int(above[k])
        search.counts, search.lowest, search.highest = counts[k, in_search], lowest[k, in_search], highest[k, in_search]
        search.groups = groups[k, :((search.bins - 1) >> GROUP_BITS) + 1]


def kth_largest_magnitudes(base: torch.Tensor, models: Sequence[torch.Tensor],
                           counts_for: Callable[[int], Sequence[int]], sampled: bool = False) -> list[list[float]]:
    """For each model, the c-th largest |model − base| for each count c in `counts_for(n)`, n the
    number of entries ranked (every entry; the sample's size if `sampled`). Flat tensors of one
    size, any float dtype. See the module doc for the conventions (count 0: +inf; non-finite
    magnitudes rank last)."""
    numel = base.numel()
    if sampled or numel <= SAMPLE_SIZE or not base.is_cpu:
        ranked = sample_entries(base) if sampled else base
        counts = list(counts_for(ranked.numel()))
        results = []
        for model in models:
            magnitudes = _magnitudes(ranked, sample_entries(model) if sampled else model).cpu().numpy()
            results.append([_largest_at(magnitudes, c) for c in counts])
        return results

    counts = list(counts_for(numel))
    size = bracket_sample_size(numel)
    base_sample = sample_entries(base, size).float()
    samples = [_magnitudes(base_sample, sample_entries(m, size)).numpy() for m in models]
    results: list[list[float | None]] = [[math.inf if c == 0 else None for c in counts] for _ in models]
    for sigmas in (BRACKET_SIGMAS, BRACKET_SIGMAS * FALLBACK_WIDENING, math.inf):
        pending = [[(j, _search(sample, numel, c, sigmas)) for j, c in enumerate(counts) if row[j] is None]
                   for sample, row in zip(samples, results)]
        while any(pending):  # a search over bins wider than a pattern goes on in the bin that holds the answer
            _scan(base, models, [[s for _, s in row] for row in pending])
            narrower: list[list[tuple[int, _Search]]] = [[] for _ in models]
            for row, model_pending, refined in zip(results, pending, narrower):
                for j, search in model_pending:
                    outcome = search.outcome()
                    if isinstance(outcome, _Search):
                        refined.append((j, outcome))
                    else:
                        row[j] = outcome  # None: missed, for the next, wider bracket
            pending = narrower
    assert all(v is not None for row in results for v in row)  # the bracket over every entry cannot miss
    return [[float(v) for v in row] for row in results]  # type: ignore[arg-type]
