"""Triton kernels for the elementwise merge methods, used for CUDA tensors (docs/merging.md, "Triton kernels").

The torch code in merge/methods.py is the reference and the CPU path (TIES on the CPU runs the
compiled loops of merge/cpu_loops.py); the methods call these
functions only when `use_kernels(...)` says so (triton imported and every tensor on a CUDA device).
Each kernel makes one pass over its inputs, whatever the number of models:

- `linear_combination`: Σ cᵢ·xᵢ over N inputs — weighted sum, linear average, add difference and
  task arithmetic are all this with the right coefficients;
- `ties`: trim each delta at its magnitude threshold (computed by torch; non-finite deltas are
  dropped), elect the sign, take the disjoint mean;
- `dare`: keep each delta entry with probability `density` from the counter-based RNG of
  merge/rng.py (bit for bit the mask the CPU draws), rescale by 1/density, then sum or elect+fuse;
- `uniform`: the RNG itself, so its agreement with the CPU can be tested directly.

Models are passed as a tuple of tensors (one pointer each, unrolled at compile time). Everything is
computed in fp32 whatever the input dtype. `triton` is optional: without it this module still
imports and `use_kernels` is False. Tests run the kernels on CPU tensors with TRITON_INTERPRET=1.
"""
from __future__ import annotations

from collections.abc import Sequence

from lineage.lazy import torch

from . import rng

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU path needs torch only
    triton = None

BLOCK = 1024  # elements per program instance


def use_kernels(*tensors: torch.Tensor) -> bool:
    """True when the Triton kernels can run on these tensors (all on a CUDA device)."""
    return triton is not None and all(t.is_cuda for t in tensors)


def _launch(kernel, numel: int, *args, **constexprs) -> None:
    if numel >= rng.MAX_ELEMENTS:
        raise ValueError(f"tensor of {numel} elements is too large for the merge kernels")
    if numel == 0:
        return
    kernel[(triton.cdiv(numel, BLOCK),)](*args, numel, BLOCK=BLOCK, **constexprs)


