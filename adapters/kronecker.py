"""The math of LoKr extraction: the nearest Kronecker product of a weight difference (Van Loan–Pitsianis)
— docs/adapters.md, "Extraction".

A LoKr module stores its delta as kron(w1, w2): w1 (a, c) the small factor, w2 (b, d·kh·kw) the large
one holding a convolution's kernel, with out = a·b and in = c·d. Which (a, b) and (c, d) a dimension
splits into is `factorization`: the most-square divisor pair by default, or the pair around a given
factor, smaller side first (LyCORIS' convention, so that its loader rebuilds the same shapes).

Van Loan and Pitsianis: rearranging Δ (a·b, c·D) into R (a·c, b·D), whose row (i, j) is the block
Δ[i·b:(i+1)·b, j·D:(j+1)·D] flattened, maps kron(w1, w2) to the rank-1 matrix vec(w1)·vec(w2)ᵀ and
keeps the Frobenius norm. So the best sum of K Kronecker products is the rank-K truncated SVD of R,
and its squared error is the tail Σ_{i≥K} σᵢ(R)². A LyCORIS file holds one Kronecker product per
module, so extraction uses K = 1; `nearest_kronecker` computes any K for the analysis.

w2 may further be stored as a low-rank pair w2_a @ w2_b. With w1 fixed, the truncation error of w2 is
orthogonal to the Kronecker residual (R − u·uᵀ·R has no part along u = vec(w1)/‖w1‖), so
‖Δ − w1 ⊗ w2ᵣ‖² = ‖Δ − w1 ⊗ w2‖² + ‖w1‖²·‖w2 − w2ᵣ‖²: the reported error is exact.
"""
from __future__ import annotations

from dataclasses import dataclass

from lineage.errors import LineageError
from lineage.lazy import torch

