"""TIES' arithmetic and the exact thresholds' counting pass on the CPU, as compiled loops (numba)
(docs/merging.md, "CPU loops").

TIES on the CPU in torch takes some twenty passes over each chunk (subtract, trim, check, elect,
compare, accumulate, divide), after converting every input to fp32, and one more to convert the
result back; on a full-size SDXL merge that arithmetic, not the disk, set the pace. `ties_into` reads
the inputs as stored (float16, bfloat16 or float32), trims each delta at its threshold (non-finite
deltas dropped), elects the sign by weighted mass and writes base + alpha · the disjoint mean in the
output's dtype, noting which inputs hold a NaN or ±Inf — the same rules as `methods.ties`' torch
code, which stays the reference (tests compare the two) and the path for other devices.
`count_magnitudes` is the one pass over a tensor that merge/ranking.py's exact order statistics
need: it counts the magnitudes above a bracket and makes a histogram of the float32 bit patterns
inside it.

This module imports numba and numpy, so its users import it where they need it, not at the top
(half a second that commands which never merge should not pay). The loops are compiled on first use
(a few seconds; cached on disk afterwards) and release the GIL, so the executor's workers run them
side by side. Results match the torch code up to the rounding of the fused multiply-adds torch uses
for `add(alpha=)`, `addcmul` and `addcdiv` (a unit or two in the last place).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

from . import ranking

SMALLEST_FLOAT = np.float32(2.0 ** -149)  # as methods.SMALLEST_FLOAT: dividing by it keeps an empty sum 0
LARGEST_FLOAT = np.float32(ranking.FLOAT32_MAX)
NON_FINITE = np.float32(ranking.NON_FINITE)  # a NaN or ±Inf magnitude ranks below every finite one
GROUP_BITS = ranking.GROUP_BITS


def _jit(function: Any) -> Any:
    """Compiled without the GIL, cached on disk where numba finds a writable place (beside this file or
    in the user's cache); where it finds none, compiled anew in each process rather than failing."""
    try:
        return numba.njit(nogil=True, cache=True)(function)
    except RuntimeError:  # numba: "cannot cache function …: no locator available"
        return numba.njit(nogil=True)(function)


# ---------------------------------------------------------------------------------------------
# Tensors as stored. The loops read (and write) float16, bfloat16 and float32 tensors as they are, so
# that no fp32 copy of them is made: numpy has no bfloat16, so a tensor is handed to the loops as an
# array of its bits, and the array's integer type says how to read them: uint16 holds float16 bits,
# int16 bfloat16 bits (`stored_bits`). `_float32` reads an entry, `_store` rounds a value back into
# one (to nearest, ties to even, as torch's conversions do).


STORED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
PIECE = 1024  # entries a loop takes at a time: its fp32 scratch arrays stay in the first-level cache


def stored_bits(tensor: torch.Tensor) -> np.ndarray:
    """A contiguous CPU tensor, flat, as the array the compiled loops read and write: its float16 or
    bfloat16 bits (see above) or float32 values, sharing its memory; a tensor of another dtype is
    converted to a float32 copy (to read only)."""
    flat = tensor.reshape(-1)
    if flat.dtype == torch.float16:
        return flat.view(torch.int16).numpy().view(np.uint16)
    if flat.dtype == torch.bfloat16:
        return flat.view(torch.int16).numpy()
    return flat.to(torch.float32).numpy()


def stored_models(models: Sequence[torch.Tensor]) -> tuple[np.ndarray, ...]:
    """Models as `stored_bits` arrays of one type: a loop takes them as a tuple, which numba compiles
    only when its arrays are of one type. Models stored in different dtypes (an fp16 and a bf16
    fine-tune) are therefore read as float32 copies (exact: both widen to float32 without rounding)."""
    arrays = tuple(stored_bits(m) for m in models)
    if len({a.dtype for a in arrays}) > 1:
        arrays = tuple(stored_bits(m.to(torch.float32)) for m in models)
    return arrays


@intrinsic
def _float16_bits_to_float32(typingctx: Any, bits: Any) -> Any:
    """LLVM's own half-to-float conversion: exact, and one instruction for a vector of them (F16C)."""
    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
    return types.float32(types.uint16), codegen


@intrinsic
def _float32_to_float16_bits(typingctx: Any, value: Any) -> Any:
    """LLVM's float-to-half conversion (rounding to nearest even; a vector at a time with F16C)."""
    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))
    return types.uint16(types.float32), codegen


@intrinsic
def _int32_bits_to_float32(typingctx: Any, bits: Any) -> Any:
    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.int32), codegen


@intrinsic
def _float32_to_int32_bits(typingctx: Any, value: Any) -> Any:
    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.bitcast(args[0], ir.IntType(32))
    return types.int32(types.float32), codegen


