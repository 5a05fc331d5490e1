"""Generated SDXL checkpoints for tests, the demo and benchmarks (no downloads needed).

Every generated file has the real single-file SDXL key names and structure (docs/layouts.md):
- size "full": exactly the 2,515 keys and shapes of the public SDXL 1.0 base file (6.9 GB in fp16);
- size "small": the same keys with every width shrunk about tenfold (320 -> 32 channels, ...), 59 MB in fp16;
- size "tiny": the same keys with the UNet's widths divided by 80 (320 -> 4 channels), the other
  components' by 64, 1.7 MB in fp16:
  for tests of logic that does not depend on tensor sizes.

A "child" is a fine-tune of a parent file: each changed weight gets a planted low-rank delta plus
small noise, so lineage detection, merges and LoRA extraction have real structure to find. A child
can carry the v-prediction markers. Values are deterministic: each tensor is drawn from a generator
seeded with (seed, key), so the same call always writes byte-identical files.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

from lineage.engine.seeding import key_seed
from lineage.errors import LineageError
from lineage.io.safetensors import DTYPES, SafetensorsFile, SafetensorsWriter
from lineage.lazy import torch
from lineage.sdxl.layout import COMPONENT_PREFIXES, MARKERS_FOR_PREDICTION, base_inventory

# Per reduced size and component: full-size dimension -> reduced dimension. Dimensions not listed
# (kernel sizes, 77 tokens, 4 latent channels, ...) stay. Widths stay consistent with each other: the
# cross-attention context (2048 full) is the CLIP-L width plus the CLIP-G width, and the ADM input
# (2816 full) is the pooled CLIP-G width plus six 256-wide size embeddings, reduced alike.
REDUCED_DIMS: dict[str, dict[str, dict[int, int]]] = {
    # CLIP-L 768 -> 64, CLIP-G 1280 -> 80: context 144, ADM input 80 + 6*16 = 176
    "small": {
        "unet": {320: 32, 640: 64, 960: 96, 1280: 128, 1920: 192, 2560: 256, 5120: 512, 10240: 1024, 2048: 144,
                 2816: 176},
        "clip_l": {768: 64, 3072: 256, 49408: 1000},
        "clip_g": {1280: 80, 3840: 240, 5120: 320, 49408: 1000},
        "vae": {128: 16, 256: 32, 512: 64},
    },
    # UNet widths / 80 (320 -> 4), the text encoders' and VAE's / 64: CLIP-L 768 -> 12, CLIP-G 1280 -> 20:
    # context 32, ADM input 20 + 6*4 = 44. About 1.7 MB in fp16, a fifth of it the header's 2,515 names.
    "tiny": {
        "unet": {320: 4, 640: 8, 960: 12, 1280: 16, 1920: 24, 2560: 32, 5120: 64, 10240: 128, 2048: 32, 2816: 44},
        "clip_l": {768: 12, 3072: 48, 49408: 1544},
        "clip_g": {1280: 20, 3840: 60, 5120: 80, 49408: 1544},
        "vae": {128: 2, 256: 4, 512: 8},
    },
}
SIZES = ("tiny", "small", "full")
COMPONENTS = tuple(COMPONENT_PREFIXES)
LOGIT_SCALE = math.log(1 / 0.07)  # CLIP's initial temperature


def sdxl_shapes(size: str = "small", components: Iterable[str] = COMPONENTS) -> dict[str, tuple[str, tuple[int, ...]]]:
    """key -> (inventory dtype, shape) of a generated SDXL checkpoint of the given size."""
    if size not in SIZES:
        raise LineageError(f"unknown synthetic size {size!r}; choose one of {', '.join(SIZES)}")
    wanted = set(components)
    unknown = wanted - set(COMPONENTS)
    if unknown:
        raise LineageError(f"unknown components {sorted(unknown)}; choose from {', '.join(COMPONENTS)}")
    shapes = {}
    for key, entry in base_inventory().items():
        if entry.component not in wanted:
            continue
        reduce = REDUCED_DIMS[size][entry.component] if size in REDUCED_DIMS else {}
        dims = tuple(reduce.get(d, d) for d in entry.shape)
        shapes[key] = (entry.dtype, dims)
    return shapes


def _generator(seed: int, key: str) -> torch.Generator:
    return torch.Generator().manual_seed(key_seed(seed, key))


def _weight_scale(key: str, shape: tuple[int, ...]) -> float:
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
    return 1 / math.sqrt(fan_in) if len(shape) > 1 else 0.02


def _base_tensor(key: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A plausible fp32 value for one key: scaled normal weights, norm gains near 1, small biases."""
    if key.endswith("position_ids"):
        return torch.arange(shape[-1], dtype=torch.int64).reshape(shape)
    if key.endswith("logit_scale"):
        return torch.full(shape, LOGIT_SCALE)
    values = torch.randn(shape, generator=_generator(seed, key))
    if len(shape) == 1 and key.endswith("weight"):  # norm gains
        return 1 + 0.02 * values
    return values * _weight_scale(key, shape)


