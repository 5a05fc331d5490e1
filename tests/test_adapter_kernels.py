"""adapters/kernels.py: an adapter's delta added to a weight in place, in fp32 (torch path: the CPU and reference)."""
from __future__ import annotations

import pytest
import torch

from lineage.adapters import kernels
from lineage.errors import LineageError


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("rows, rank, columns", [(7, 3, 5), (1, 1, 1), (64, 1, 33)])
def test_add_lora_adds_the_scaled_product_in_place(rows, rank, columns):
    weight, up, down = randn(rows, columns), randn(rows, rank, seed=1), randn(rank, columns, seed=2)
    expected = weight.double() + 0.75 * (up.double() @ down.double())
    storage = weight.data_ptr()
    kernels.add_lora_(weight, up, down, 0.75)
    assert weight.data_ptr() == storage
    assert torch.allclose(weight.double(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_add_lora_accumulates_in_fp32_and_rounds_once(dtype):
    weight, up, down = randn(16, 24, dtype=dtype), randn(16, 4, seed=1, dtype=dtype), randn(4, 24, seed=2, dtype=dtype)
    expected = (weight.float() + 0.5 * (up.float() @ down.float())).to(dtype)
    kernels.add_lora_(weight, up, down, 0.5)
    assert weight.dtype == dtype
    assert torch.equal(weight, expected)


def test_add_lora_into_a_row_slice_changes_only_those_rows():
    """The OpenCLIP-G q/k/v split adapts a row slice of in_proj_weight."""
    full = randn(9, 6)
    before = full.clone()
    up, down = randn(3, 2, seed=1), randn(2, 6, seed=2)
    kernels.add_lora_(full[3:6], up, down, 1.0)
    assert torch.allclose(full[3:6], before[3:6] + up @ down, atol=1e-6)
    assert torch.equal(full[:3], before[:3]) and torch.equal(full[6:], before[6:])


def test_add_lora_into_a_non_contiguous_view_writes_through_it():
    full = randn(9, 6)
    before = full.clone()
    up, down = randn(9, 1, seed=3), randn(1, 3, seed=4)
    kernels.add_lora_(full[:, 1:4], up, down, 2.0)
    assert torch.allclose(full[:, 1:4], before[:, 1:4] + 2.0 * up @ down, atol=1e-6)
    assert torch.equal(full[:, [0, 4, 5]], before[:, [0, 4, 5]])


@pytest.mark.parametrize("w1_shape, w2_shape", [((2, 3), (4, 5)), ((1, 1), (3, 3)), ((5, 4), (1, 1)), ((3, 1), (1, 7))])
def test_add_kron_adds_the_scaled_kronecker_product(w1_shape, w2_shape):
    w1, w2 = randn(*w1_shape, seed=1), randn(*w2_shape, seed=2)
    weight = randn(w1_shape[0] * w2_shape[0], w1_shape[1] * w2_shape[1])
    expected = weight.double() - 1.5 * torch.kron(w1.double(), w2.double())
    kernels.add_kron_(weight, w1, w2, -1.5)
    assert torch.allclose(weight.double(), expected, rtol=1e-6, atol=1e-6)


def test_add_kron_into_an_fp16_weight_rounds_the_fp32_sum_once():
    w1, w2 = randn(4, 2, seed=1), randn(8, 16, seed=2)
    weight = randn(32, 32, dtype=torch.float16)
    expected = (weight.float() + 0.3 * torch.kron(w1, w2)).half()
    kernels.add_kron_(weight, w1, w2, 0.3)
    assert torch.equal(weight, expected)


@pytest.mark.parametrize("call, message", [
    (lambda: kernels.add_lora_(torch.zeros(4, 5), torch.zeros(4, 2), torch.zeros(3, 5), 1.0),
     r"up \(4, 2\) @ down \(3, 5\) do not make the weight's shape \(4, 5\)"),
    (lambda: kernels.add_lora_(torch.zeros(4, 5), torch.zeros(3, 2), torch.zeros(2, 5), 1.0), r"up \(3, 2\)"),
    (lambda: kernels.add_lora_(torch.zeros(4, 5), torch.zeros(4, 2), torch.zeros(2, 6), 1.0), r"down \(2, 6\)"),
    (lambda: kernels.add_lora_(torch.zeros(4, 5, 1, 1), torch.zeros(4, 2), torch.zeros(2, 5), 1.0),
     r"weight must be a matrix, got shape \(4, 5, 1, 1\)"),
    (lambda: kernels.add_lora_(torch.zeros(4, 5), torch.zeros(4, 2, 1), torch.zeros(2, 5), 1.0), "up must be a matrix"),
    (lambda: kernels.add_lora_(torch.zeros(4, 5, dtype=torch.int32), torch.zeros(4, 2), torch.zeros(2, 5), 1.0),
     "must be floating point"),
    (lambda: kernels.add_kron_(torch.zeros(6, 6), torch.zeros(2, 3), torch.zeros(3, 3), 1.0),
     r"kron\(w1 \(2, 3\), w2 \(3, 3\)\) has shape \(6, 9\), not the weight's shape \(6, 6\)"),
    (lambda: kernels.add_kron_(torch.zeros(6, 6), torch.zeros(6), torch.zeros(1, 6), 1.0), "w1 must be a matrix"),
])
def test_shapes_that_do_not_fit_are_clear_errors(call, message):
    with pytest.raises(LineageError, match=message):
        call()
