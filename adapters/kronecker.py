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
‖Δ − w1 ⊗ w2ᵣ‖² = ‖Δ − w1 ⊗ w2‖² + ‖w1‖²·‖w2 − w2ᵣ‖²: the reported error is exact. The same holds
for any other approximation of w2 (a Tucker core, `tucker_w2`), and for a truncated w1 once w2 is
fitted again to it (`with_low_rank_w1`). It also makes a size budget one global allocation
(`allocate_ranks`): each rank of w2 removes ‖w1‖²·σᵢ(w2)² and costs b + d·kh·kw parameters.
How a fit is stored — whole or pairs, which LyCORIS accepts at which rank — is `KroneckerFit.layout`.
"""
from __future__ import annotations

from dataclasses import dataclass

from lineage.errors import LineageError
from lineage.lazy import torch

from .decompose import Factors, allocate, low_rank


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
    kernel_dims: tuple[int, ...] = ()  # (kh, kw) of a convolution: the trailing dims of a Tucker core

    @classmethod
    def of(cls, shape: tuple[int, ...], factor: int = -1) -> KroneckerShape:
        """The split of a weight of `shape` ((out, in) or (out, in, kh, kw)) at `factor`."""
        kernel = 1
        for k in shape[2:]:
            kernel *= k
        (a, b), (c, d) = factorization(shape[0], factor), factorization(shape[1], factor)
        return cls(a, b, c, d, kernel, tuple(shape[2:]))

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


def w2_factorable(split: KroneckerShape, rank: int) -> bool:
    """Whether w2 may be stored as a rank-`rank` pair (or Tucker core): only where LyCORIS expects one
    (the rank below half the larger of b and d; at a larger rank its loader builds a whole w2 and
    cannot take the pair), and only when the pair is smaller than w2 itself. Else w2 is whole, as in
    LyCORIS' full-matrix mode."""
    rows, cols = split.w2
    return rank < max(split.b, split.d) / 2 and rank < min(rows, cols) and rank * (rows + cols) < rows * cols


def w1_factorable(split: KroneckerShape, rank: int) -> bool:
    """Whether w1 may be stored as a rank-`rank` pair beside a factored w2 of the same rank (LyCORIS'
    `decompose_both`: its loader reads one rank for both pairs, and takes a w1 pair only with a w2
    pair): the rank below half the larger of a and c, and the pair smaller than w1."""
    return (w2_factorable(split, rank) and rank < max(split.a, split.c) / 2
            and rank * (split.a + split.c) < split.a * split.c)


def factored_rank_limit(split: KroneckerShape, max_rank: int) -> int:
    """The largest rank (at most `max_rank`) at which w2 is stored as a pair; 0 when it never is."""
    return max((r for r in range(1, max_rank + 1) if w2_factorable(split, r)), default=0)


def _norm2(tensor: torch.Tensor) -> float:
    return float(tensor.double().square().sum())


@dataclass
class LokrFactors:
    """One module's LoKr as stored: `tensors` (role -> tensor in the shape LyCORIS' layout gives it:
    lokr_w1 (a, c) or lokr_w1_a (a, r) and lokr_w1_b (r, c); lokr_w2 (b, d[, kh, kw]), or lokr_w2_a
    (b, r) and lokr_w2_b (r, d·kh·kw), or with Tucker lokr_t2 (r, r, kh, kw), lokr_w2_a (r, b) and
    lokr_w2_b (r, d)); `rank` the rank of the pairs (None: both factors whole), `w1_rank` that of
    w1 when it is a pair too; `residual2` = ‖Δ − kron(w1, w2)‖² of the factors as stored."""

    split: KroneckerShape
    tensors: dict[str, torch.Tensor]
    rank: int | None
    w1_rank: int | None
    residual2: float
    norm2: float

    @property
    def params(self) -> int:
        return sum(t.numel() for t in self.tensors.values())

    @property
    def relative_error(self) -> float:
        return (self.residual2 / self.norm2) ** 0.5 if self.norm2 > 0 else 0.0

    def cpu(self) -> LokrFactors:
        """The factors in host memory (from the device the SVDs ran on)."""
        return LokrFactors(self.split, {role: t.cpu() for role, t in self.tensors.items()}, self.rank, self.w1_rank,
                           self.residual2, self.norm2)


