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


def stored_pair(numel: int, seed: int = 0, zero_share: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """A base and a fine-tune as stored in fp16 (many tied magnitudes), some entries unchanged."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(numel, generator=g) * 0.01).half()
    model = (base.float() + torch.randn(numel, generator=g) * 1e-3 * torch.linspace(0.2, 3, numel)).half()
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


def test_several_models_and_counts_in_one_call_and_the_inputs_are_untouched():
    base, first = stored_pair(800_000, seed=1)
    _, second = stored_pair(800_000, seed=2)
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
    bracket = ranking._bracket
    monkeypatch.setattr(ranking, "_bracket", lambda sample, numel, count, sigmas: bracket(
        sample, numel, count, sigmas) if math.isinf(sigmas) else ranking._Bracket(count, *next(misses)))
    passes = []
    scan = ranking._scan
    monkeypatch.setattr(ranking, "_scan", lambda *a: (passes.append(1), scan(*a)))
    for count in (1000, 200_000, 900_000):
        passes.clear()
        assert ranking.kth_largest_magnitudes(base, [model], lambda n: [count]) == \
            [[whole_tensor_kth_largest(base, model, count)]]
        assert len(passes) == 3  # two misses, then every entry


@pytest.mark.parametrize("dtype, counted", [(torch.float16, False), (torch.bfloat16, True)])
def test_brackets_whose_ends_are_shared_by_many_entries_count_them_and_stay_exact(monkeypatch, dtype, counted):
    """bf16 differences take few distinct values: at the larger shares' cuts the entries equal to a
    bracket's ends outnumber those between them, so the ends are counted, not collected; the
    fp16 ones here never do. Either way the answer is exact."""
    base, model = (x.to(dtype) for x in stored_pair(1_500_000, seed=7))
    made = []
    bracket = ranking._bracket
    monkeypatch.setattr(ranking, "_bracket", lambda *a: made.append(bracket(*a)) or made[-1])
    for share in (0.01, 0.2, 0.5, 0.9):
        count = round(share * base.numel())
        assert ranking.kth_largest_magnitudes(base, [model], lambda n: [count]) == \
            [[whole_tensor_kth_largest(base, model, count)]], share
    assert any(b.count_ends for b in made) == counted  # bf16: at the larger shares' cuts


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