@intrinsic
def _trailing_zeros(typingctx: Any, word: Any) -> Any:
    """The number of zero bits below the lowest set bit of a nonzero uint64 (one instruction)."""
    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        i64, i1 = ir.IntType(64), ir.IntType(1)
        cttz = builder.module.declare_intrinsic("llvm.cttz", [i64], ir.FunctionType(i64, [i64, i1]))
        return builder.call(cttz, [args[0], ir.Constant(i1, 0)])
    return types.uint64(types.uint64), codegen


def _float32(stored: Any) -> Any:
    """An entry of a `stored_bits` array as float32 (compiled code only)."""
    raise NotImplementedError


@overload(_float32)
def _float32_of(stored):  # no annotations: numba takes them for other argument names
    if stored == types.uint16:
        return lambda stored: _float16_bits_to_float32(stored)
    if stored == types.int16:  # bfloat16 is the upper half of a float32
        return lambda stored: _int32_bits_to_float32(np.int32(np.int32(stored) << 16))
    if stored == types.float32:
        return lambda stored: stored
    return None


def _store(out: Any, i: int, value: Any) -> None:
    """out[i] = a float32 value, rounded to the dtype `out` (a `stored_bits` array) holds (compiled code only)."""
    raise NotImplementedError


@overload(_store)
def _store_into(out, i, value):  # no annotations: numba takes them for other argument names
    def float16(out, i, value):
        out[i] = _float32_to_float16_bits(value)

    def bfloat16(out, i, value):
        out[i] = _bfloat16_bits(value)

    def float32(out, i, value):
        out[i] = value

    return {types.uint16: float16, types.int16: bfloat16, types.float32: float32}.get(out.dtype)


@numba.njit(inline="always")
def _bfloat16_bits(value: Any) -> Any:
    """The upper half of the float32 rounded to nearest even, as torch's CPU conversion of a tensor does
    (which makes every NaN 0xFFFF)."""
    bits = np.uint32(_float32_to_int32_bits(value))
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    return np.int16(-1) if value != value else np.int16(np.uint16(rounded))


# ---------------------------------------------------------------------------------------------
# TIES


@numba.njit(inline="always")
def _trimmed(delta: Any, threshold: Any) -> Any:
    """delta if it is finite and its magnitude reaches the threshold, else 0."""
    keep = (abs(delta) >= threshold) & (abs(delta) <= LARGEST_FLOAT)
    return delta if keep else np.float32(0.0)


@_jit
def _ties(base: Any, models: Any, thresholds: Any, weights: Any, alpha: Any, out: Any, nonfinite: Any) -> None:
    # A piece of PIECE entries at a time, in fp32 scratch arrays that stay in the first-level cache:
    # each loop below runs over the piece's entries from index 0 without a branch, so it vectorises.
    # Each model's trimmed deltas are kept for the second loop over them. Sums run in the models'
    # order, as in the torch code. nonfinite[j] is set to 1 when input j (the base first) holds a NaN
    # or ±Inf.
    scratch = np.empty((4 + len(models), PIECE), dtype=np.float32)
    x, elected, total, weight, deltas = scratch[0], scratch[1], scratch[2], scratch[3], scratch[4:]
    for start in range(0, base.size, PIECE):
        n = min(PIECE, base.size - start)
        piece_base, piece_out = base[start:start + n], out[start:start + n]
        bad = False
        for i in range(n):
            x[i] = _float32(piece_base[i])
            bad |= not (abs(x[i]) <= LARGEST_FLOAT)
            elected[i] = total[i] = weight[i] = 0.0
        nonfinite[0] |= bad
        for j in range(len(models)):
            piece_model, delta, w, t = models[j][start:start + n], deltas[j], weights[j], thresholds[j]
            bad = False
            for i in range(n):
                value = _float32(piece_model[i])
                bad |= not (abs(value) <= LARGEST_FLOAT)
                delta[i] = _trimmed(value - x[i], t)
                elected[i] += w * delta[i]
            nonfinite[j + 1] |= bad
        for j in range(len(models)):
            delta, w = deltas[j], weights[j]
            for i in range(n):
                agrees = delta[i] * elected[i] > 0
                total[i] += w * delta[i] if agrees else np.float32(0.0)
                weight[i] += w if agrees else np.float32(0.0)
        for i in range(n):
            _store(piece_out, i, x[i] + alpha * (total[i] / max(weight[i], SMALLEST_FLOAT)))


def ties_into(out: torch.Tensor, base: torch.Tensor, models: Sequence[torch.Tensor], thresholds: Sequence[float],
              weights: Sequence[float], alpha: float) -> list[int]:
    """TIES (methods.ties' rules, with the given magnitude thresholds) of contiguous CPU tensors of one
    size, each float16, bfloat16 or float32, read as stored, into `out` (one of those dtypes too).
    Returns the positions of the inputs (0 the base) that hold a NaN or ±Inf."""
    if out.dtype not in STORED_DTYPES:  # stored_bits would hand the loop a copy: the result would be lost
        raise ValueError(f"ties_into writes float16, bfloat16 or float32, not {out.dtype}")
    nonfinite = np.zeros(1 + len(models), dtype=np.bool_)
    _ties(stored_bits(base), stored_models(models), np.asarray(thresholds, dtype=np.float32),
          np.asarray(weights, dtype=np.float32), np.float32(alpha), stored_bits(out), nonfinite)
    return np.flatnonzero(nonfinite).tolist()


