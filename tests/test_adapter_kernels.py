"""adapters/kernels.py: an adapter's delta added to a weight in place, in fp32.

The torch path (the CPU path and the reference) is tested directly. The Triton kernels are tested against
it on CPU tensors by Triton's interpreter, which must be chosen before triton is first imported: as in
tests/test_kernels.py, `test_triton_kernels_under_the_interpreter` runs this file again in a child pytest
with TRITON_INTERPRET=1, where the tests marked `interpreted` run.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lineage.adapters import kernels
from lineage.errors import LineageError

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(not INTERPRETED, reason="run by test_triton_kernels_under_the_interpreter")
REPO = Path(__file__).resolve().parents[1]


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


def test_the_torch_path_runs_without_triton():
    script = ("import sys; sys.modules['triton'] = None  # makes `import triton` fail\n"
              "import torch\n"
              "from lineage.adapters import kernels\n"
              "assert kernels.triton is None\n"
              "w = torch.zeros(4, 6)\n"
              "kernels.add_lora_(w, torch.ones(4, 1), torch.ones(1, 6), 2.0)\n"
              "kernels.add_kron_(w, torch.ones(2, 3), torch.ones(2, 2), 0.5)\n"
              "print(w.unique().tolist())\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[2.5]"


@pytest.mark.skipif(INTERPRETED, reason="this is the child run")
def test_triton_kernels_under_the_interpreter():
    pytest.importorskip("triton")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-o", "addopts=", "-p", "no:cacheprovider", __file__,
                             "-k", "triton_kernel"], cwd=REPO, env={**os.environ, "TRITON_INTERPRET": "1"},
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert re.search(r"\b\d+ passed, 1 skipped\b", result.stdout), result.stdout  # only the launcher skipped


# ---------------------------------------------------------------------------------------------
# In the child run: the kernels against the torch path on the same inputs


@pytest.fixture
def with_triton(monkeypatch):
    """Run an add_* function through the Triton kernel on CPU tensors (the interpreter) and through torch."""
    def run(add, weight: torch.Tensor, *factors: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        reference = weight.clone()
        add(reference, *factors, scale)
        with monkeypatch.context() as patch:
            patch.setattr(kernels, "use_kernels", lambda *_: True)
            add(weight, *factors, scale)
        return weight, reference
    return run


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows, rank, columns", [(70, 1, 130), (64, 16, 64), (5, 3, 1), (1, 80, 65)])
def test_lora_triton_kernel_matches_the_torch_path(with_triton, dtype, rows, rank, columns):
    """Edges that are not multiples of the 64-wide tile, rank 1, a rank above the 64-wide rank step."""
    weight, up, down = randn(rows, columns, dtype=dtype), randn(rows, rank, seed=1), randn(rank, columns, seed=2)
    out, reference = with_triton(kernels.add_lora_, weight, up, down, scale=0.8)
    assert out.dtype == dtype
    if dtype == torch.float32:
        assert torch.allclose(out, reference, rtol=1e-5, atol=1e-5)
    else:  # one rounding of nearly the same fp32 sum: equal, or one unit in the last place apart
        assert torch.allclose(out.float(), reference.float(), rtol=torch.finfo(dtype).eps, atol=1e-5)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lora_triton_kernel_multiplies_low_precision_factors_exactly(with_triton, dtype):
    weight = randn(40, 50, dtype=torch.float16)
    up, down = randn(40, 4, seed=1, dtype=dtype), randn(4, 50, seed=2, dtype=dtype)
    out, reference = with_triton(kernels.add_lora_, weight, up, down, scale=1.0)
    assert torch.allclose(out.float(), reference.float(), rtol=torch.finfo(torch.float16).eps, atol=1e-6)


@interpreted
def test_lora_triton_kernel_writes_through_a_view_only():
    full = randn(100, 70)
    before = full.clone()
    up, down = randn(40, 2, seed=1), randn(2, 30, seed=2)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kernels, "use_kernels", lambda *_: True)
        kernels.add_lora_(full[30:70, 10:40], up, down, 1.0)
    expected = before.clone()
    expected[30:70, 10:40] += up @ down
    assert torch.allclose(full, expected, atol=1e-5)
    outside = torch.ones_like(full, dtype=torch.bool)
    outside[30:70, 10:40] = False
    assert torch.equal(full[outside], before[outside])


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("w1_shape, w2_shape", [((4, 4), (20, 33)), ((1, 1), (70, 3)), ((7, 65), (1, 1)),
                                                ((3, 2), (5, 40))])
def test_kron_triton_kernel_matches_the_torch_path(with_triton, dtype, w1_shape, w2_shape):
    w1, w2 = randn(*w1_shape, seed=1), randn(*w2_shape, seed=2, dtype=dtype)
    weight = randn(w1_shape[0] * w2_shape[0], w1_shape[1] * w2_shape[1], dtype=dtype)
    out, reference = with_triton(kernels.add_kron_, weight, w1, w2, scale=-0.6)
    assert out.dtype == dtype
    # Each entry is one product added in fp32 on both paths (fused or not): at most an ulp apart.
    assert torch.allclose(out.float(), reference.float(), rtol=torch.finfo(dtype).eps, atol=1e-6)


@interpreted
def test_triton_kernels_accept_empty_weights(with_triton):
    out, reference = with_triton(kernels.add_lora_, torch.zeros(0, 5), torch.zeros(0, 2), torch.zeros(2, 5), scale=1.0)
    assert out.shape == (0, 5)
