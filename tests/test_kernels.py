"""The Triton kernels against the torch reference, run by Triton's interpreter on CPU tensors.

Triton decides when it is first imported whether kernels are compiled or interpreted
(TRITON_INTERPRET, docs/merging.md "Triton kernels"), and the rest of the suite imports merge.kernels without it. So
`test_kernels_under_the_interpreter` runs this file again in a child pytest with TRITON_INTERPRET=1,
where the tests marked `interpreted` run (they are skipped in the parent run, and the launcher is
skipped in the child). Tensors are small: the interpreter costs about 1 ms per program instance.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lineage.merge import kernels, methods, rng

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(not INTERPRETED, reason="run by test_kernels_under_the_interpreter in a child pytest")
REPO = Path(__file__).resolve().parents[1]


def test_methods_work_without_triton():
    script = ("import sys; sys.modules['triton'] = None  # makes `import triton` fail\n"
              "import torch\n"
              "from lineage.merge import kernels, methods\n"
              "assert kernels.triton is None and not kernels.use_kernels(torch.ones(1))\n"
              "print(methods.ties(torch.zeros(3), torch.tensor([1.0, -2.0, 3.0]), density=0.5).tolist())\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[0.0, -2.0, 3.0]"


def test_kernels_are_only_chosen_for_cuda_tensors():
    assert not kernels.use_kernels(torch.ones(2), torch.ones(2))


@pytest.mark.skipif(INTERPRETED, reason="this is the child run")
def test_kernels_under_the_interpreter():
    pytest.importorskip("triton")
    command = [sys.executable, "-m", "pytest", "-q", "-o", "addopts=", "-p", "no:cacheprovider", __file__]
    result = subprocess.run(command, cwd=REPO, env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert re.search(r"\b\d+ passed, 1 skipped\b", result.stdout), result.stdout  # only the launcher skipped


# ---------------------------------------------------------------------------------------------
# In the child run


def models_over_a_base(count: int, shape=(3, 1100), seed: int = 0, integers: bool = False) -> list[torch.Tensor]:
    """A base and `count` fine-tunes; integer-valued deltas make many magnitude ties."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    def delta():
        return torch.randint(-3, 4, shape, generator=g).float() if integers else 0.1 * torch.randn(shape, generator=g)
    return [base] + [base + delta() for _ in range(count)]


@pytest.fixture
def with_kernels(monkeypatch):
    """Make the methods dispatch to the kernels for CPU tensors (the interpreter runs them)."""
    def run(name: str, *tensors: torch.Tensor, **params) -> tuple[torch.Tensor, torch.Tensor]:
        fn = methods.get_method(name).fn
        reference = fn(*tensors, **params)
        with monkeypatch.context() as patch:
            patch.setattr(kernels, "use_kernels", lambda *_: True)
            return fn(*tensors, **params), reference
    return run


@interpreted
@pytest.mark.parametrize("seed, stream, numel", [(0, 1, 1), (12345, 1, 3000), (2**63 - 1, 4, 2049), (-7, 2, 1024)])
def test_uniform_kernel_draws_the_cpu_numbers_bit_for_bit(seed, stream, numel):
    assert torch.equal(kernels.uniform(seed, stream, numel, "cpu"), rng.uniform(seed, stream, numel))


@interpreted
@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_dare_kernel_masks_are_the_cpu_masks_bit_for_bit(density):
    shape = (5, 700)
    base, ones = torch.zeros(shape), torch.ones(shape)
    for stream, weights in ((1, [1.0, 0.0]), (2, [0.0, 1.0])):  # model i draws stream i
        out = kernels.dare(base, [ones, ones], seed=77, weights=weights, density=density, alpha=1.0, elect_sign=False)
        assert torch.equal(out != 0, rng.keep_mask(77, stream, shape, density) == 1)


