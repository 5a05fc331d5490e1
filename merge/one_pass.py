"""TIES in one pass over the inputs on the CPU: the exact thresholds are found while merging
(docs/merging.md, "One pass").

The statistics path reads every input twice: a pass to rank the magnitudes (ranking.py), then a pass
to merge with the thresholds found. Here one pass does both. Ranking's sample puts each model's
threshold in a bracket [lo, hi] of magnitudes. An entry whose |τⱼ| lies outside model j's bracket is
trimmed the same way whatever the exact threshold in it is (kept above, dropped below), so where
that holds for every model the pass merges the entry at once. The entries inside some bracket (a few
percent) are merged provisionally and noted, and their magnitudes are counted in ranking's
histograms. After the pass the histograms give the exact thresholds, and the noted entries are
merged again with them: the result is the statistics path's, entry for entry.

When the counts show that a bracket missed, or that its histogram needs a second pass (both rare),
`ties` says so and the engine takes the statistics path, which merges every entry anew.

This module imports numba (through cpu_loops): merge/methods.py imports it when a TIES merge runs.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch

from . import cpu_loops, ranking


def ties(stored: Sequence[torch.Tensor], blocks: Iterable[tuple[int, torch.Tensor]], out: torch.Tensor,
         count: int, weights: Sequence[float], alpha: float) -> bool:
    """TIES of the base and models `stored` (whole flat CPU tensors as stored, the base first), each
    model trimmed to its `count` largest |τ|, into the flat tensor `out` (any float dtype). `blocks`
    yields (start, block) with block[i] the fp32 entries [start, start + block.shape[1]) of input i,
    in order. False when the exact thresholds need another pass (then `out` is partly written and
    the caller merges again by the statistics path); also, without reading any block, for tensors
    small enough that ranking ranks them whole."""
    base, *models = stored
    numel = base.numel()
    if numel <= ranking.SAMPLE_SIZE or count == 0:
        return False
    searches = [ranking.bracketed_search(sample, numel, count) for sample in ranking.magnitude_samples(base, models)]
    counters = ranking.counters(searches)
    lows_bits, highs_bits, shifts, above, counts, lowest, highest = counters
    lows, highs = (np.array([ranking.pattern_value(p) for p in bits], dtype=np.float32)
                   for bits in (lows_bits, highs_bits))
    w = np.asarray(weights, dtype=np.float32)
    merged = magnitudes = np.empty(0, dtype=np.float32)  # buffers for a block, reused by the next ones
    inside = np.empty(0, dtype=np.uint8)
    noted: list[np.ndarray] = []
    for start, block in blocks:
        size = block.shape[1]
        if size > merged.size:
            merged, magnitudes = np.empty(size, np.float32), np.empty(size, np.float32)
            inside = np.empty(size, np.uint8)
        rows = [row.numpy() for row in block]
        b, ms = rows[0], tuple(rows[1:])
        cpu_loops.ties_bracketed(b, ms, lows, highs, w, alpha, merged[:size], inside[:size], above)
        here = np.flatnonzero(inside[:size])
        cpu_loops.count_noted(b, ms, here, lows_bits, highs_bits, shifts, counts, lowest, highest, magnitudes)
        out[start:start + size].copy_(torch.from_numpy(merged[:size]))
        noted.append(here + start)
    ranking.record(searches, counters)
    thresholds = [search.outcome() for search in searches]
    if not all(isinstance(t, float) for t in thresholds):
        return False
    at = torch.from_numpy(np.concatenate(noted))
    base_at, *models_at = (x.index_select(0, at).float() for x in stored)
    fixed = cpu_loops.ties(base_at, models_at, thresholds, weights, alpha)
    out.index_copy_(0, at, fixed.to(out.dtype))
    return True