def _flat(tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return tuple(t.contiguous().view(-1) for t in tensors)


def _output_like(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(t.shape, dtype=torch.float32, device=t.device)


def _key_arguments(seed: int, stream: int) -> tuple[int, ...]:
    """rng.stream_keys with bit 32 set: always an int64 argument (one compiled variant), never the
    value 1 that Triton would turn into a compile-time constant; the kernel's uint32 cast drops it."""
    return tuple(key | (1 << 32) for key in rng.stream_keys(seed, stream))


if triton is not None:

    @triton.jit
    def _offsets(numel, BLOCK: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        return offsets, offsets < numel

    @triton.jit
    def _mix32(x):
        # rng._mix32 in wrapping uint32 arithmetic; the constants are rng.MIX_MULTIPLIERS / MIX_SHIFTS.
        x ^= x >> 16
        x = x * 0x21F0AAAD
        x ^= x >> 15
        x = x * 0x735A2D97
        x ^= x >> 15
        return x

    @triton.jit
    def _uniform(offsets, k0, k1):
        # rng.uniform for the given element indices: 24 random bits scaled to [0, 1), exact in fp32.
        x = offsets.to(tl.uint32) ^ k0.to(tl.uint32)
        x = _mix32(x)
        x ^= k1.to(tl.uint32)
        x = _mix32(x)
        return (x >> 8).to(tl.float32) * (1.0 / 16777216.0)

    @triton.jit
    def _uniform_kernel(out_ptr, k0, k1, numel, BLOCK: tl.constexpr):
        offsets, inside = _offsets(numel, BLOCK)
        tl.store(out_ptr + offsets, _uniform(offsets, k0, k1), mask=inside)

    @triton.jit
    def _linear_combination_kernel(out_ptr, inputs, coefficients, numel, BLOCK: tl.constexpr):
        offsets, inside = _offsets(numel, BLOCK)
        total = tl.zeros((BLOCK,), tl.float32)
        for i in tl.static_range(len(inputs)):
            total += coefficients[i] * tl.load(inputs[i] + offsets, mask=inside).to(tl.float32)
        tl.store(out_ptr + offsets, total, mask=inside)

    @triton.jit
    def _ties_delta(model_ptr, base, offsets, inside, threshold):
        # Kept: |delta| at or above the threshold and finite (a NaN or Inf never takes a slot).
        delta = tl.load(model_ptr + offsets, mask=inside).to(tl.float32) - base
        magnitude = tl.abs(delta)
        return tl.where((magnitude >= threshold) & (magnitude < float("inf")), delta, 0.0)

    @triton.jit
    def _disjoint_mean(agreeing_sum, agreeing_weight, elected):
        # 0 where no model agrees, NaN where the election itself is NaN (elected·0), as on the CPU.
        return tl.where(agreeing_weight != 0.0, agreeing_sum / agreeing_weight, elected * 0.0)

    @triton.jit
    def _ties_kernel(out_ptr, base_ptr, models, thresholds, weights, alpha, numel, BLOCK: tl.constexpr):
        offsets, inside = _offsets(numel, BLOCK)
        base = tl.load(base_ptr + offsets, mask=inside).to(tl.float32)
        elected = tl.zeros((BLOCK,), tl.float32)
        for i in tl.static_range(len(models)):
            elected += weights[i] * _ties_delta(models[i], base, offsets, inside, thresholds[i])
        # Second pass over the models (reloaded: the block is still in cache) for the disjoint mean.
        agreeing_sum = tl.zeros((BLOCK,), tl.float32)
        agreeing_weight = tl.zeros((BLOCK,), tl.float32)
        for i in tl.static_range(len(models)):
            delta = _ties_delta(models[i], base, offsets, inside, thresholds[i])
            agrees = delta * elected > 0.0
            agreeing_sum += tl.where(agrees, weights[i] * delta, 0.0)
            agreeing_weight += tl.where(agrees, weights[i], 0.0)
        tl.store(out_ptr + offsets, base + alpha * _disjoint_mean(agreeing_sum, agreeing_weight, elected), mask=inside)

    @triton.jit
    def _dare_delta(model_ptr, base, offsets, inside, k0, k1, density):
        delta = tl.load(model_ptr + offsets, mask=inside).to(tl.float32) - base
        return tl.where(_uniform(offsets, k0, k1) < density, delta / density, 0.0)

    @triton.jit
    def _dare_kernel(out_ptr, base_ptr, models, keys0, keys1, weights, density, alpha, numel,
                     ELECT_SIGN: tl.constexpr, BLOCK: tl.constexpr):
        offsets, inside = _offsets(numel, BLOCK)
        base = tl.load(base_ptr + offsets, mask=inside).to(tl.float32)
        total = tl.zeros((BLOCK,), tl.float32)
        for i in tl.static_range(len(models)):
            total += weights[i] * _dare_delta(models[i], base, offsets, inside, keys0[i], keys1[i], density)
        if ELECT_SIGN:
            agreeing_sum = tl.zeros((BLOCK,), tl.float32)
            agreeing_weight = tl.zeros((BLOCK,), tl.float32)
            for i in tl.static_range(len(models)):
                delta = _dare_delta(models[i], base, offsets, inside, keys0[i], keys1[i], density)
                agrees = delta * total > 0.0
                agreeing_sum += tl.where(agrees, weights[i] * delta, 0.0)
                agreeing_weight += tl.where(agrees, weights[i], 0.0)
            total = _disjoint_mean(agreeing_sum, agreeing_weight, total)
        tl.store(out_ptr + offsets, base + alpha * total, mask=inside)


def uniform(seed: int, stream: int, numel: int, device: torch.device | str) -> torch.Tensor:
    """rng.uniform computed by the kernel: the same numbers, bit for bit."""
    out = torch.empty(numel, dtype=torch.float32, device=device)
    _launch(_uniform_kernel, numel, out, *_key_arguments(seed, stream))
    return out


def linear_combination(inputs: Sequence[torch.Tensor], coefficients: Sequence[float]) -> torch.Tensor:
    """Σ coefficients[i]·inputs[i], in fp32."""
    out = _output_like(inputs[0])
    _launch(_linear_combination_kernel, out.numel(), out, _flat(inputs), tuple(map(float, coefficients)))
    return out


def ties(base: torch.Tensor, models: Sequence[torch.Tensor], thresholds: Sequence[float], weights: Sequence[float],
         alpha: float) -> torch.Tensor:
    """TIES with the given per-model magnitude thresholds (entries with |delta| >= threshold are kept)."""
    out = _output_like(base)
    _launch(_ties_kernel, out.numel(), out, base.contiguous(), _flat(models), tuple(map(float, thresholds)),
            tuple(map(float, weights)), float(alpha))
    return out


def dare(base: torch.Tensor, models: Sequence[torch.Tensor], seed: int, weights: Sequence[float], density: float,
         alpha: float, elect_sign: bool) -> torch.Tensor:
    """DARE (linear, or TIES-style sign election when `elect_sign`); model i draws RNG stream i + 1."""
    keys = [_key_arguments(seed, stream) for stream in range(1, len(models) + 1)]
    out = _output_like(base)
    _launch(_dare_kernel, out.numel(), out, base.contiguous(), _flat(models), tuple(k0 for k0, _ in keys),
            tuple(k1 for _, k1 in keys), tuple(map(float, weights)), float(density), float(alpha),
            ELECT_SIGN=elect_sign)
    return out
