"""Counter-based random numbers for the random merge methods (DARE, DELLA).

A random mask must come out the same on every run, on every machine, and from the torch code on the
CPU as from the Triton kernel on a GPU (merge/kernels.py), so it cannot depend on a stateful
generator or on how the work is split. Each element's number is a pure function of
(seed, stream, element index):

    k0, k1 = two 32-bit words of splitmix64(splitmix64(seed) ^ stream)   (in Python, once per call)
    x      = mix32(mix32(index ^ k0) ^ k1)
    u      = (x >> 8) / 2**24                                            (24 bits: exact in fp32)

`mix32` is the two-multiply integer hash from Chris Wellons' hash-prospector (xor-shift 16,
multiply 0x21f0aaad, xor-shift 15, multiply 0x735a2d97, xor-shift 15). Both multipliers are below
2**31, so with `x < 2**32` every product fits in int64 without overflow: the torch code below does
exact integer arithmetic, and the Triton kernels reproduce it with wrapping uint32 arithmetic.
A merge method gives each fine-tune its own `stream` (its position among the models).
"""
from __future__ import annotations

import torch

MASK32 = 0xFFFF_FFFF
MASK64 = 0xFFFF_FFFF_FFFF_FFFF
MIX_MULTIPLIERS = (0x21F0AAAD, 0x735A2D97)
MIX_SHIFTS = (16, 15, 15)
UNIFORM_BITS = 24  # an fp32 holds every multiple of 2**-24 in [0, 1) exactly
MAX_ELEMENTS = 1 << 32  # element indices are hashed as 32-bit words
_CHUNK = 1 << 16  # elements hashed per step: the int64 temporaries stay in the CPU cache


def splitmix64(x: int) -> int:
    """One step of the splitmix64 finaliser (Steele et al.), on Python integers."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def stream_keys(seed: int, stream: int) -> tuple[int, int]:
    """The two 32-bit keys (k0, k1) of one random stream; any int seed, negative ones included."""
    mixed = splitmix64(splitmix64(seed & MASK64) ^ (stream & MASK64))
    return mixed & MASK32, mixed >> 32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """mix32 in place on an int64 tensor holding 32-bit values."""
    first, second = MIX_MULTIPLIERS
    x ^= x >> MIX_SHIFTS[0]
    x.mul_(first).bitwise_and_(MASK32)
    x ^= x >> MIX_SHIFTS[1]
    x.mul_(second).bitwise_and_(MASK32)
    x ^= x >> MIX_SHIFTS[2]
    return x


def uniform(seed: int, stream: int, numel: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """`numel` fp32 numbers in [0, 1) on a 2**-24 grid, element i a function of (seed, stream, i) only."""
    if numel > MAX_ELEMENTS:
        raise ValueError(f"counter-based RNG covers at most 2**32 elements, got {numel}")
    k0, k1 = stream_keys(seed, stream)
    out = torch.empty(numel, dtype=torch.float32, device=device)
    for start in range(0, numel, _CHUNK):
        x = torch.arange(start, min(start + _CHUNK, numel), dtype=torch.int64, device=device)
        x ^= k0
        x = _mix32(x)
        x ^= k1
        x = _mix32(x)
        x >>= 32 - UNIFORM_BITS
        out[start:start + x.numel()] = x  # exact: the values are below 2**24
    return out.mul_(2.0 ** -UNIFORM_BITS)


def keep_mask(seed: int, stream: int, shape: torch.Size | tuple[int, ...], keep_probability: float | torch.Tensor,
              device: torch.device | str = "cpu") -> torch.Tensor:
    """A Bernoulli keep mask (fp32 0/1) of `shape`: element i is kept when uniform_i < keep_probability.

    A scalar probability is rounded to fp32 first, so this CPU code and the GPU kernel, which
    receives it as an fp32 argument, compare the very same two numbers."""
    numel = 1
    for d in shape:
        numel *= d
    u = uniform(seed, stream, numel, device).reshape(shape)
    if not isinstance(keep_probability, torch.Tensor):
        keep_probability = torch.tensor(keep_probability, dtype=torch.float32, device=device)
    return (u < keep_probability).to(torch.float32)
