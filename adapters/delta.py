"""The weight change ("delta") one adapter module makes, per algorithm (docs/adapters.md, "Applying").

Every algorithm's tensors rebuild into a `Delta`: the change in its cheapest form to add to a weight,
as a 2-D matrix of the weight's rows (out) by its columns (in · kh · kw):

- `product`: scale · up @ down (LoRA and LoCon, Tucker `lora_mid` folded into down);
- `kron`: scale · kron(w1, w2) (LoKr, each factor rebuilt from its low-rank pair or Tucker core first);
- `dense`: scale · matrix (LoHa's element-wise product, full `diff`).

The scale follows what ComfyUI and kohya compute: alpha / rank, or 1 when the file has no alpha; for
LoKr alpha / rank only when a factor is low-rank (the rank of the second factor when both are), and 1
when both factors are full; a full diff ignores alpha. `module_delta` gives the delta as one fp32
tensor of the weight's shape; `add_delta_` adds a rebuilt delta to a weight in place at a strength,
through adapters/kernels.py (no Kronecker product or up @ down is materialised beside the weight), and
applies DoRA's magnitude (`dora_scale`) when the module has one.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from lineage.errors import LineageError

Tensors = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class Delta:
    """scale · (up @ down | kron(w1, w2) | matrix), every factor 2-D and fp32 (see the module docstring)."""

    kind: str  # product | kron | dense
    factors: tuple[torch.Tensor, ...]
    scale: float

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, columns) of the matrix it stands for."""
        first, *rest = self.factors
        if self.kind == "product":
            return first.shape[0], rest[0].shape[1]
        if self.kind == "kron":
            return first.shape[0] * rest[0].shape[0], first.shape[1] * rest[0].shape[1]
        return first.shape[0], first.shape[1]

    def rows(self, start: int, stop: int) -> Delta:
        """The delta's rows [start, stop): a product's `up` rows or a dense matrix's rows. A Kronecker
        product's rows are not sliced (see `SLICEABLE`)."""
        if self.kind not in SLICEABLE:
            raise LineageError(f"a {self.kind} delta is not sliced by rows")
        first, *rest = self.factors
        return Delta(self.kind, (first[start:stop], *rest), self.scale)

    def matrix(self) -> torch.Tensor:
        """The delta as one (out, in · kh · kw) fp32 matrix, scale included."""
        first, *rest = self.factors
        combined = {"product": lambda: first @ rest[0], "kron": lambda: torch.kron(first, rest[0]),
                    "dense": lambda: first}[self.kind]()
        return combined * self.scale


# Kinds whose rows are a slice of one factor: what `Delta.rows` can cut (adapters/apply.py works row block
# by row block on them).
SLICEABLE = frozenset({"product", "dense"})


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32)


def _scale(alpha: float | None, rank: int) -> float:
    """alpha / rank; no alpha means a scale of 1 (ComfyUI's reading, and kohya's alpha = rank default)."""
    return 1.0 if alpha is None else float(alpha) / rank


