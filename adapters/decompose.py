"""The math of extraction: a weight difference as low-rank factors, and how many ranks each module gets.

`low_rank(delta, max_rank)` factors one module's difference (2-D; a convolution flattened to
(out, in·kh·kw)) by truncated SVD, either exactly (`torch.linalg.svd` of the matrix, thin) or by a
randomized range finder (as `torch.svd_lowrank`, seeded: `max_rank + OVERSAMPLE` random directions refined by
POWER_ITERATIONS power iterations, then the SVD of the small projected matrix). Both give orthonormal
singular vectors, so the residual of keeping the first r values is exactly
‖Δ‖² − Σ_{i<r} σᵢ²: the reported errors need no second product.

How many ranks to keep (`RankRule`, per module), or one budget for the whole file (`allocate`):
- fixed r; ratio x: σᵢ ≥ x·σ₁; threshold x: σᵢ ≥ x; energy x: the smallest r with
  Σ_{i<r} σᵢ² ≥ x·‖Δ‖²; quantile x (LyCORIS's mode): the smallest r with Σ_{i<r} σᵢ ≥ x·Σσᵢ, which
  needs the whole spectrum, so only the exact path has it;
- a budget of parameters for all modules at once: every further rank of every module costs
  (out + in·kh·kw) parameters and removes σ² of squared error; taking the increments in order of
  error removed per parameter until the budget is spent gives the least total squared error for
  the size (within one increment). Within a module the values decrease, so each module keeps a prefix.
The factors are split as up = U·√S, down = √S·Vh: both carry the same magnitudes, which keeps fp16
factors clear of underflow (kohya's U·S and Vh leave down at unit scale and up at σ's).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from lineage.errors import LineageError
from lineage.lazy import torch

OVERSAMPLE = 10  # extra random directions of the range finder (Halko et al.: 5-10 suffice)
POWER_ITERATIONS = 2  # sharpen the range towards the top singular vectors (decaying spectra need few)
RANK_MODES = ("fixed", "ratio", "threshold", "energy", "quantile")
NORM_PIECE = 1 << 16  # elements per fp32 dot product of `sum_squares` (its rounding stays ~1e-7 relative)


def sum_squares(tensor: torch.Tensor) -> float:
    """‖tensor‖² accumulated in double across pieces of NORM_PIECE elements, each an fp32 dot product:
    as exact as the errors need, without the fp64 copy of the whole tensor (as slow as the SVD itself
    on the largest modules). A piece whose squares overflow fp32 is summed in fp64, so the result is
    inf or NaN only when a value is."""
    total = 0.0
    for piece in tensor.reshape(-1).split(NORM_PIECE):
        part = float(torch.dot(piece, piece))
        total += part if math.isfinite(part) else float(piece.double().square().sum())
    return total


@dataclass
class Factors:
    """A module's difference factored up to some rank k: `up` (out, k) = U·√S and `down` (k, in) = √S·Vh,
    so that up[:, :r] @ down[:r] is the rank-r truncation for every r <= k; `singular` (k,) the
    singular values, `norm2` = ‖Δ‖², `spectrum` every singular value when the exact path computed
    them all (else None)."""

    up: torch.Tensor
    singular: torch.Tensor
    down: torch.Tensor
    norm2: float
    spectrum: torch.Tensor | None = None

    @classmethod
    def of_values(cls, singular: torch.Tensor, norm2: float) -> Factors:
        """Singular values and ‖Δ‖² without vectors: each rank's error, and what `allocate` needs, without
        the memory of the factors."""
        return cls(torch.zeros(0, singular.numel()), singular, torch.zeros(singular.numel(), 0), norm2)

    @property
    def rank(self) -> int:
        return int(self.singular.numel())

    def residual2(self, rank: int) -> float:
        """‖Δ − its best rank-`rank` approximation found‖²."""
        kept = float(self.singular[:rank].double().square().sum())
        return max(0.0, self.norm2 - kept)

    def relative_error(self, rank: int) -> float:
        return (self.residual2(rank) / self.norm2) ** 0.5 if self.norm2 > 0 else 0.0

    def split(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(up, down) at `rank`."""
        return self.up[:, :rank], self.down[:rank]

    def cpu(self) -> Factors:
        """The factors in host memory (from the device the SVD ran on)."""
        return Factors(self.up.cpu(), self.singular.cpu(), self.down.cpu(), self.norm2,
                       None if self.spectrum is None else self.spectrum.cpu())

    def to(self, dtype: torch.dtype) -> Factors:
        """The factors kept in `dtype` (e.g. the adapter's fp16: half the memory, rounded once)."""
        return Factors(self.up.to(dtype), self.singular.float(), self.down.to(dtype), self.norm2, self.spectrum)


def _balanced(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, norm2: float,
              spectrum: torch.Tensor | None = None) -> Factors:
    root = s.sqrt()
    return Factors((u * root).contiguous(), s.clone(), (root[:, None] * vh).contiguous(), norm2, spectrum)