@dataclass
class KroneckerFit:
    """A module's nearest Kronecker product, before its layout is chosen: w1 (a, c), w2 (b, d·kh·kw) the
    best w2 for that w1, `residual2` = ‖Δ − kron(w1, w2)‖², `norm2` = ‖Δ‖², `w2_svd` w2's SVD up to the
    largest rank a rule or a budget may keep (None: w2 only ever whole), and `w1_pair` when w1 is
    itself a rank-r truncation (then w1 = up @ down of it)."""

    split: KroneckerShape
    w1: torch.Tensor
    w2: torch.Tensor
    residual2: float
    norm2: float
    w2_svd: Factors | None
    w1_pair: Factors | None = None

    def values(self) -> torch.Tensor:
        """What each further rank of w2 removes from ‖Δ − kron(w1, w2ᵣ)‖, as singular values: ‖w1‖·σᵢ(w2)
        (the squared error of w2 at rank r is residual2 + ‖w1‖²·Σ_{i≥r} σᵢ(w2)², see the module docstring)."""
        if self.w2_svd is None:
            return torch.zeros(0)
        return self.w2_svd.singular.double() * _norm2(self.w1) ** 0.5

    def layout(self, rank: int | None, *, tucker: bool = False) -> LokrFactors:
        """The factors as stored with w2 at `rank` (None, or a rank at which a pair is not allowed or
        saves nothing: w2 whole), as a Tucker core with its two mode matrices when `tucker` and the
        module is a convolution with a kernel larger than 1×1."""
        split = self.split
        w1_norm2 = _norm2(self.w1)
        if self.w1_pair is not None:
            up, down = self.w1_pair.split(self.w1_pair.rank)
            tensors = {"lokr_w1_a": up, "lokr_w1_b": down}
        else:
            tensors = {"lokr_w1": self.w1}
        if rank is None or self.w2_svd is None or self.norm2 == 0 or not w2_factorable(split, rank):
            if self.w1_pair is not None:
                raise ValueError("a factored w1 needs a factored w2 of the same rank (LyCORIS' decompose_both)")
            tensors["lokr_w2"] = self.w2.reshape(split.b, split.d, *split.kernel_dims)
            return LokrFactors(split, tensors, None, None, self.residual2, self.norm2)
        if tucker and split.kernel > 1:
            core, rows, columns, residual2 = tucker_w2(self.w2, split, rank)
            tensors.update(lokr_t2=core, lokr_w2_a=rows, lokr_w2_b=columns)
        else:
            tensors["lokr_w2_a"], tensors["lokr_w2_b"] = self.w2_svd.split(rank)
            residual2 = self.w2_svd.residual2(rank)
        w1_rank = None if self.w1_pair is None else self.w1_pair.rank
        return LokrFactors(split, tensors, rank, w1_rank, self.residual2 + w1_norm2 * residual2, self.norm2)

    def cpu(self) -> KroneckerFit:
        """The fit in host memory (from the device the SVDs ran on)."""
        return KroneckerFit(self.split, self.w1.cpu(), self.w2.cpu(), self.residual2, self.norm2,
                            None if self.w2_svd is None else self.w2_svd.cpu(),
                            None if self.w1_pair is None else self.w1_pair.cpu())


def kronecker_fit(matrix: torch.Tensor, split: KroneckerShape, max_rank: int, *, exact: bool = False) -> KroneckerFit:
    """The nearest kron(w1, w2) of the 2-D fp32 `matrix` (one product), with w2's SVD up to `max_rank`
    (0: none, w2 stays whole)."""
    nearest = nearest_kronecker(matrix, split, 1, exact=exact)
    w1, w2 = nearest.w1[0], nearest.w2[0]
    w2_svd = low_rank(w2, max_rank, exact=True) if max_rank > 0 else None  # w2 is small: its exact SVD is cheap
    return KroneckerFit(split, w1, w2, nearest.residual2, nearest.norm2, w2_svd)


def with_low_rank_w1(matrix: torch.Tensor, fit: KroneckerFit, rank: int) -> KroneckerFit:
    """`fit` with w1 truncated to `rank` (its SVD) and w2 fitted again to that w1: the best w2 for a
    fixed w1 is Rᵀ·vec(w1) / ‖w1‖², whose residual ‖R‖² − ‖Rᵀ·vec(w1)‖² / ‖w1‖² is orthogonal to any
    further change of w2, so w2's own truncation still adds exactly ‖w1‖²·‖w2 − w2ᵣ‖²."""
    pair = low_rank(fit.w1, rank, exact=True)
    up, down = pair.split(rank)
    w1 = up @ down
    w1_norm2 = _norm2(w1)
    if w1_norm2 == 0:
        return fit
    projected = w1.reshape(1, -1) @ rearrange(matrix, fit.split)  # vec(w1)ᵀ·R: (1, b·D)
    w2 = (projected / w1_norm2).reshape(fit.split.w2)
    residual2 = max(0.0, fit.norm2 - _norm2(projected) / w1_norm2)
    max_rank = 0 if fit.w2_svd is None else fit.w2_svd.rank
    w2_svd = low_rank(w2, max_rank, exact=True) if max_rank > 0 else None
    return KroneckerFit(fit.split, w1, w2, residual2, fit.norm2, w2_svd, Factors(up, pair.singular[:rank], down,
                                                                                   pair.norm2))


