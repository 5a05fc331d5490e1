"""What an SDXL checkpoint looks like, as data (docs/layouts.md).

The original single-file layout ("sgm", used by A1111/Forge/ComfyUI/Civitai) has four components
under fixed key prefixes, a few marker tensors at the root, and 2,515 tensors in the public base
file, listed with their shapes in `data/sd_xl_base_1.0_keys.tsv`.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources

# Component name -> key prefix in the single-file layout.
COMPONENT_PREFIXES: dict[str, str] = {
    "unet": "model.diffusion_model.",
    "clip_l": "conditioner.embedders.0.transformer.",
    "clip_g": "conditioner.embedders.1.model.",
    "vae": "first_stage_model.",
}

# Marker tensors at the root of the state dict that tell loaders the prediction type
# (ComfyUI, A1111 and Forge read them; NoobAI v-pred files carry `v_pred` and `ztsnr`).
MARKER_KEYS: tuple[str, ...] = ("v_pred", "ztsnr", "edm_vpred.sigma_max", "edm_vpred.sigma_min", "edm_mean", "edm_std")

# Tensors that are copied from one parent, never interpolated: integer ids, CLIP-G's learned
# temperature, and the markers (A1111's merger corrupts SDXL position_ids by interpolating them).
PASS_THROUGH_SUFFIXES: tuple[str, ...] = ("position_ids", "logit_scale")

# Keys that identify other layouts, used by format detection.
SD1_TEXT_PREFIX = "cond_stage_model.transformer."  # SD 1.x: CLIP-L as the only text encoder
SD2_TEXT_PREFIX = "cond_stage_model.model."  # SD 2.x: OpenCLIP-H
SDXL_REFINER_MARKER = "conditioner.embedders.0.model."  # the refiner has only OpenCLIP-G, at index 0
SDXL_TEXT_MARKER = "conditioner.embedders.1.model.ln_final.weight"  # what A1111 checks
SDXL_UNET_MARKER = "model.diffusion_model.label_emb.0.0.weight"  # SDXL's ADM input (2816 wide)

# Diffusers SDXL folder: component -> relative weight file (first match of each list wins).
DIFFUSERS_FILES: dict[str, tuple[str, ...]] = {
    "unet": ("unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors"),
    "clip_l": ("text_encoder/model.safetensors", "text_encoder/model.fp16.safetensors"),
    "clip_g": ("text_encoder_2/model.safetensors", "text_encoder_2/model.fp16.safetensors"),
    "vae": ("vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors"),
}


def component_of(key: str) -> str | None:
    """Which SDXL component a single-file key belongs to (None for markers and unknown keys)."""
    for name, prefix in COMPONENT_PREFIXES.items():
        if key.startswith(prefix):
            return name
    return None


def is_marker(key: str) -> bool:
    return key in MARKER_KEYS


def is_pass_through(key: str) -> bool:
    """True for tensors a merge must copy unchanged rather than interpolate (floats or not)."""
    return is_marker(key) or key.endswith(PASS_THROUGH_SUFFIXES)


def prediction_type_from_keys(keys: set[str] | frozenset[str]) -> str | None:
    """The prediction type the marker tensors announce, or None when there are no markers.

    `v_pred` -> "v" (+ `ztsnr` -> "v+ztsnr"); `edm_vpred.*` -> "edm-v"; `edm_mean`/`edm_std`
    -> "edm" (Playground v2.5 style); `ztsnr` alone -> "epsilon+ztsnr".
    """
    if "edm_vpred.sigma_max" in keys or "edm_vpred.sigma_min" in keys:
        return "edm-v"
    if "edm_mean" in keys or "edm_std" in keys:
        return "edm"
    if "v_pred" in keys:
        return "v+ztsnr" if "ztsnr" in keys else "v"
    if "ztsnr" in keys:
        return "epsilon+ztsnr"
    return None


# Marker tensors to write for each prediction type (the inverse of the above, for generators and merges).
MARKERS_FOR_PREDICTION: dict[str, tuple[str, ...]] = {
    "epsilon": (),
    "v": ("v_pred",),
    "v+ztsnr": ("v_pred", "ztsnr"),
}
# Prediction types read from markers but never written, and why.
UNWRITABLE_PREDICTIONS: dict[str, str] = {
    "epsilon+ztsnr": "loaders read the `ztsnr` marker only together with `v_pred` (ComfyUI ignores it "
                     "without), so the file would load as plain epsilon",
}


@dataclass(frozen=True)
class InventoryEntry:
    key: str
    component: str
    dtype: str
    shape: tuple[int, ...]


@functools.cache
def base_inventory() -> dict[str, InventoryEntry]:
    """The 2,515 keys of the public SDXL 1.0 base file with component, dtype and shape."""
    text = resources.files("lineage.sdxl").joinpath("data/sd_xl_base_1.0_keys.tsv").read_text()
    inventory = {}
    for line in text.splitlines():
        if not line or line.startswith("#") or line.startswith("key\t"):
            continue
        key, component, dtype, shape = line.split("\t")
        dims = tuple(int(d) for d in shape.strip("[]").split(",") if d.strip())
        inventory[key] = InventoryEntry(key, component, dtype, dims)
    return inventory
