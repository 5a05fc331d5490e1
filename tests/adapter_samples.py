"""Adapter files for tests, written straight from a checkpoint header: every algorithm and dialect the
reader takes, with random factors of the right shapes (deterministic per seed)."""
from __future__ import annotations

import math

import torch

from lineage.adapters.modules import Module, sdxl_modules
from lineage.adapters.writer import adapter_key, dialect_metadata, lora_shapes
from lineage.io.safetensors import read_header, save_file


def modules_of(base: str, conv: bool = False) -> list[Module]:
    return sdxl_modules(read_header(base)[0], conv=conv)


def lora_tensors(modules, rank=4, alpha=2.0, seed=0, dtype=torch.float16, dialect="kohya", mid=False):
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for m in modules:
        r = min(rank, m.shape[0], m.shape[1])
        shapes = lora_shapes(m, r)
        if mid and m.spatial:  # Tucker: the kernel moves from lora_down into lora_mid
            down = torch.randn(r, m.shape[1], 1, 1, generator=g)
            tensors[adapter_key(dialect, m, "lora_mid")] = torch.randn(r, r, *m.shape[2:], generator=g).to(dtype)
        else:
            down = torch.randn(shapes["lora_down"], generator=g)
        up = torch.randn(shapes["lora_up"], generator=g)
        tensors[adapter_key(dialect, m, "lora_down")] = down.to(dtype)
        tensors[adapter_key(dialect, m, "lora_up")] = up.to(dtype)
        if dialect == "kohya":
            tensors[adapter_key(dialect, m, "alpha")] = torch.tensor(alpha, dtype=dtype)
    return tensors


def write_lora(path, modules, *, rank=4, alpha=2.0, seed=0, dialect="kohya", metadata=None, mid=False):
    tensors = lora_tensors(modules, rank, alpha, seed, dialect=dialect, mid=mid)
    meta = dict(metadata or {})
    ranks = {m.name: min(rank, m.shape[0], m.shape[1]) for m in modules}
    meta.update(dialect_metadata(dialect, ranks, {n: alpha for n in ranks}))
    save_file(tensors, path, meta)
    return str(path)


def _factor(n: int) -> tuple[int, int]:
    a = max(d for d in range(1, int(math.isqrt(n)) + 1) if n % d == 0)
    return a, n // a


def write_lokr(path, modules, seed=0, low_rank_w2=0):
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for m in modules:
        (a, b), (c, d) = _factor(m.shape[0]), _factor(m.shape[1])
        k = math.prod(m.shape[2:])
        tensors[f"{m.name}.lokr_w1"] = torch.randn(a, c, generator=g)
        # LyCORIS factors w2 only where the rank is below half its larger side (else it expects a whole w2)
        if low_rank_w2 and low_rank_w2 < max(b, d) / 2:
            tensors[f"{m.name}.lokr_w2_a"] = torch.randn(b, low_rank_w2, generator=g)
            tensors[f"{m.name}.lokr_w2_b"] = torch.randn(low_rank_w2, d * k, generator=g)
        else:
            tensors[f"{m.name}.lokr_w2"] = torch.randn(b, d, *m.shape[2:], generator=g)
        tensors[f"{m.name}.alpha"] = torch.tensor(float(low_rank_w2 or 1))
    save_file(tensors, path)
    return str(path)


def write_loha(path, modules, rank=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for m in modules:
        cols = math.prod(m.shape[1:])
        for w in ("hada_w1", "hada_w2"):
            tensors[f"{m.name}.{w}_a"] = torch.randn(m.shape[0], rank, generator=g)
            tensors[f"{m.name}.{w}_b"] = torch.randn(rank, cols, generator=g)
        tensors[f"{m.name}.alpha"] = torch.tensor(float(rank))
    save_file(tensors, path)
    return str(path)


def write_diff(path, modules, seed=0):
    g = torch.Generator().manual_seed(seed)
    save_file({f"{m.name}.diff": torch.randn(m.shape, generator=g) for m in modules}, path)
    return str(path)
