"""Order statistics of task-vector magnitudes |θ − b| over whole tensors (TIES' top-k threshold,
breadcrumbs' band), exact by default and cheap on every tensor size.

`kth_largest_magnitudes(base, models, counts_for)` gives, for each model, the c-th largest |θ − b|
for each count c that `counts_for(n)` asks for, n being the number of entries ranked. The inputs
are flat tensors as stored (memory-mapped fp16 views, say): they are converted to fp32 a chunk at a
time through reused buffers, so no full fp32 copy of a large tensor is made.

Exact selection (the default) on a tensor larger than the sample:
1. a spread sample (`bracket_sample_size(n)` entries: larger samples give narrower brackets but
   cost more to rank) gives, for each wanted rank, a bracket [lo, hi] of magnitudes that holds the
   answer unless the sample is off by more than BRACKET_SIGMAS standard deviations of a binomial
   count (on 13M entries, a bracket around the 20% rank holds ~1% of them);
2. one pass over the whole tensor counts the entries above hi and collects those inside the
   bracket (a small share);
3. a selection among the collected entries finishes. When the answer lies outside the bracket (the
   counts say so, never a guess), the pass is repeated with a bracket FALLBACK_WIDENING times wider
   and then, if needed, with every entry: the result is always the exact order statistic.
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
CHUNK = 1 << 18  # entries converted to fp32 at a time in the exact pass (1 MiB per buffer: stays in cache)
BRACKET_SIGMAS = 5.0  # half-width of a bracket, in standard deviations of the sample's rank count
FALLBACK_WIDENING = 4.0  # a missed bracket is retried this many times wider, then over every entry
NON_FINITE = -1.0  # what a NaN or ±Inf magnitude is ranked as: below every finite magnitude


def bracket_sample_size(numel: int) -> int:
    """Sample entries for the brackets of an exact selection over `numel` entries. Ranking the sample
    costs ~10 ns per sample entry, and each entry inside a bracket ~15 ns (collected, then
    selected); the bracket's share of the entries shrinks as 1/sqrt(sample), so the total is
    lowest near (3·numel)^(2/3) entries: ~115,000 for 13M."""
    size = int((3 * numel) ** (2 / 3)) // RUN * RUN
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


class _Scratch:
    """Buffers one pass reuses for every chunk (fresh ones would be page-faulted in each time)."""

    def __init__(self) -> None:
        self.base = torch.empty(CHUNK, dtype=torch.float32)
        self.magnitudes = torch.empty(CHUNK, dtype=torch.float32)
        self.masks = [np.empty(CHUNK, dtype=bool) for _ in range(3)]


def _count(out: np.ndarray, compare: Callable[..., np.ndarray], magnitudes: np.ndarray, value: float) -> int:
    """How many `magnitudes` compare true with `value`; the mask is left in `out`."""
    return int(np.count_nonzero(compare(magnitudes, value, out=out)))


@dataclass
class _Bracket:
    """The search for one order statistic, the `count`-th largest, within magnitudes [lo, hi].
    Entries in the bracket are collected, except those equal to lo, which are only counted. When
    the sample shows that the ends are shared by more entries than lie between them (`count_ends`:
    stored bf16 or fp16 weights give differences of few distinct values), entries equal to hi are
    counted too, and only those strictly inside are collected."""

    count: int
    lo: float
    hi: float
    count_ends: bool = False
    above: int = 0  # entries seen that are larger than hi
    at_hi: int = 0  # entries seen equal to hi, when counted (else they are in `inside`)
    at_lo: int = 0  # entries seen equal to lo (when lo < hi)
    inside: list[np.ndarray] = field(default_factory=list)  # entries seen in (lo, hi), or (lo, hi]

    def scan(self, magnitudes: np.ndarray, scratch: _Scratch) -> None:
        above, second, third = (m[:magnitudes.size] for m in scratch.masks)
        self.above += _count(above, np.greater, magnitudes, self.hi)
        if not self.count_ends:
            np.greater_equal(magnitudes, self.lo, out=second)
            np.greater(second, above, out=second)  # in [lo, hi]: at least lo and not above hi
            # A small share. (Gathering by index beats a boolean mask on a sparse one: the mask's
            # scattered hits cost a branch miss each.)
            in_bracket = magnitudes[np.flatnonzero(second)]
            at_lo = in_bracket == self.lo
            self.at_lo += int(np.count_nonzero(at_lo))
            self.inside.append(in_bracket[~at_lo])
            return
        self.at_hi += _count(second, np.greater_equal, magnitudes, self.hi) - int(np.count_nonzero(above))
        if self.lo == self.hi:
            return
        self.at_lo += _count(above, np.greater_equal, magnitudes, self.lo)
        self.at_lo -= _count(third, np.greater, magnitudes, self.lo)
        np.greater(third, second, out=third)  # in (lo, hi): above lo and below hi
        self.inside.append(magnitudes[np.flatnonzero(third)])

    def answer(self) -> float | None:
        """The order statistic, or None when the counts show that it lies outside the bracket."""
        place = self.count - self.above  # its place from the top among the entries in [lo, hi]
        if place <= 0:
            return None  # above hi
        if place <= self.at_hi:
            return self.hi
        place -= self.at_hi
        inside = np.concatenate(self.inside) if self.inside else np.empty(0, np.float32)
        if place <= inside.size:
            return _kth_largest(inside, place)
        if place <= inside.size + self.at_lo:
            return self.lo
        return 0.0 if self.lo <= 0 else None  # below lo; or fewer finite entries than `count`


def _bracket(sample: np.ndarray, numel: int, count: int, sigmas: float) -> _Bracket:
    """A bracket around the count-th largest of `numel` entries, from a sample of their magnitudes."""
    if math.isinf(sigmas):
        return _Bracket(count, 0.0, math.inf)
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
    at_ends = int(np.count_nonzero(sample == lo)) + (int(np.count_nonzero(sample == hi)) if hi > lo else 0)
    between = int(np.count_nonzero((sample > lo) & (sample < hi)))
    return _Bracket(count, lo, hi, count_ends=at_ends > between)


def _scan(base: torch.Tensor, models: Sequence[torch.Tensor], brackets: Sequence[Sequence[_Bracket]]) -> None:
    """One pass over the inputs, chunk by chunk, feeding each model's magnitudes to its brackets."""
    scratch = _Scratch()
    numel = base.numel()
    for start in range(0, numel, CHUNK):
        count = min(CHUNK, numel - start)
        b = scratch.base[:count]
        b.copy_(base[start:start + count])
        for model, model_brackets in zip(models, brackets):
            if model_brackets:
                magnitudes = _magnitudes(b, model[start:start + count], scratch.magnitudes[:count]).numpy()
                for bracket in model_brackets:
                    bracket.scan(magnitudes, scratch)


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
        pending = [[(j, _bracket(sample, numel, c, sigmas)) for j, c in enumerate(counts) if row[j] is None]
                   for sample, row in zip(samples, results)]
        if not any(pending):
            break
        _scan(base, models, [[b for _, b in row] for row in pending])
        for row, model_pending in zip(results, pending):
            for j, bracket in model_pending:
                row[j] = bracket.answer()
    assert all(v is not None for row in results for v in row)  # the bracket over every entry cannot miss
    return [[float(v) for v in row] for row in results]  # type: ignore[arg-type]
