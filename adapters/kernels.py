"""Adding an adapter's low-rank or Kronecker delta to a weight in place (docs/adapters.md, "Kernels").

Two operations, used by apply, resize and merge planners alike:

- `add_lora_(weight, up, down, scale)`: weight += scale·(up @ down), up (out, r), down (r, in);
- `add_kron_(weight, w1, w2, scale)`: weight += scale·kron(w1, w2), w1 (a, c), w2 (b, d), weight (a·b, c·d).

Both accumulate in fp32 whatever the dtypes, and round once into the weight's dtype. The torch code
here is the reference and the CPU path.
"""
from __future__ import annotations

from collections.abc import Callable

from lineage.errors import LineageError
from lineage.lazy import torch


def add_lora_(weight: torch.Tensor, up: torch.Tensor, down: torch.Tensor, scale: float) -> None:
    """weight += scale·(up @ down), in place, accumulated in fp32."""
    _check_matrices(weight=weight, up=up, down=down)
    (rows, columns), (up_rows, rank), (down_rank, down_columns) = weight.shape, up.shape, down.shape
    if up_rows != rows or down_columns != columns or down_rank != rank:
        raise LineageError(f"LoRA factors up {tuple(up.shape)} @ down {tuple(down.shape)} do not make the weight's "
                           f"shape {tuple(weight.shape)}")
    _accumulate(weight, lambda target: target.addmm_(up.float(), down.float(), alpha=scale))


def add_kron_(weight: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, scale: float) -> None:
    """weight += scale·kron(w1, w2), in place, accumulated in fp32."""
    _check_matrices(weight=weight, w1=w1, w2=w2)
    (a, c), (b, d) = w1.shape, w2.shape
    if a * b != weight.shape[0] or c * d != weight.shape[1]:
        raise LineageError(f"kron(w1 {tuple(w1.shape)}, w2 {tuple(w2.shape)}) has shape ({a * b}, {c * d}), "
                           f"not the weight's shape {tuple(weight.shape)}")

    def add(target: torch.Tensor) -> None:
        # kron(w1, w2)[i·b + k, j·d + l] = w1[i, j]·w2[k, l]: the weight seen as (a, b, c, d) takes the
        # broadcast outer product, so no (a·b, c·d) Kronecker matrix is built beside the one temporary.
        blocks = target.view(a, b, c, d)
        blocks.add_(w1.float()[:, None, :, None] * w2.float()[None, :, None, :], alpha=scale)

    _accumulate(weight, add)


def _check_matrices(**tensors: torch.Tensor) -> None:
    """Every tensor 2-D, on the weight's device, the weight floating point."""
    weight = tensors["weight"]
    for name, tensor in tensors.items():
        if tensor.dim() != 2:
            raise LineageError(f"{name} must be a matrix, got shape {tuple(tensor.shape)}")
        if tensor.device != weight.device:
            raise LineageError(f"{name} is on {tensor.device}, the weight on {weight.device}")
    if not weight.is_floating_point():
        raise LineageError(f"the weight must be floating point, got {weight.dtype}")


def _accumulate(weight: torch.Tensor, add: Callable[[torch.Tensor], None]) -> None:
    """Run `add` on the weight itself when it is fp32 and contiguous, else on an fp32 contiguous copy
    (fp16/bf16 weights, non-contiguous views) that is rounded back into the weight once."""
    if weight.dtype == torch.float32 and weight.is_contiguous():
        add(weight)
        return
    work = weight.to(torch.float32).contiguous()  # a copy: a different dtype or a different layout
    add(work)
    weight.copy_(work)
