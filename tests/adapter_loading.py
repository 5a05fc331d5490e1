"""Does an adapter file we wrote load everywhere, and what change does it make (against the true change
between two checkpoints): shared by the extract, resize, lora-merge and loader-compatibility tests."""
from __future__ import annotations

import types
from typing import Any

import torch
from loader_rules import a1111_unloaded, comfyui_key_map, comfyui_unloaded, sdxl_torch_modules

from lineage.adapters.delta import module_delta
from lineage.adapters.modules import Module
from lineage.adapters.reader import open_adapter
from lineage.io.safetensors import SafetensorsFile, read_header

SDXL_UNET_CONFIG = types.SimpleNamespace(layers_per_block=2)  # what diffusers reads to renumber sgm blocks


def deltas(path: str) -> dict[str, torch.Tensor]:
    """Every module's change (fp32, 2-D), rebuilt by adapters/delta.py as `lmerge apply` does."""
    adapter = open_adapter(path)
    out = {}
    with SafetensorsFile(path) as f:
        for name, module in adapter.modules.items():
            tensors = {role: f.read(key) for role, key in module.keys.items() if role != "alpha"}
            out[name] = module_delta(module.algorithm, tensors, module.alpha, module_shape(module)).flatten(1)
    return out


def module_shape(module) -> tuple[int, ...]:
    s = module.shapes
    kernel = s["lora_mid"][2:] if "lora_mid" in s else s["lora_down"][2:]
    return (s["lora_up"][0], s["lora_down"][1], *kernel)


def module_difference(base: str, tuned: str, module: Module) -> torch.Tensor:
    """The true change of `module` from `base` to `tuned` (fp32, 2-D): what an extraction approximates."""
    with SafetensorsFile(base) as b, SafetensorsFile(tuned) as t:
        wb, wt = b.read(module.key).float(), t.read(module.key).float()
    if module.rows:
        wb, wt = wb[module.rows[0]:module.rows[1]], wt[module.rows[0]:module.rows[1]]
    return (wt - wb).reshape(module.shape[0], -1)


def lycoris_network(base: str, path: str) -> tuple[Any, dict[str, torch.Tensor]]:
    """LyCORIS' own network (the real package) built from the kohya-named adapter `path` on `base`'s modules,
    applied as kohya's scripts do, with every key of the file loaded; and the file's tensors (fp32)."""
    from lycoris.kohya import create_network_from_weights

    unet, text_encoders = sdxl_torch_modules(read_header(base)[0])
    unet.to_empty(device="cpu")
    for te in text_encoders:
        te.to_empty(device="cpu")
    with SafetensorsFile(path) as f:
        weights = {k: f.read(k).float() for k in f.keys()}
    network, _ = create_network_from_weights(1.0, None, None, text_encoders, unet, weights_sd=weights)
    network.apply_to(text_encoders, unet, apply_text_encoder=True, apply_unet=True)
    loaded = network.load_state_dict(weights, strict=False)
    assert not loaded.unexpected_keys and not loaded.missing_keys
    return network, weights


def assert_loads_everywhere(base: str, path: str) -> None:
    """diffusers' lora_state_dict takes every module of the file; a kohya file also loads whole in LyCORIS
    (the real package), with one alpha per module in diffusers, and ComfyUI / Forge and A1111 (their key
    rules) leave none of its keys unloaded."""
    from diffusers import StableDiffusionXLPipeline

    header = read_header(base)[0]
    adapter = open_adapter(path)
    if adapter.dialect == "kohya":  # (ComfyUI and A1111 take PEFT names only in part: see docs/adapters.md)
        keys = list(read_header(path)[0])
        assert comfyui_unloaded(keys, comfyui_key_map(header, {})) == set()
        assert a1111_unloaded(keys, header) == set()
    state, alphas = StableDiffusionXLPipeline.lora_state_dict(path, unet_config=SDXL_UNET_CONFIG)
    assert len(state) == 2 * len(adapter.modules)
    if adapter.dialect == "kohya":  # (a PEFT file's alphas are in its adapter config instead)
        assert len(alphas) == len(adapter.modules)
        lycoris_network(base, path)  # LyCORIS reads kohya's names