def low_rank(delta: torch.Tensor, max_rank: int, *, exact: bool = False,
             generator: torch.Generator | None = None) -> Factors:
    """The truncated SVD of a 2-D fp32 `delta`, up to `max_rank` values (fewer if the matrix is smaller)."""
    if delta.dim() != 2:
        raise ValueError(f"low_rank takes a matrix, got shape {tuple(delta.shape)}")
    norm2 = sum_squares(delta)
    k = min(max_rank, *delta.shape)
    if exact or k + OVERSAMPLE >= min(delta.shape):
        # The thin SVD costs out·in·min(out, in): the orientation does not matter for torch's driver.
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        return _balanced(u[:, :k], s[:k], vh[:k], norm2, s)
    u, s, vh = _randomized_svd(delta, k + OVERSAMPLE, generator or torch.Generator().manual_seed(0))
    return _balanced(u[:, :k], s[:k], vh[:k], norm2)


def _randomized_svd(matrix: torch.Tensor, width: int, generator: torch.Generator
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Halko et al.'s range finder with POWER_ITERATIONS re-orthogonalised power iterations, then the
    SVD of the small projected matrix (what torch.svd_lowrank computes). The random directions come
    from `generator`, not from torch's global one, which worker threads would share: the same
    inputs give the same factors, and so the same file, whatever the threads' order."""
    directions = torch.randn(matrix.shape[1], width, generator=generator).to(matrix.device, matrix.dtype)
    basis = torch.linalg.qr(matrix @ directions).Q
    for _ in range(POWER_ITERATIONS):
        basis = torch.linalg.qr(matrix @ torch.linalg.qr(matrix.T @ basis).Q).Q
    u, s, vh = torch.linalg.svd(basis.T @ matrix, full_matrices=False)
    return basis @ u, s, vh


@dataclass(frozen=True)
class RankRule:
    """How many singular values a module keeps: `mode` (RANK_MODES) with its parameter `value`
    (the rank itself for "fixed"), never more than `max_rank`."""

    mode: str
    value: float
    max_rank: int

    def __post_init__(self) -> None:
        if self.mode not in RANK_MODES:
            raise LineageError(f"unknown rank mode {self.mode!r}; choose one of {', '.join(RANK_MODES)}")
        if self.max_rank < 1:
            raise LineageError(f"the rank must be at least 1, got {self.max_rank}")
        if self.mode in ("ratio", "energy", "quantile") and not 0 < self.value <= 1:
            raise LineageError(f"--rank-param for {self.mode} must be in (0, 1], got {self.value}")
        if self.mode == "threshold" and not self.value >= 0:
            raise LineageError(f"--rank-param for threshold must be at least 0, got {self.value}")

    def rank(self, factors: Factors) -> int:
        """The rank kept of `factors`: 0 when the difference is zero, else at least 1."""
        if factors.norm2 == 0:
            return 0
        s = factors.singular.double()
        if self.mode == "fixed":
            chosen = int(self.value)
        elif self.mode == "ratio":
            chosen = int((s >= self.value * float(s[0])).sum()) if s.numel() else 0
        elif self.mode == "threshold":
            chosen = int((s >= self.value).sum())
        elif self.mode == "energy":
            chosen = _first_reaching(s.square().cumsum(0), self.value * factors.norm2)
        else:  # quantile
            if factors.spectrum is None:
                raise LineageError("rank mode quantile needs every singular value: add --exact")
            chosen = _first_reaching(s.cumsum(0), self.value * float(factors.spectrum.double().sum()))
        return max(1, min(chosen, self.max_rank, factors.rank))


def _first_reaching(cumulative: torch.Tensor, target: float) -> int:
    """The smallest count whose cumulative sum reaches `target` (all of them when none does)."""
    reached = (cumulative >= target * (1 - 1e-12)).nonzero()
    return int(reached[0]) + 1 if reached.numel() else int(cumulative.numel())


def allocate(factors: dict[str, Factors], costs: dict[str, int], budget: int) -> dict[str, int]:
    """Ranks for every module at once: the increments (module m's next singular value, costing
    costs[m] parameters) with the most squared error removed per parameter, until `budget`
    parameters are spent. Modules whose difference is not zero keep at least rank 1."""
    names = list(factors)
    ranks = {name: (1 if factors[name].norm2 > 0 and factors[name].rank else 0) for name in names}
    tails = {name: factors[name].singular[ranks[name]:] if ranks[name] else factors[name].singular[:0]
             for name in names}
    spent = sum(costs[name] * ranks[name] for name in names)
    if spent > budget:
        raise LineageError(f"the size budget ({budget:,} parameters) does not hold rank 1 of every changed module "
                           f"({spent:,} parameters)")
    gains, owners = [], []
    for index, name in enumerate(names):
        tail = tails[name].double()
        gains.append(tail.square() / costs[name])
        owners.append(torch.full((tail.numel(),), index, dtype=torch.long))
    if not gains:
        return ranks
    gain, owner = torch.cat(gains), torch.cat(owners)
    order = gain.argsort(descending=True, stable=True)
    cost_of = torch.tensor([costs[name] for name in names], dtype=torch.long)
    affordable = int((cost_of[owner[order]].cumsum(0) <= budget - spent).sum())
    taken = torch.bincount(owner[order[:affordable]], minlength=len(names))
    return {name: ranks[name] + int(taken[i]) for i, name in enumerate(names)}
