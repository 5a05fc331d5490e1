"""Adding an adapter's low-rank or Kronecker delta to a weight in place (docs/adapters.md, "Kernels").

Two operations, used by apply, resize and merge planners alike:

- `add_lora_(weight, up, down, scale)`: weight += scale·(up @ down), up (out, r), down (r, in);
- `add_kron_(weight, w1, w2, scale)`: weight += scale·kron(w1, w2), w1 (a, c), w2 (b, d), weight (a·b, c·d).

Both accumulate in fp32 whatever the dtypes, and round once into the weight's dtype. The torch code
here is the reference and the CPU path; for CUDA tensors (and triton importable: the `cuda` extra) the
same operations run as Triton kernels that read and write each weight tile once:

- LoRA: a GEMM over the weight's tiles whose epilogue adds the weight. Each program accumulates
  up-tile @ down-tile over the rank in fp32 (fp16 factors multiply on the tensor cores, since the
  product of two fp16 numbers is exact in fp32; other factors are converted to fp32 and multiplied
  in IEEE fp32, not TF32), then loads its weight tile, adds, and stores it in the weight's dtype.
- LoKr: each weight tile computes its own Kronecker entries, w1[i // b, j // d]·w2[i % b, j % d],
  from addresses computed arithmetically (small w1, w2 stay in cache), so the product is never built.

The kernels take the weight's strides, so a row slice (the OpenCLIP-G q/k/v split) or any other view
is updated where it lies. Tests run them on CPU tensors under TRITON_INTERPRET=1.
"""
from __future__ import annotations

from collections.abc import Callable

from lineage.errors import LineageError
from lineage.lazy import torch
from lineage.merge.kernels import use_kernels

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU path needs torch only
    triton = None

TILE = 64  # weight rows and columns per program instance
MAX_RANK_STEP = 64  # rank slice multiplied per step of the LoRA kernel


def add_lora_(weight: torch.Tensor, up: torch.Tensor, down: torch.Tensor, scale: float) -> None:
    """weight += scale·(up @ down), in place, accumulated in fp32."""
    _check_matrices(weight=weight, up=up, down=down)
    (rows, columns), (up_rows, rank), (down_rank, down_columns) = weight.shape, up.shape, down.shape
    if up_rows != rows or down_columns != columns or down_rank != rank:
        raise LineageError(f"LoRA factors up {tuple(up.shape)} @ down {tuple(down.shape)} do not make the weight's "
                           f"shape {tuple(weight.shape)}")
    if use_kernels(weight, up, down):
        _add_lora_triton(weight, up, down, float(scale))
    else:
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

    if use_kernels(weight, w1, w2):
        _add_kron_triton(weight, w1, w2, float(scale))
    else:
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


def _tiles(weight: torch.Tensor) -> tuple[int, int]:
    return triton.cdiv(weight.shape[0], TILE), triton.cdiv(weight.shape[1], TILE)


def _add_lora_triton(weight: torch.Tensor, up: torch.Tensor, down: torch.Tensor, scale: float) -> None:
    if weight.numel() == 0:
        return
    rank = up.shape[1]
    # tl.dot needs every block dimension >= 16: a smaller rank is padded with masked zeros.
    rank_step = min(MAX_RANK_STEP, max(16, triton.next_power_of_2(rank)))
    fp16_dot = up.dtype == down.dtype == torch.float16
    _lora_kernel[_tiles(weight)](weight, up, down, scale, *weight.shape, rank, *weight.stride(), *up.stride(),
                                 *down.stride(), TILE=TILE, RANK_STEP=rank_step, FP16_DOT=fp16_dot)


def _add_kron_triton(weight: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, scale: float) -> None:
    if weight.numel() == 0:
        return
    _kron_kernel[_tiles(weight)](weight, w1, w2, scale, *weight.shape, *w2.shape, *weight.stride(), *w1.stride(),
                                 *w2.stride(), TILE=TILE)


if triton is not None:

    @triton.jit
    def _weight_tile(weight_ptr, rows, columns, stride_row, stride_column, TILE: tl.constexpr):
        """This program's tile: row and column indices, their mask, and the weight's addresses."""
        row = tl.program_id(0).to(tl.int64) * TILE + tl.arange(0, TILE)
        column = tl.program_id(1).to(tl.int64) * TILE + tl.arange(0, TILE)
        inside = (row[:, None] < rows) & (column[None, :] < columns)
        return row, column, inside, weight_ptr + row[:, None] * stride_row + column[None, :] * stride_column

    @triton.jit
    def _add_to_tile(pointers, inside, delta, scale):
        # The epilogue: the weight read once, the sum in fp32, one rounding into the weight's dtype.
        total = tl.load(pointers, mask=inside).to(tl.float32) + scale * delta
        tl.store(pointers, total.to(pointers.dtype.element_ty), mask=inside)

    @triton.jit
    def _lora_kernel(weight_ptr, up_ptr, down_ptr, scale, rows, columns, rank, stride_wr, stride_wc,
                     stride_ur, stride_uk, stride_dk, stride_dc,
                     TILE: tl.constexpr, RANK_STEP: tl.constexpr, FP16_DOT: tl.constexpr):
        row, column, inside, pointers = _weight_tile(weight_ptr, rows, columns, stride_wr, stride_wc, TILE)
        delta = tl.zeros((TILE, TILE), tl.float32)
        for start in range(0, rank, RANK_STEP):
            k = start + tl.arange(0, RANK_STEP)
            up = tl.load(up_ptr + row[:, None] * stride_ur + k[None, :] * stride_uk,
                         mask=(row[:, None] < rows) & (k[None, :] < rank), other=0.0)
            down = tl.load(down_ptr + k[:, None] * stride_dk + column[None, :] * stride_dc,
                           mask=(k[:, None] < rank) & (column[None, :] < columns), other=0.0)
            if FP16_DOT:
                delta = tl.dot(up, down, delta)
            else:  # bf16 and fp32 factors: converted exactly to fp32, multiplied without TF32
                delta = tl.dot(up.to(tl.float32), down.to(tl.float32), delta, input_precision="ieee")
        _add_to_tile(pointers, inside, delta, scale)

    @triton.jit
    def _kron_kernel(weight_ptr, w1_ptr, w2_ptr, scale, rows, columns, b, d, stride_wr, stride_wc,
                     stride_1r, stride_1c, stride_2r, stride_2c, TILE: tl.constexpr):
        row, column, inside, pointers = _weight_tile(weight_ptr, rows, columns, stride_wr, stride_wc, TILE)
        w1 = tl.load(w1_ptr + (row // b)[:, None] * stride_1r + (column // d)[None, :] * stride_1c, mask=inside)
        w2 = tl.load(w2_ptr + (row % b)[:, None] * stride_2r + (column % d)[None, :] * stride_2c, mask=inside)
        _add_to_tile(pointers, inside, w1.to(tl.float32) * w2.to(tl.float32), scale)