def _tucker(core: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """A Tucker-factored convolution: core (r1, r2, kh, kw), rows (r1, out), columns (r2, in) ->
    (out, in · kh · kw): out[o, i, k] = Σ core[a, b, k] · rows[a, o] · columns[b, i]."""
    full = torch.einsum("abhw,ao,bi->oihw", _f32(core), _f32(rows), _f32(columns))
    return full.flatten(1)


def _lora(t: Tensors, alpha: float | None) -> Delta:
    """LoRA / LoCon: down (r, in[, kh, kw]), up (out, r[, 1, 1]); with Tucker, down (r, in, 1, 1) and
    mid (r, r, kh, kw), folded into down as Σ_b mid[a, b, k] · down[b, i]."""
    down, up = _f32(t["lora_down"]), _f32(t["lora_up"])
    rank = down.shape[0]
    if "lora_mid" in t:
        down = torch.einsum("abhw,bi->aihw", _f32(t["lora_mid"]), down.flatten(1)).flatten(1)
    return Delta("product", (up.flatten(1), down.flatten(1)), _scale(alpha, rank))


def _lokr_factor(t: Tensors, name: str) -> tuple[torch.Tensor, int | None]:
    """One Kronecker factor as a 2-D matrix (rows, columns · kh · kw), and its rank when low-rank.
    Tucker (`lokr_t2`): t2 (r, r, kh, kw), w2_a (r, b), w2_b (r, d)."""
    if name in t:
        return _f32(t[name]).flatten(1), None
    a, b = _f32(t[name + "_a"]), _f32(t[name + "_b"])
    if name == "lokr_w2" and "lokr_t2" in t:
        return _tucker(t["lokr_t2"], a, b), b.shape[0]
    return a @ b.flatten(1), b.shape[0]


def _lokr(t: Tensors, alpha: float | None) -> Delta:
    w1, rank1 = _lokr_factor(t, "lokr_w1")
    w2, rank2 = _lokr_factor(t, "lokr_w2")
    rank = rank2 if rank2 is not None else rank1  # ComfyUI: the second factor's rank when both are low-rank
    return Delta("kron", (w1, w2), 1.0 if rank is None else _scale(alpha, rank))


def _loha(t: Tensors, alpha: float | None) -> Delta:
    """LoHa: (w1_a @ w1_b) ⊙ (w2_a @ w2_b); with Tucker, each side t (r, r, kh, kw), _a (r, out), _b (r, in)."""
    sides = []
    for side in ("1", "2"):
        a, b = _f32(t[f"hada_w{side}_a"]), _f32(t[f"hada_w{side}_b"])
        core = t.get(f"hada_t{side}")
        sides.append(_tucker(core, a, b) if core is not None else a.flatten(1) @ b.flatten(1))
    return Delta("dense", (sides[0] * sides[1],), _scale(alpha, t["hada_w1_b"].shape[0]))


def _diff(t: Tensors, alpha: float | None) -> Delta:
    return Delta("dense", (_f32(t["diff"]).flatten(1),), 1.0)


# Algorithm -> how its tensors rebuild into a Delta.
REBUILD: dict[str, Callable[[Tensors, float | None], Delta]] = {
    "lora": _lora, "lokr": _lokr, "loha": _loha, "diff": _diff,
}


def rebuild(algorithm: str, tensors: Tensors, alpha: float | None) -> Delta:
    """The module's weight change as a `Delta` (factors, not yet multiplied out)."""
    try:
        return REBUILD[algorithm](tensors, alpha)
    except KeyError as e:
        if algorithm not in REBUILD:
            raise LineageError(f"unknown adapter algorithm {algorithm!r}; known: {', '.join(REBUILD)}") from None
        raise LineageError(f"a {algorithm} module needs a {e.args[0]} tensor") from None


def module_delta(algorithm: str, tensors: Tensors, alpha: float | None, shape: tuple[int, ...]) -> torch.Tensor:
    """The module's delta in fp32 and in the weight's `shape` (strength 1; DoRA's magnitude, which
    depends on the weight, is `add_delta_`'s)."""
    delta = rebuild(algorithm, tensors, alpha)
    require_fits(delta, algorithm, shape)
    return delta.matrix().reshape(shape)


def add_to_matrix_(weight: torch.Tensor, delta: Delta, strength: float) -> None:
    """weight (2-D fp32, out x in · kh · kw) += strength · delta, without building up @ down or the
    Kronecker product beside it."""
    from .kernels import add_kron_, add_lora_

    scale = strength * delta.scale
    if delta.kind == "product":
        add_lora_(weight, delta.factors[0], delta.factors[1], scale)
    elif delta.kind == "kron":
        add_kron_(weight, delta.factors[0], delta.factors[1], scale)
    else:
        weight.add_(delta.factors[0], alpha=scale)


def _dora_(weight: torch.Tensor, delta: Delta, dora_scale: torch.Tensor, strength: float) -> None:
    """DoRA as ComfyUI applies it: W' = (W + ΔW) · m / ‖W + ΔW‖, then W + strength · (W' − W). The norm
    runs over each input channel (kohya's and LyCORIS' default: `dora_scale` (1, in[, 1, 1])) or, when
    `dora_scale` holds one value per output row (LyCORIS' wd_on_out, PEFT's magnitude), over each row."""
    rows, columns = weight.shape
    magnitude = _f32(dora_scale)
    merged = weight.clone()
    add_to_matrix_(merged, delta, 1.0)
    per_input = magnitude.dim() >= 2 and magnitude.shape[0] == 1 and rows != 1
    if per_input:  # one norm per input channel, over the output rows and the kernel
        channels = magnitude.numel()
        if columns % channels:
            raise LineageError(f"dora_scale {list(dora_scale.shape)} does not fit a {rows}x{columns} weight")
        kernel = columns // channels
        norm = merged.view(rows, channels, kernel).norm(dim=(0, 2)).repeat_interleave(kernel)
        factor = magnitude.reshape(-1).repeat_interleave(kernel) / norm
        merged.mul_(factor)
    else:
        if magnitude.numel() != rows:
            raise LineageError(f"dora_scale {list(dora_scale.shape)} does not fit a {rows}x{columns} weight")
        merged.mul_((magnitude.reshape(-1) / merged.norm(dim=1)).unsqueeze(1))
    weight.add_(merged.sub_(weight), alpha=strength)


def require_fits(delta: Delta, algorithm: str, shape: tuple[int, ...]) -> None:
    """Fail unless `delta` rebuilds a weight of `shape` (as a matrix: out x in · kh · kw)."""
    if delta.shape != (shape[0], math.prod(shape[1:])):
        raise LineageError(f"the {algorithm} factors rebuild a {delta.shape[0]}x{delta.shape[1]} weight, "
                           f"not {'x'.join(map(str, shape))}")


def add_delta_(weight: torch.Tensor, delta: Delta, strength: float, dora_scale: torch.Tensor | None = None) -> None:
    """weight (fp32, the module's shape) += strength · `delta` (`rebuild`'s), in place; with a `dora_scale`,
    DoRA's re-normalised weight at that strength instead."""
    require_fits(delta, delta.kind, weight.shape)
    matrix = weight.view(weight.shape[0], -1)
    if dora_scale is not None:
        _dora_(matrix, delta, dora_scale, strength)
    else:
        add_to_matrix_(matrix, delta, strength)
