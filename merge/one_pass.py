"""TIES in one pass over the inputs on the CPU: the exact thresholds are found while merging
(docs/merging.md, "One pass").

The statistics path reads every input twice: a pass to rank the magnitudes (ranking.py), then a pass
to merge with the thresholds found. Here one pass does both. Ranking's sample puts each model's
threshold in a bracket [lo, hi] of magnitudes. An entry whose |τⱼ| lies outside model j's bracket is
trimmed the same way whatever the exact threshold in it is (kept above, dropped below), so where
that holds for every model the pass merges the entry at once. The entries inside some bracket (a few
percent) are merged provisionally and noted, and the pass counts each model's entries above its
bracket. After the pass, model j's exact threshold is the (count − above j)-th largest |τj| among the
noted entries (all of its entries inside its bracket are among them), a small selection; the noted
entries are then merged again with the exact thresholds: the result is the statistics path's, entry
for entry.

When the counts show that a bracket missed (rare), `ties` says so and the engine takes the
statistics path, which merges every entry anew.

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
    in order. False when a bracket missed (then `out` is partly written and the caller merges again
    by the statistics path); also, without reading any block, for tensors small enough that ranking
    ranks them whole."""
    base, *models = stored
    numel = base.numel()
    if numel <= ranking.SAMPLE_SIZE or count == 0:
        return False
    brackets = [ranking.bracket(sample, numel, count) for sample in ranking.magnitude_samples(base, models)]
    lows, highs = (np.array(ends, dtype=np.float32) for ends in zip(*brackets))
    highs = np.minimum(highs, np.finfo(np.float32).max)  # an infinite |τ| is never inside (nor above)
    above = np.zeros(len(models), dtype=np.int64)
    w = np.asarray(weights, dtype=np.float32)
    merged = np.empty(0, dtype=np.float32)  # buffers for a block, reused by the next ones
    inside = np.empty(0, dtype=np.uint8)
    noted: list[np.ndarray] = []  # the noted entries' indices, and their values (input by input) while in cache
    values: list[np.ndarray] = []
    for start, block in blocks:
        size = block.shape[1]
        if size > merged.size:
            merged, inside = np.empty(size, np.float32), np.empty(size, np.uint8)
        rows = block.numpy()
        cpu_loops.ties_bracketed(rows[0], tuple(rows[1:]), lows, highs, w, alpha, merged[:size], inside[:size], above)
        out[start:start + size].copy_(torch.from_numpy(merged[:size]))
        here = np.flatnonzero(inside[:size].view(np.bool_))  # (far faster on bools than on bytes)
        noted.append(here + start)
        values.append(rows[:, here])
    # Every entry inside model j's bracket is noted: its threshold is the (count − above j)-th largest
    # of those entries' |τj|.
    at = torch.from_numpy(np.concatenate(noted))
    base_at, *models_at = torch.from_numpy(np.concatenate(values, axis=1))
    thresholds = []
    for model_at, lo, hi, larger in zip(models_at, lows, highs, above):
        magnitudes = (model_at - base_at).abs_().numpy()
        in_bracket = magnitudes[(magnitudes >= lo) & (magnitudes <= hi)]
        place = count - int(larger)  # the threshold's place from the top among them
        if 1 <= place <= in_bracket.size:
            thresholds.append(float(np.partition(in_bracket, in_bracket.size - place)[in_bracket.size - place]))
        elif place > in_bracket.size and lo == 0:
            thresholds.append(0.0)  # fewer than `count` finite magnitudes: every finite one is kept
        else:
            return False  # the threshold lies above or below the bracket
    fixed = cpu_loops.ties(base_at, models_at, thresholds, weights, alpha)
    out.index_copy_(0, at, fixed.to(out.dtype))
    return True