@interpreted
@pytest.mark.parametrize("name, count, params", [
    ("weighted_sum", 2, {"alpha": 0.3}),
    ("add_difference", 3, {"alpha": 0.7}),
    ("linear", 4, {"weights": [1.0, 2.0, 0.5, 0.5]}),
    ("task_arithmetic", 4, {"weights": [1.0, 0.5, -0.25], "alpha": 0.8}),
])
def test_linear_combination_kernel_matches_the_methods(with_kernels, name, count, params):
    tensors = models_over_a_base(count - 1)
    out, reference = with_kernels(name, *tensors, **params)
    assert out.shape == reference.shape
    assert torch.allclose(out, reference, rtol=1e-6, atol=1e-6)


@interpreted
def test_linear_combination_kernel_reads_fp16_inputs_as_fp32():
    a, b = (x.half() for x in models_over_a_base(1, shape=(1500,)))
    out = kernels.linear_combination((a, b), (0.25, 0.75))
    assert out.dtype == torch.float32
    assert torch.allclose(out, 0.25 * a.float() + 0.75 * b.float(), rtol=1e-6, atol=1e-6)


@interpreted
@pytest.mark.parametrize("count, density, integers", [(1, 0.2, False), (2, 0.2, False), (3, 0.5, True),
                                                      (4, 0.3, True), (2, 1.0, True), (2, 0.0, False)])
def test_ties_kernel_matches_the_method(with_kernels, count, density, integers):
    tensors = models_over_a_base(count, integers=integers)
    weights = [1.0 + i for i in range(count)]
    out, reference = with_kernels("ties", *tensors, weights=weights, density=density, alpha=0.9)
    assert torch.allclose(out, reference, rtol=1e-6, atol=1e-6)


@interpreted
def test_ties_kernel_on_the_2x3_example_worked_by_hand(with_kernels):
    from tests.test_methods import TIES_MERGED_DELTA, TIES_TAUS

    base = torch.full((2, 3), 10.0)
    out, _ = with_kernels("ties", base, *(base + tau for tau in TIES_TAUS), weights=[1, 1, 2], density=0.5, alpha=0.5)
    assert torch.allclose(out, base + 0.5 * TIES_MERGED_DELTA)


@interpreted
@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
@pytest.mark.parametrize("count", [1, 3])
def test_dare_kernel_matches_the_method(with_kernels, name, count):
    tensors = models_over_a_base(count)
    weights = [0.5 + i for i in range(count)]
    out, reference = with_kernels(name, *tensors, weights=weights, density=0.4, alpha=1.1, seed=2024)
    assert torch.equal(out == tensors[0], reference == tensors[0])  # the same entries left at the base
    assert torch.allclose(out, reference, rtol=1e-6, atol=1e-5)


@interpreted
def test_kernels_accept_empty_tensors():
    empty = torch.zeros(0)
    assert kernels.linear_combination((empty, empty), (0.5, 0.5)).shape == (0,)


@interpreted
@pytest.mark.parametrize("name, params", [("ties", {"density": 0.3}), ("dare_ties", {"density": 0.5, "seed": 7}),
                                          ("dare_linear", {"density": 0.5, "seed": 7})])
def test_kernels_follow_the_non_finite_rule_as_the_cpu_does(with_kernels, name, params):
    """NaN and Inf deltas take no TIES slot, dropped ones contribute nothing, kept ones stay non-finite."""
    tensors = models_over_a_base(2)
    for model, odd in zip(tensors[1:], (float("nan"), float("inf"))):
        model.view(-1)[::7] = odd
    out, reference = with_kernels(name, *tensors, **params)
    assert torch.equal(out.isnan(), reference.isnan()) and torch.equal(out.isinf(), reference.isinf())
    finite = torch.isfinite(reference)
    assert torch.allclose(out[finite], reference[finite], rtol=1e-6, atol=1e-5)
    assert finite.any() and (name == "ties") == bool(finite.all())  # TIES drops them all