def tucker_w2(w2: torch.Tensor, split: KroneckerShape, rank: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """w2 (b, d·kh·kw) as LyCORIS' Tucker layout at `rank`, by truncated HOSVD of w2 as a (b, d, kh·kw)
    tensor: the mode matrices are the top `rank` left singular vectors of its b- and d-unfoldings (zero
    columns past the unfolding's own rank), the core w2 projected onto them. Returns the core (r, r, kh,
    kw), w2_a (r, b), w2_b (r, d), and ‖w2 − rebuilt‖² (measured, in double)."""
    tensor = w2.reshape(split.b, split.d, split.kernel)
    modes = []
    for unfolding in (tensor.reshape(split.b, -1), tensor.permute(1, 0, 2).reshape(split.d, -1)):
        left = torch.linalg.svd(unfolding, full_matrices=False).U[:, :rank]
        modes.append(torch.nn.functional.pad(left, (0, rank - left.shape[1])))  # (dim, rank)
    rows, columns = modes
    core = torch.einsum("bdk,br,ds->rsk", tensor, rows, columns)
    rebuilt = torch.einsum("rsk,br,ds->bdk", core, rows, columns)
    residual2 = _norm2(tensor - rebuilt)
    return (core.reshape(rank, rank, *split.kernel_dims).contiguous(), rows.T.contiguous(), columns.T.contiguous(),
            residual2)


def allocate_ranks(fits: dict[str, KroneckerFit], budget: int, alpha_cost: int = 1) -> dict[str, int | None]:
    """w2's rank of every module at once so that the file holds at most `budget` parameters with the
    least total squared error (None: w2 whole). Each changed module's fixed part — w1 (a·c) and its
    alpha — is paid first; each rank of w2 then costs b + d·kh·kw and removes ‖w1‖²·σᵢ(w2)², and the
    ranks are shared out by adapters/decompose.py's global allocation, up to the largest rank at which
    LyCORIS takes a pair that saves parameters (a module without one is stored whole in its fixed part).
    What is left then turns whole the modules at that limit whose whole w2 removes the most error per
    further parameter, while it fits."""
    changed = {name: fit for name, fit in fits.items() if fit.norm2 > 0}
    limits = {name: factored_rank_limit(fit.split, 0 if fit.w2_svd is None else fit.w2_svd.rank)
              for name, fit in changed.items()}
    costs = {name: sum(fit.split.w2) for name, fit in changed.items()}
    whole = {name: fit.split.b * fit.split.d * fit.split.kernel for name, fit in changed.items()}
    fixed = sum(fit.split.a * fit.split.c + alpha_cost + (whole[name] if limits[name] == 0 else 0)
                for name, fit in changed.items())
    least = fixed + sum(costs[name] for name in changed if limits[name])
    if least > budget:
        raise LineageError(f"the size budget ({budget:,} parameters) does not hold the smallest LoKr of the changed "
                           f"modules (w1, alpha and a rank-1 w2 each: {least:,} parameters)")
    values = {name: Factors.of_values(fit.values()[:limits[name]], fit.norm2) for name, fit in changed.items()}
    ranks: dict[str, int | None] = dict(allocate(values, costs, budget - fixed))
    left = budget - fixed - sum(costs[name] * (ranks[name] or 0) for name in changed)
    for name in changed:
        if not limits[name]:
            ranks[name] = None
    # Whole w2 where it fits: the modules at their limit, by error removed per further parameter.
    at_limit = [name for name in changed if limits[name] and ranks[name] == limits[name]]
    extra = {name: whole[name] - costs[name] * limits[name] for name in at_limit}
    gain = {name: _norm2(changed[name].w1) * changed[name].w2_svd.residual2(limits[name]) for name in at_limit}
    for name in sorted(at_limit, key=lambda n: gain[n] / extra[n], reverse=True):
        if gain[name] > 0 and extra[name] <= left:
            ranks[name], left = None, left - extra[name]
    return {name: (ranks.get(name) if name in changed else 0) for name in fits}
