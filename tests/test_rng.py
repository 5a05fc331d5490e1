"""The counter-based RNG behind the random merge methods (merge/rng.py)."""
from __future__ import annotations

import pytest
import torch

from lineage.merge import rng


def reference_uniform(seed: int, stream: int, index: int) -> float:
    """The formula of rng's docstring, in plain Python integers."""
    def mix32(x: int) -> int:
        x ^= x >> 16
        x = (x * 0x21F0AAAD) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x735A2D97) & 0xFFFFFFFF
        return x ^ (x >> 15)

    def splitmix64(x: int) -> int:
        x = (x + 0x9E3779B97F4A7C15) % 2**64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) % 2**64
        return x ^ (x >> 31)

    key = splitmix64(splitmix64(seed % 2**64) ^ stream)
    k0, k1 = key % 2**32, key >> 32
    return (mix32(mix32(index ^ k0) ^ k1) >> 8) / 2**24


@pytest.mark.parametrize("seed, stream", [(0, 1), (2024, 3), (2**63 - 1, 2), (-5, 1)])
def test_uniform_matches_the_documented_formula(seed, stream):
    indices = [0, 1, 2, 65535, 65536, 70001]
    u = rng.uniform(seed, stream, 70002)
    assert [u[i].item() for i in indices] == [reference_uniform(seed, stream, i) for i in indices]


def test_an_element_depends_only_on_its_index_not_on_the_length():
    assert torch.equal(rng.uniform(7, 1, 1000), rng.uniform(7, 1, 200_000)[:1000])


def test_uniform_values_are_on_the_24_bit_grid_in_the_unit_interval():
    u = rng.uniform(1, 1, 1 << 16)
    assert u.dtype == torch.float32 and 0 <= u.min() and u.max() < 1
    scaled = u.double() * 2**24
    assert torch.equal(scaled, scaled.floor())


def test_uniform_is_uniform_and_uncorrelated():
    n = 1 << 20
    u = rng.uniform(99, 1, n)
    counts = torch.histc(u, bins=64, min=0, max=1)
    chi2 = (((counts - n / 64) ** 2) / (n / 64)).sum().item()
    assert chi2 < 120  # 63 degrees of freedom: p < 1e-5 above ~120
    assert abs(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1].item()) < 0.005
    for other in (rng.uniform(100, 1, n), rng.uniform(99, 2, n)):  # next seed, next stream
        assert abs(torch.corrcoef(torch.stack([u, other]))[0, 1].item()) < 0.005


def test_keep_mask_takes_a_scalar_or_a_per_entry_probability():
    mask = rng.keep_mask(3, 1, (512, 512), 0.25)
    assert mask.shape == (512, 512) and mask.dtype == torch.float32
    assert abs(mask.mean().item() - 0.25) < 0.005
    p = torch.linspace(0, 1, 512).expand(512, 512)
    rate = rng.keep_mask(3, 1, (512, 512), p).mean(dim=0)
    assert rate[0] == 0 and rate[-1] == 1 and abs(rate[256].item() - 0.5) < 0.1