from .decompose import Factors, RankRule, low_rank


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """`dimension` as (m, n) with m·n = dimension and m <= n: with `factor` -1 the pair with the
    least m + n (the most square); else (factor, dimension / factor) in ascending order, which
    needs `factor` to divide `dimension` (LyCORIS then falls back silently to another pair; we say so)."""
    if factor == -1:
        m = max(d for d in range(1, int(dimension ** 0.5) + 1) if dimension % d == 0)
        return m, dimension // m
    if factor < 1:
        raise LineageError(f"--factor must be -1 (most square) or a positive divisor, got {factor}")
    if dimension % factor:
        raise LineageError(f"--factor {factor} does not divide the dimension {dimension}")
    return min(factor, dimension // factor), max(factor, dimension // factor)


@dataclass(frozen=True)
class KroneckerShape:
    """How a module's (out, in·kh·kw) delta splits: w1 (a, c), w2 (b, d·kernel)."""

    a: int
    b: int
    c: int
    d: int
    kernel: int  # kh·kw (1 for a linear layer)

    @classmethod
    def of(cls, shape: tuple[int, ...], factor: int = -1) -> KroneckerShape:
        """The split of a weight of `shape` ((out, in) or (out, in, kh, kw)) at `factor`."""
        kernel = 1
        for k in shape[2:]:
            kernel *= k
        (a, b), (c, d) = factorization(shape[0], factor), factorization(shape[1], factor)
        return cls(a, b, c, d, kernel)

    @property
    def w1(self) -> tuple[int, int]:
        return self.a, self.c

    @property
    def w2(self) -> tuple[int, int]:
        return self.b, self.d * self.kernel

    @property
    def params(self) -> int:
        """Parameters of full w1 and w2."""
        return self.a * self.c + self.b * self.d * self.kernel


def rearrange(matrix: torch.Tensor, split: KroneckerShape) -> torch.Tensor:
    """Van Loan's R(Δ) (a·c, b·D): kron(w1, w2) becomes vec(w1)·vec(w2)ᵀ (row-major vec)."""
    b, wide = split.w2
    return matrix.reshape(split.a, b, split.c, wide).permute(0, 2, 1, 3).reshape(split.a * split.c, b * wide)


@dataclass
class NearestKronecker:
    """Δ ≈ Σ_k kron(w1[k], w2[k]) for k < K: w1 (K, a, c), w2 (K, b, D), each pair balanced (equal
    norms); `residual2` = ‖Δ − Σ_k kron(w1[k], w2[k])‖², `norm2` = ‖Δ‖²."""

    w1: torch.Tensor
    w2: torch.Tensor
    residual2: float
    norm2: float

    @property
    def kron_rank(self) -> int:
        return int(self.w1.shape[0])

    def matrix(self) -> torch.Tensor:
        """Σ_k kron(w1[k], w2[k]) as one (a·b, c·D) matrix."""
        return sum(torch.kron(p, q) for p, q in zip(self.w1, self.w2))


def nearest_kronecker(matrix: torch.Tensor, split: KroneckerShape, kron_rank: int = 1, *,
                      exact: bool = False) -> NearestKronecker:
    """The best sum of `kron_rank` Kronecker products of shapes `split` for the 2-D fp32 `matrix`.

    The SVD of R(Δ) (adapters/decompose.py: randomized or exact) gives the w1 side, orthonormal U; the
    w2 side is then taken as Uᵀ·R, the best w2 for those w1. On the exact path that is σ·Vᵀ; on the
    randomized path it also recovers the part of R outside the sampled basis, and on both it makes
    the residual exactly ‖R‖² − ‖Uᵀ·R‖² and orthogonal to any change of w2 (see the module docstring)."""
    if kron_rank < 1:
        raise LineageError(f"--kron-rank must be at least 1, got {kron_rank}")
    rearranged = rearrange(matrix, split)
    k = min(kron_rank, *rearranged.shape)
    found = low_rank(rearranged, k, exact=exact)
    up, _ = found.split(k)  # U·√S
    root = found.singular[:k].sqrt()
    left = torch.where(root > 0, up / root.clamp_min(torch.finfo(up.dtype).tiny), torch.zeros_like(up))
    right = left.T @ rearranged  # (k, b·D)
    strength = right.norm(dim=1)
    balance = strength.sqrt()
    w1 = (left * balance).T
    w2 = torch.where(balance[:, None] > 0, right / balance.clamp_min(torch.finfo(up.dtype).tiny)[:, None],
                     torch.zeros_like(right))
    residual2 = max(0.0, found.norm2 - float(strength.double().square().sum()))
    return NearestKronecker(w1.reshape(k, *split.w1).contiguous(), w2.reshape(k, *split.w2).contiguous(),
                            residual2, found.norm2)


@dataclass
class LokrFactors:
    """One module's LoKr: w1 (a, c), and w2 either full (b, D) or `w2_factors` kept at `w2_rank`;
    `residual2` = ‖Δ − w1 ⊗ w2‖² with w2 as stored."""

    w1: torch.Tensor
    w2: torch.Tensor
    w2_factors: Factors | None
    w2_rank: int | None
    residual2: float
    norm2: float

    @property
    def params(self) -> int:
        if self.w2_rank is None:
            return self.w1.numel() + self.w2.numel()
        return self.w1.numel() + self.w2_rank * sum(self.w2.shape)

    @property
    def relative_error(self) -> float:
        return (self.residual2 / self.norm2) ** 0.5 if self.norm2 > 0 else 0.0

    def cpu(self) -> LokrFactors:
        """The factors in host memory (from the device the SVDs ran on)."""
        return LokrFactors(self.w1.cpu(), self.w2.cpu(), None if self.w2_factors is None else self.w2_factors.cpu(),
                           self.w2_rank, self.residual2, self.norm2)


def factoring_saves(split: KroneckerShape, rank: int) -> bool:
    """Whether w2 is stored as a rank-`rank` pair: only when the pair is smaller than w2 itself, and
    only where LyCORIS expects a pair (its rank below half the larger of b and d; at a larger rank
    its loader builds a whole w2 and cannot take the pair). Else w2 is whole, as in LyCORIS'
    full-matrix mode."""
    rows, cols = split.b, split.d * split.kernel
    return rank < max(split.b, split.d) / 2 and rank < min(rows, cols) and rank * (rows + cols) < rows * cols


def lokr_factors(matrix: torch.Tensor, split: KroneckerShape, rule: RankRule | None, *,
                 exact: bool = False) -> LokrFactors:
    """A module's LoKr (one Kronecker product): the nearest kron(w1, w2), then w2 kept full (`rule`
    None) or at the rank `rule` chooses from w2's singular values, when that is smaller than full."""
    nearest = nearest_kronecker(matrix, split, 1, exact=exact)
    w1, w2 = nearest.w1[0], nearest.w2[0]
    norm2 = nearest.norm2
    if rule is not None and norm2 > 0:
        w2_factors = low_rank(w2, rule.max_rank, exact=True)  # w2 is small: its exact SVD is cheap
        rank = rule.rank(w2_factors)
        if factoring_saves(split, rank):
            w1_norm2 = float(w1.double().square().sum())
            return LokrFactors(w1, w2, w2_factors, rank, nearest.residual2 + w1_norm2 * w2_factors.residual2(rank),
                               norm2)
    return LokrFactors(w1, w2, None, None, nearest.residual2, norm2)