def _child_tensor(key: str, parent: torch.Tensor, seed: int, rank: int, strength: float, noise: float) -> torch.Tensor:
    """parent + a planted rank-`rank` delta (relative size `strength`) + noise (relative size `noise`)."""
    gen = _generator(seed, key)
    p = parent.float()
    scale = p.std().item() if p.numel() > 1 else 0.02
    if p.ndim >= 2 and min(p.shape[0], math.prod(p.shape[1:])) > rank:
        rows, cols = p.shape[0], math.prod(p.shape[1:])
        u = torch.randn(rows, rank, generator=gen)
        v = torch.randn(rank, cols, generator=gen)
        delta = (u @ v).reshape(p.shape) * (strength * scale / math.sqrt(rank))
    else:
        delta = torch.randn(p.shape, generator=gen) * (strength * scale)
    return p + delta + torch.randn(p.shape, generator=gen) * (noise * scale)


def _marker_plan(prediction_type: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    if prediction_type not in MARKERS_FOR_PREDICTION:
        raise LineageError(f"unknown prediction type {prediction_type!r}; "
                           f"choose one of {', '.join(MARKERS_FOR_PREDICTION)}")
    return {k: ("F32", (0,)) for k in MARKERS_FOR_PREDICTION[prediction_type]}


def _stored(value: torch.Tensor, dtype: str) -> torch.Tensor:
    return value if not value.is_floating_point() else value.to(DTYPES[dtype])


def _bar(plan: dict[str, tuple[str, tuple[int, ...]]], progress: bool) -> Iterable[tuple[str, Any]]:
    """The plan's items, counted by a progress bar when `progress` (on a terminal only)."""
    from tqdm import tqdm

    return tqdm(plan.items(), total=len(plan), desc="generating", unit="tensor", leave=False,
                disable=None if progress else True)


def write_base(path: str | os.PathLike, *, size: str = "small", seed: int = 0, dtype: str = "F16",
               prediction_type: str = "epsilon", components: Iterable[str] = COMPONENTS,
               metadata: Mapping[str, str] | None = None, progress: bool = False) -> str:
    """Write a generated SDXL base checkpoint; floats are stored as `dtype` (F16, BF16 or F32).
    `progress`: a bar of the tensors written (on a terminal)."""
    shapes = sdxl_shapes(size, components)
    plan = {k: (d if d != "F16" else dtype, s) for k, (d, s) in shapes.items()}
    plan.update(_marker_plan(prediction_type))
    with SafetensorsWriter(path, plan, metadata) as out:
        for key, (stored_dtype, shape) in _bar(plan, progress):
            value = _base_tensor(key, shape, seed) if key in shapes else torch.empty(shape)
            out.write(key, _stored(value, stored_dtype))
    return os.fspath(path)


def write_child(parent: str | os.PathLike, path: str | os.PathLike, *, seed: int = 1, rank: int = 8,
                strength: float = 0.05, noise: float = 0.002, components: Iterable[str] = ("unet", "clip_l", "clip_g"),
                prediction_type: str | None = None, metadata: Mapping[str, str] | None = None,
                progress: bool = False) -> str:
    """Write a fine-tune of `parent`: the tensors of `components` get a planted low-rank delta and
    noise, the rest (by default the VAE) are copied. `prediction_type` sets the marker tensors
    (default: keep the parent's); `progress`: a bar of the tensors written (on a terminal)."""
    changed_prefixes = tuple(COMPONENT_PREFIXES[c] for c in components)
    with SafetensorsFile(parent) as src:
        plan = {k: (i.dtype, i.shape) for k, i in src.tensors.items()}
        if prediction_type is not None:
            for marker in {m for markers in MARKERS_FOR_PREDICTION.values() for m in markers}:
                plan.pop(marker, None)
            plan.update(_marker_plan(prediction_type))
        with SafetensorsWriter(path, plan, metadata) as out:
            for key, (dtype, shape) in _bar(plan, progress):
                if key not in src:
                    out.write(key, torch.empty(shape, dtype=DTYPES[dtype]))
                    continue
                value = src.read(key)
                if value.is_floating_point() and key.startswith(changed_prefixes) and not key.endswith("logit_scale"):
                    value = _stored(_child_tensor(key, value, seed, rank, strength, noise), dtype)
                out.write(key, value)
    return os.fspath(path)
