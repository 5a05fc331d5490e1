"""TIES' arithmetic and the exact thresholds' counting pass on the CPU, as compiled loops (numba)
(docs/merging.md, "CPU loops").

TIES on the CPU in torch takes some twenty passes over each chunk (subtract, trim, check, elect,
compare, accumulate, divide); on a full-size SDXL merge that arithmetic, not the disk, set the pace.
`ties` does it in one pass over fp32 chunks: trim each delta at its threshold
(non-finite deltas dropped), elect the sign by weighted mass, write base + alpha · the disjoint mean —
the same rules as `methods.ties`' torch code, which stays the reference (tests compare the two) and
the path for other devices. `count_magnitudes` is the one pass over a tensor that merge/ranking.py's
exact order statistics need: it counts the magnitudes above a bracket and makes a histogram of the
float32 bit patterns inside it.

This module imports numba and numpy, so its users import it where they need it, not at the top
(half a second that commands which never merge should not pay). The loops are compiled on first use
(about a second; cached on disk afterwards) and release the GIL, so the executor's workers run them
side by side. Results match the torch code up to the rounding of the fused multiply-adds torch uses
for `add(alpha=)`, `addcmul` and `addcdiv` (a unit or two in the last place).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numba
import numpy as np
import torch

from . import ranking

SMALLEST_FLOAT = np.float32(2.0 ** -149)  # as methods.SMALLEST_FLOAT: dividing by it keeps an empty sum 0
LARGEST_FLOAT = np.float32(ranking.FLOAT32_MAX)
NON_FINITE = np.float32(ranking.NON_FINITE)  # a NaN or ±Inf magnitude ranks below every finite one


def _jit(function: Any) -> Any:
    """Compiled without the GIL, cached on disk where numba finds a writable place (beside this file or
    in the user's cache); where it finds none, compiled anew in each process rather than failing."""
    try:
        return numba.njit(nogil=True, cache=True)(function)
    except RuntimeError:  # numba: "cannot cache function …: no locator available"
        return numba.njit(nogil=True)(function)


@_jit
def _trimmed(delta: Any, threshold: Any) -> Any:
    """delta if it is finite and its magnitude reaches the threshold, else 0."""
    keep = abs(delta) >= threshold and abs(delta) <= LARGEST_FLOAT
    return delta if keep else np.float32(0.0)


@_jit
def _ties(base: Any, models: Any, thresholds: Any, weights: Any, alpha: Any, out: Any) -> None:
    # One pass: each entry's deltas are trimmed, elected and averaged while in registers. The loops
    # over the models have the tuple's length, known when compiling, so they unroll and the loop over
    # the entries vectorises. Sums run in the models' order, as in the torch code.
    for i in range(base.size):
        elected = np.float32(0.0)
        for j in range(len(models)):
            elected += weights[j] * _trimmed(models[j][i] - base[i], thresholds[j])
        total = np.float32(0.0)
        weight = np.float32(0.0)
        for j in range(len(models)):
            delta = _trimmed(models[j][i] - base[i], thresholds[j])
            agrees = delta * elected > 0
            total += weights[j] * delta if agrees else np.float32(0.0)
            weight += weights[j] if agrees else np.float32(0.0)
        out[i] = base[i] + alpha * (total / max(weight, SMALLEST_FLOAT))


def ties(base: torch.Tensor, models: Sequence[torch.Tensor], thresholds: Sequence[float],
         weights: Sequence[float], alpha: float) -> torch.Tensor:
    """TIES of fp32 CPU tensors of one shape with the given magnitude thresholds (methods.ties' rules),
    as a new fp32 tensor."""
    flat = [t.reshape(-1).numpy() for t in (base, *models)]
    out = torch.empty(base.shape, dtype=torch.float32)
    _ties(flat[0], tuple(flat[1:]), np.asarray(thresholds, dtype=np.float32), np.asarray(weights, dtype=np.float32),
          np.float32(alpha), out.view(-1).numpy())
    return out


BLOCK = 64  # entries whose bracket test is one vectorised loop; only blocks with a hit are walked one by one


@_jit
def count_magnitudes(base: Any, model: Any, lows: Any, highs: Any, shifts: Any, above: Any, counts: Any,
                     lowest: Any, highest: Any, magnitudes: Any) -> None:
    """For each bracket k, of float32 bit patterns [lows[k], highs[k]]: add to above[k] the number of
    magnitudes |model − base| (flat fp32 arrays of one size; NaN and ±Inf magnitudes count as below
    everything) whose pattern is larger than highs[k], and for those inside the bracket, in bin
    b = (pattern − lows[k]) >> shifts[k], count them in counts[k, b] and keep the lowest and highest
    pattern seen in lowest[k, b] and highest[k, b] (set by the bin's first one: their values where
    counts[k, b] is 0 do not matter). `magnitudes` is a scratch array of the inputs' size."""
    # The magnitudes first, then their bit patterns: for floats >= 0 the order of the patterns as
    # integers is the order of the values, and NON_FINITE's is negative. Each loop but the last
    # vectorises; the last visits only the blocks that hold a pattern inside the bracket (some 1%
    # of the patterns, so about half the blocks), where a branch per entry is well predicted.
    for i in range(base.size):
        magnitude = abs(model[i] - base[i])
        magnitudes[i] = magnitude if magnitude <= LARGEST_FLOAT else NON_FINITE
    bits = magnitudes.view(np.int32)
    whole_blocks = bits.size - bits.size % BLOCK
    for k in range(lows.size):
        low, high = np.int32(lows[k]), np.int32(highs[k])
        width = np.uint32(high - low)  # inside: 0 <= pattern − low <= width, one unsigned comparison
        larger = 0
        for i in range(bits.size):
            larger += np.int32(bits[i] > high)
        above[k] += larger
        for start in range(0, whole_blocks, BLOCK):
            hits = np.int32(0)
            for i in range(BLOCK):  # a fixed length: unrolled and vectorised
                hits += np.int32(np.uint32(bits[start + i] - low) <= width)
            if hits:
                _count_inside(bits, start, start + BLOCK, k, lows[k], width, shifts[k], counts, lowest, highest)
        _count_inside(bits, whole_blocks, bits.size, k, lows[k], width, shifts[k], counts, lowest, highest)


@_jit
def _count_inside(bits: Any, start: int, end: int, k: int, low: Any, width: Any, shift: Any, counts: Any,
                  lowest: Any, highest: Any) -> None:
    for i in range(start, end):
        pattern = bits[i]
        if np.uint32(pattern - low) <= width:
            b = (pattern - low) >> shift
            if counts[k, b] == 0:
                lowest[k, b] = highest[k, b] = pattern
            else:
                lowest[k, b] = min(lowest[k, b], pattern)
                highest[k, b] = max(highest[k, b], pattern)
            counts[k, b] += 1

