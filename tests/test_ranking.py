"""Exact magnitude order statistics (merge/ranking.py) against torch.kthvalue over whole tensors."""
from __future__ import annotations

import math

import pytest
import torch

from lineage.merge import ranking


def whole_tensor_kth_largest(base: torch.Tensor, model: torch.Tensor, count: int) -> float:
    """The reference: torch.kthvalue over every finite |model − base| (the module's conventions for
    count 0 and for more than the finite entries)."""
    magnitudes = (model.float() - base.float()).abs()
    magnitudes = magnitudes[torch.isfinite(magnitudes)]
    if count == 0:
        return math.inf
    if count > magnitudes.numel():
        return 0.0
    return torch.kthvalue(magnitudes, magnitudes.numel() - count + 1).values.item()


def stored_pair(numel: int, seed: int = 0, zero_share: float = 0.0,
                dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, torch.Tensor]:
    """A base and a fine-tune as stored (in fp16: many tied magnitudes), some entries unchanged."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(numel, generator=g) * 0.01).to(dtype)
    model = (base.float() + torch.randn(numel, generator=g) * 1e-3 * torch.linspace(0.2, 3, numel)).to(dtype)
    unchanged = torch.rand(numel, generator=g) < zero_share
    model[unchanged] = base[unchanged]
    return base, model


@pytest.mark.parametrize("numel", [1, 1000, ranking.SAMPLE_SIZE, ranking.SAMPLE_SIZE + 1, 1_500_000])
@pytest.mark.parametrize("share", [0.0, 1e-5, 0.01, 0.2, 0.5, 0.97, 1.0])
def test_every_order_statistic_is_exact(numel, share):
    base, model = stored_pair(numel, seed=numel, zero_share=0.3)
    count = round(share * numel)
    found = ranking.kth_largest_magnitudes(base, [model], lambda n: [count])
    assert found == [[whole_tensor_kth_largest(base, model, count)]]


@pytest.mark.parametrize("second_dtype", [torch.float16, torch.bfloat16])  # a fine-tune of each dtype, too
def test_several_models_and_counts_in_one_call_and_the_inputs_are_untouched(second_dtype):
    base, first = stored_pair(800_000, seed=1)
    second = stored_pair(800_000, seed=2)[1].to(second_dtype)
    copies = [x.clone() for x in (base, first, second)]
    counts = [0, 1, 8000, 160_000, 799_999, 800_000]
    found = ranking.kth_largest_magnitudes(base, [first, second], lambda n: counts)
    assert found == [[whole_tensor_kth_largest(base, m, c) for c in counts] for m in (first, second)]
    assert all(torch.equal(x, c) for x, c in zip((base, first, second), copies))


def test_a_missed_bracket_falls_back_and_stays_exact(monkeypatch):
    """When the counts show the answer outside a bracket (here: brackets made to miss, above and
    then below the answer), the pass is repeated, in the end over every entry: still exact."""
    base, model = stored_pair(1_000_000, seed=3)
    largest = (model.float() - base.float()).abs().max().item()
    misses = iter([(largest, largest), (0.0, 0.0)] * 3)  # answer below the first, above the second
    search = ranking._search
    monkeypatch.setattr(ranking, "_search", lambda sample, numel, count, sigmas: search(
        sample, numel, count, sigmas) if math.isinf(sigmas) else ranking._Search(
            count, *(ranking._pattern(end) for end in next(misses))))
    passes = []
    scan = ranking._scan
    monkeypatch.setattr(ranking, "_scan", lambda *a: (passes.append(1), scan(*a)))
    for count in (1000, 200_000, 900_000):
        passes.clear()
        assert ranking.kth_largest_magnitudes(base, [model], lambda n: [count]) == \
            [[whole_tensor_kth_largest(base, model, count)]]
        # two misses, then every entry (in bins of 2**13 float32 patterns), then, when the bin that
        # holds the answer holds other values too, that bin
        assert len(passes) in (3, 4)


@pytest.mark.parametrize("max_bins", [2, 64, ranking.MAX_BINS])  # (the last: as shipped)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_brackets_wider_than_the_histogram_are_narrowed_bin_by_bin_and_stay_exact(monkeypatch, max_bins, dtype):
    """A bracket holding more float32 patterns than the histogram has bins counts them in wider bins,
    then searches the bin that holds the answer: as many passes as it takes, and exact. The
    differences of bf16 and fp16 weights take few distinct values (many ties); fp32 ones many."""
    monkeypatch.setattr(ranking, "MAX_BINS", max_bins)
    base, model = stored_pair(1_500_000, seed=7, dtype=dtype)
    passes = []
    scan = ranking._scan
    monkeypatch.setattr(ranking, "_scan", lambda *a: (passes.append(1), scan(*a)))
    for share in (0.01, 0.2, 0.5, 0.9):
        count = round(share * base.numel())
        assert ranking.kth_largest_magnitudes(base, [model], lambda n: [count]) == \
            [[whole_tensor_kth_largest(base, model, count)]], share
    if max_bins == 2:
        assert len(passes) > 4 * 4  # each answer narrowed down over several passes
    if max_bins >= 1 << 18 and dtype != torch.float32:
        assert len(passes) == 4  # one pass each: half-precision weights' differences take few patterns


def test_massive_ties_and_all_zero_deltas():
    base = torch.zeros(2_000_000, dtype=torch.float16)
    assert ranking.kth_largest_magnitudes(base, [base.clone()], lambda n: [n // 5]) == [[0.0]]
    steps = torch.arange(2_000_000) % 4  # magnitudes 0, 1, 2, 3: half a million each
    for count in (1, 500_000, 500_001, 1_200_000, 2_000_000):
        assert ranking.kth_largest_magnitudes(base, [steps.half()], lambda n: [count]) == \
            [[whole_tensor_kth_largest(base, steps.half(), count)]]


def test_non_finite_magnitudes_rank_below_every_finite_one():
    base, model = stored_pair(600_000, seed=4)
    model[::97] = math.nan
    model[5::101] = math.inf
    model[9::103] = -math.inf
    finite = int(torch.isfinite(model).sum())
    for count in (1, 1000, 120_000, finite, finite + 1, 600_000):
        expected = whole_tensor_kth_largest(base, model, count)
        assert ranking.kth_largest_magnitudes(base, [model], lambda n: [count]) == [[expected]], count
    small = torch.tensor([math.nan, 2.0, math.inf, 1.0])
    assert ranking.kth_largest_magnitudes(torch.zeros(4), [small], lambda n: [1, 2, 3]) == [[2.0, 1.0, 0.0]]


def test_the_sampled_estimate_ranks_a_spread_sample():
    base, model = stored_pair(3_000_000, seed=5)
    sampled = ranking.kth_largest_magnitudes(base, [model], lambda n: [round(0.2 * n)], sampled=True)[0][0]
    exact = whole_tensor_kth_largest(base, model, 600_000)
    kept_share = ((model.float() - base.float()).abs() >= sampled).float().mean().item()
    assert sampled != exact and abs(kept_share - 0.2) < 0.003


def test_bracket_samples_grow_with_the_tensor_within_bounds():
    sizes = [ranking.bracket_sample_size(n) for n in (300_000, 3_000_000, 13_107_200, 10**9)]
    assert sizes == sorted(sizes) and sizes[-1] == ranking.SAMPLE_SIZE
    assert all(s % ranking.RUN == 0 and s >= ranking.MIN_BRACKET_SAMPLE for s in sizes)