def ties(base: torch.Tensor, models: Sequence[torch.Tensor], thresholds: Sequence[float],
         weights: Sequence[float], alpha: float) -> torch.Tensor:
    """TIES of fp32 CPU tensors of one shape with the given magnitude thresholds, as a new fp32 tensor."""
    out = torch.empty(base.shape, dtype=torch.float32)
    ties_into(out, base.contiguous(), [m.contiguous() for m in models], thresholds, weights, alpha)
    return out


# ---------------------------------------------------------------------------------------------
# The exact thresholds' pass


WORD = 8  # entries per 8-byte word of the inside-the-bracket mask: only words holding a hit are walked


@_jit
def count_magnitudes(base: Any, models: Any, model_of: Any, lows: Any, highs: Any, shifts: Any, above: Any,
                     counts: Any, groups: Any, lowest: Any, highest: Any) -> None:
    """For each bracket k, of float32 bit patterns [lows[k], highs[k]] over the magnitudes
    |models[model_of[k]] − base| (`base` a flat `stored_bits` array, `models` a tuple of them as
    `stored_models` makes, all of one size; NaN and ±Inf magnitudes count as below everything): add
    to above[k] the number of magnitudes whose pattern is larger than highs[k], and count those
    inside the bracket in bin b = (pattern − lows[k]) >> shifts[k], counts[k, b], and in its group of
    bins, groups[k, b >> GROUP_BITS]. Bins wider than one pattern (shifts[k] > 0) also keep the
    lowest and highest pattern seen in lowest[k, b] and highest[k, b] (set by the bin's first one:
    their values where counts[k, b] is 0 do not matter)."""
    # A piece at a time, every model's magnitudes from one read of the base's piece, then their bit
    # patterns: for floats >= 0 the order of the patterns as integers is the order of the values, and
    # NON_FINITE's is negative. The loops over the piece run over every entry without a branch, so they
    # vectorise; the walk then takes the entries inside the bracket (1–2%) straight from the words
    # of a byte mask, without a test per entry, and counts them inline (a call per entry cost as much
    # as the rest of the pass).
    x = np.empty(PIECE, dtype=np.float32)
    patterns = np.empty((len(models), PIECE), dtype=np.int32)  # of each model's magnitudes
    inside = np.zeros(PIECE, dtype=np.uint8)
    words = inside.view(np.uint64)
    needed = np.zeros(len(models), dtype=np.bool_)
    for k in range(model_of.size):
        needed[model_of[k]] = True
    for start in range(0, base.size, PIECE):
        n = min(PIECE, base.size - start)
        piece_base = base[start:start + n]  # indices from 0 vectorise
        for i in range(n):
            x[i] = _float32(piece_base[i])
        for j in range(len(models)):
            if needed[j]:
                piece_model, row = models[j][start:start + n], patterns[j]
                for i in range(n):
                    magnitude = abs(_float32(piece_model[i]) - x[i])
                    row[i] = _float32_to_int32_bits(magnitude if magnitude <= LARGEST_FLOAT else NON_FINITE)
        for k in range(lows.size):
            bits = patterns[model_of[k]]
            low, high, shift = np.uint32(lows[k]), np.int32(highs[k]), shifts[k]
            width = np.uint32(highs[k] - lows[k])  # inside: 0 <= pattern − low <= width, one unsigned comparison
            larger = np.int32(0)
            for i in range(n):
                larger += np.int32(bits[i] > high)
                inside[i] = np.uint8(np.uint32(np.uint32(bits[i]) - low) <= width)
            inside[n:] = 0
            above[k] += larger
            bin_counts, group_counts, bin_lowest, bin_highest = counts[k], groups[k], lowest[k], highest[k]
            for w in range(-(-n // WORD)):
                word = words[w]
                while word:  # once per entry inside: each is a byte 1, the lowest bit of its byte
                    pattern = bits[w * WORD + np.int64(_trailing_zeros(word) >> np.uint64(3))]
                    word &= word - np.uint64(1)
                    b = (pattern - lows[k]) >> shift
                    if shift:
                        first = bin_counts[b] == 0
                        bin_lowest[b] = pattern if first else min(bin_lowest[b], pattern)
                        bin_highest[b] = pattern if first else max(bin_highest[b], pattern)
                    bin_counts[b] += 1
                    group_counts[b >> GROUP_BITS] += 1
