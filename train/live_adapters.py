"""Adapters applied to a loaded model in memory, for sampling without a baked copy (docs/models.md, "Sampling").

The plan is the one `lmerge apply` makes (adapters/apply.py: each adapter opened through the reader and
checked against the checkpoint, each module placed on the key it changes, OpenCLIP-G's q/k/v on their thirds
of `in_proj_weight`); here each patched parameter of the loaded model gets strength · Δ (adapters/delta.py)
added in fp32, in place, reading the adapters' tensors one at a time from their files. Nothing is written.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import ExitStack

import torch

from lineage.adapters.apply import add_patches_, plan
from lineage.io.safetensors import SafetensorsFile
from lineage.train.sdxl import SDXL


def apply_in_memory(model: SDXL, checkpoint: str | os.PathLike, adapters: Sequence) -> int:
    """Add every adapter (path, or (path, strength)) to `model`, loaded from `checkpoint`; returns the number
    of parameters changed. Keys of parts the model left out are skipped."""
    applied = plan(checkpoint, adapters)
    paths = [a.path for a in applied.adapters]
    parameters = model.state_dict(keep_vars=True)
    with ExitStack() as stack, torch.no_grad():
        files = [stack.enter_context(SafetensorsFile(path)) for path in paths]
        changed = 0
        for key, patches in applied.patches.items():
            target = parameters.get(key)
            if target is None:
                continue
            weight = target.detach().float()
            factors = ((p.module.keys[role], files[p.adapter].read(p.module.keys[role]))
                       for p in patches for role in p.roles)
            add_patches_(weight, patches, factors, paths)
            target.copy_(weight)
            changed += 1
    return changed
