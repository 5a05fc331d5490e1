"""Does a LoRA file we rewrote (resize, lora-merge) load everywhere, and what change does it make: shared
by tests/test_adapter_resize.py and tests/test_adapter_lora_merge.py."""
from __future__ import annotations

import types

import torch
from loader_rules import a1111_unloaded, comfyui_key_map, comfyui_unloaded, sdxl_torch_modules

from lineage.adapters.delta import module_delta
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


def assert_loads_everywhere(base: str, path: str) -> None:
    """diffusers' lora_state_dict takes every module of the file; a kohya file also loads whole in LyCORIS
    (the real package), with one alpha per module in diffusers, and ComfyUI / Forge and A1111 (their key
    rules) leave none of its keys unloaded."""
    from diffusers import StableDiffusionXLPipeline
    from lycoris.kohya import create_network_from_weights

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
    unet, text_encoders = sdxl_torch_modules(header)
    unet.to_empty(device="cpu")
    for te in text_encoders:
        te.to_empty(device="cpu")
    with SafetensorsFile(path) as f:
        weights = {k: f.read(k).float() for k in f.keys()}
    if adapter.dialect == "kohya":  # LyCORIS reads kohya's names
        network, _ = create_network_from_weights(1.0, None, None, text_encoders, unet, weights_sd=weights)
        network.apply_to(text_encoders, unet, apply_text_encoder=True, apply_unet=True)
        loaded = network.load_state_dict(weights, strict=False)
        assert not loaded.unexpected_keys and not loaded.missing_keys
