"""SDXL's UNet, text encoders and VAE as plain PyTorch modules with the single file's parameter names
(docs/models.md), their loader, prompt encoding and sampling.

    from lineage.train import load_sdxl
    sdxl = load_sdxl("model.safetensors", dtype=torch.bfloat16)
    sdxl.unet, sdxl.clip_l, sdxl.clip_g, sdxl.vae

The names below are imported on first use: the CLI imports `lineage.train.commands` to list
`lmerge sample`, and that must not import torch (header-only commands start in well under a second).
"""
from __future__ import annotations

import importlib
from typing import Any

# public name -> the submodule that defines it
_EXPORTS = {
    "load_sdxl": "loading",
    "SDXL": "sdxl", "SDXLConfig": "sdxl", "config_from_checkpoint": "sdxl",
    "CLIPLConfig": "text_encoders", "CLIPTextL": "text_encoders", "OpenCLIPGConfig": "text_encoders",
    "OpenCLIPTextG": "text_encoders", "TextOutput": "text_encoders",
    "UNet": "unet", "UNetConfig": "unet", "timestep_embedding": "unet",
    "VAE": "vae", "VAEConfig": "vae",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    try:  # a submodule (`lineage.train.sampling`, ...)
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
