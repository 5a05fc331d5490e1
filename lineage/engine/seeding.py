"""Per-tensor seeds: one integer from a run's seed and a tensor's key.

Random work (generated checkpoints, DARE masks, ...) seeds each tensor from (seed, key), so results do
not depend on the order in which tensors are processed or on the threads that process them, and the
same recipe reproduces bit for bit.
"""
from __future__ import annotations

import hashlib


def key_seed(seed: int, key: str) -> int:
    """A 63-bit seed from `seed` and `key` (blake2b of both), valid for torch.Generator.manual_seed."""
    digest = hashlib.blake2b(f"{seed}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)
