"""The compiled CPU loops of merge/cpu_loops.py against the torch reference in merge/methods.py
(ranking's bracket scan is held to exact order statistics by tests/test_ranking.py)."""
from __future__ import annotations

import pytest
import torch

from lineage.merge import methods


def models_over_a_base(count: int, numel: int = 50_000, seed: int = 0, integers: bool = False) -> list[torch.Tensor]:
    """A base and `count` fine-tunes, stored as fp16 and read as fp32 as merges read them; integer
    deltas make many magnitude ties and exact cancellations in the sign election."""
    g = torch.Generator().manual_seed(seed)
    base = (0.02 * torch.randn(numel, generator=g)).half().float()
    if integers:
        return [base] + [base + torch.randint(-3, 4, (numel,), generator=g).float() for _ in range(count)]
    return [base] + [(base + 0.002 * torch.randn(numel, generator=g)).half().float() for _ in range(count)]


def ties_both_ways(monkeypatch, tensors, **params) -> tuple[torch.Tensor, torch.Tensor]:
    """(the loops' result, the torch reference's) for the same call."""
    assert methods.use_cpu_loops(*tensors)
    loops = methods.ties(*tensors, **params)
    with monkeypatch.context() as patch:
        patch.setattr(methods, "use_cpu_loops", lambda *_: False)
        return loops, methods.ties(*tensors, **params)


def assert_same_up_to_rounding(loops: torch.Tensor, reference: torch.Tensor) -> None:
    assert torch.equal(loops.isnan(), reference.isnan()) and torch.equal(loops.isinf(), reference.isinf())
    finite = torch.isfinite(reference)
    # torch fuses multiply-adds (add with alpha, addcmul, addcdiv); the loops round each step: a unit or
    # two in the last place apart (the Triton kernels' tolerance).
    assert torch.allclose(loops[finite], reference[finite], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("count, density, integers, weights", [
    (1, 0.2, False, None), (2, 0.2, False, [1.0, 2.0]), (3, 0.5, True, [1.0, 2.0, 3.0]),
    (4, 0.3, True, None), (2, 1.0, True, [0.5, 1.5]), (2, 0.0, False, None),
])
def test_ties_loops_match_the_torch_reference(monkeypatch, count, density, integers, weights):
    tensors = models_over_a_base(count, integers=integers)
    loops, reference = ties_both_ways(monkeypatch, tensors, weights=weights, density=density, alpha=0.9)
    assert loops.dtype == torch.float32 and loops.shape == reference.shape
    assert_same_up_to_rounding(loops, reference)


def test_ties_loops_follow_the_non_finite_rule(monkeypatch):
    """NaN and ±Inf deltas are dropped (they take no slot and add nothing); a NaN or Inf base stays."""
    base, *models = models_over_a_base(2)
    models[0][::7] = float("nan")
    models[1][::11] = float("inf")
    models[1][::13] = float("-inf")
    base[::17] = float("nan")
    base[5::19] = float("inf")
    loops, reference = ties_both_ways(monkeypatch, [base, *models], density=0.3)
    assert_same_up_to_rounding(loops, reference)
    assert torch.equal(loops.isnan(), base.isnan()) and torch.equal(loops.isinf(), base.isinf())


def test_ties_loops_take_any_shape_and_leave_the_inputs_alone(monkeypatch):
    tensors = [t.reshape(10, 50, 100) for t in models_over_a_base(2)]
    copies = [t.clone() for t in tensors]
    loops, reference = ties_both_ways(monkeypatch, tensors, density=0.2)
    assert loops.shape == (10, 50, 100)
    assert_same_up_to_rounding(loops, reference)
    assert all(torch.equal(t, c) for t, c in zip(tensors, copies))


def test_other_dtypes_take_the_torch_code():
    half = [t.half() for t in models_over_a_base(2, numel=100)]
    assert not methods.use_cpu_loops(*half)
    assert methods.ties(*half, density=0.5).dtype == torch.float16


@pytest.mark.parametrize("dtype, base_dtype", [(torch.float16, torch.bfloat16), (torch.bfloat16, torch.float32)])
def test_the_thresholds_pass_reads_every_stored_value_exactly(dtype, base_dtype):
    """count_magnitudes reads fp16 and bf16 as stored (their bits): over every one of the 65,536 bit
    patterns (subnormals, ±0, ±Inf, NaNs) against a base in another dtype, for a bracket of one pattern
    at each distinct finite magnitude, the count above it and the count at it equal torch's."""
    import numpy as np

    from lineage.merge import cpu_loops, ranking

    model = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    base = torch.linspace(-1.0, 1.0, model.numel()).to(base_dtype)
    magnitudes = (model.float() - base.float()).abs()
    finite = magnitudes[torch.isfinite(magnitudes) & (magnitudes <= ranking.FLOAT32_MAX)]
    values = torch.unique(finite)[::7]  # a few thousand brackets, from 0 up to the largest magnitude
    patterns = values.view(torch.int32).numpy().astype(np.int64)
    k = patterns.size
    above, counts = np.zeros(k, dtype=np.int64), np.zeros((k, 1), dtype=np.int64)
    lowest, highest = np.zeros((k, 1), dtype=np.int32), np.zeros((k, 1), dtype=np.int32)
    cpu_loops.count_magnitudes(cpu_loops.stored_bits(base), cpu_loops.stored_models([model]),
                               np.zeros(k, dtype=np.int64), patterns, patterns, np.zeros(k, dtype=np.int64),
                               above, counts, np.zeros((k, 1), dtype=np.int64), lowest, highest)
    assert above.tolist() == [int((finite > v).sum()) for v in values]
    assert counts[:, 0].tolist() == [int((finite == v).sum()) for v in values]


def test_ties_into_refuses_an_output_it_would_only_write_a_copy_of():
    from lineage.merge import cpu_loops

    base, *models = models_over_a_base(2, numel=100)
    with pytest.raises(ValueError, match="not torch.float64"):
        cpu_loops.ties_into(torch.empty(100, dtype=torch.float64), base, models, [0.0, 0.0], [1.0, 1.0], 1.0)
