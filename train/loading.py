"""Loading an SDXL single file into the plain-PyTorch models (docs/models.md).

The modules are first built on the `meta` device (no memory), given empty storage in the caller's dtype
(per part if asked: a sampler keeps the VAE in fp32 when the rest runs in fp16), then filled tensor by tensor
straight from the file: a tensor already stored in that dtype is read into the parameter's own memory, any
other is read, converted and dropped. At no time does a second
copy of the checkpoint exist in RAM.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping

import torch

from lineage.errors import CheckpointError, LineageError
from lineage.io.safetensors import SafetensorsFile
from lineage.sdxl.detection import detect_file
from lineage.sdxl.layout import COMPONENT_PREFIXES
from lineage.train.sdxl import MODELS, PART_NAMES, SDXL, config_from_checkpoint

# What a part still does without each other part (for the error when a file lacks one).
WITHOUT = {
    "unet": "the text encoders and VAE still load (parts=(\"clip_l\", \"clip_g\", \"vae\"))",
    "clip_l": "the UNet and VAE still load; prompts need the text encoders of the base model",
    "clip_g": "the UNet and VAE still load; prompts need the text encoders of the base model",
    "vae": "the UNet and text encoders still load (parts=(\"unet\", \"clip_l\", \"clip_g\")); "
           "decode with another file's VAE (load_sdxl(other, parts=(\"vae\",)))",
}
# Tensors some files in the wild omit, which the models can do without: their standard values.
STANDARD_VALUES = {
    COMPONENT_PREFIXES["clip_l"] + "text_model.embeddings.position_ids":
        lambda shape: torch.arange(shape[-1]).reshape(shape),
    COMPONENT_PREFIXES["clip_g"] + "logit_scale": lambda shape: torch.full(shape, math.log(1 / 0.07)),
}
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def load_sdxl(path: str | os.PathLike, *, parts: tuple[str, ...] = tuple(MODELS), dtype: torch.dtype = torch.float32,
              device: str | torch.device = "cpu", part_dtypes: Mapping[str, torch.dtype] | None = None) -> SDXL:
    """Load the given parts ("unet", "clip_l", "clip_g", "vae") of an SDXL single file, in `dtype` on `device`;
    `part_dtypes` gives some parts another dtype (e.g. {"vae": torch.float32}). The model comes back in eval
    mode; call .train() to fine-tune it."""
    dtypes = {part: dtype for part in parts} | dict(part_dtypes or {})
    bad = [d for d in dtypes.values() if d not in FLOAT_DTYPES]
    if bad:
        raise LineageError(f"dtype {bad[0]} is not one of float32, bfloat16, float16")
    unknown = [p for p in dtypes if p not in MODELS]
    if unknown or not parts:
        raise LineageError(f"unknown parts {unknown}; choose from {', '.join(MODELS)}")
    with SafetensorsFile(path) as f:
        found = detect_file(f)
        if found.architecture != "sdxl":
            raise CheckpointError(f"not an SDXL checkpoint ({found.format}: {found.reason})", f.path)
        absent = [p for p in parts if not any(k.startswith(COMPONENT_PREFIXES[p]) for k in f.tensors)]
        if absent:
            names = " and ".join(PART_NAMES[p] for p in absent)
            raise CheckpointError(f"has no {names} (a {found.variant} file); {WITHOUT[absent[0]]}", f.path)
        try:
            config = config_from_checkpoint(f.tensors, parts)
        except CheckpointError as e:  # the shapes do not form an SDXL part: say which file
            raise CheckpointError(str(e), f.path) from None
        with torch.device("meta"):
            model = SDXL(config)
        for part in parts:
            model.part(part).to(dtypes[part])
        model = model.to_empty(device=device)
        _fill(model, f, parts)
    return model.eval()


def _fill(model: SDXL, f: SafetensorsFile, parts: tuple[str, ...]) -> None:
    """Copy every tensor of `parts` from the file into the model's empty storage; strict both ways."""
    targets = model.state_dict(keep_vars=True)
    prefixes = tuple(COMPONENT_PREFIXES[p] for p in parts)
    unexpected = [k for k in f.tensors if k.startswith(prefixes) and k not in targets]
    missing = [k for k in targets if k not in f.tensors and k not in STANDARD_VALUES]
    if unexpected or missing:
        problems = [f"{len(v)} {what} (first: {v[0]})" for what, v in (("unexpected tensors", unexpected),
                                                                       ("missing tensors", missing)) if v]
        raise CheckpointError(f"does not match the SDXL layout: {'; '.join(problems)}", f.path)
    with torch.no_grad():
        for key, target in targets.items():
            if key not in f.tensors:
                target.copy_(STANDARD_VALUES[key](target.shape))
                continue
            info = f.info(key)
            if info.shape != tuple(target.shape):
                raise CheckpointError(f"tensor {key!r} has shape {list(info.shape)}, expected "
                                      f"{list(target.shape)} from the rest of the file", f.path)
            if info.torch_dtype == target.dtype and target.device.type == "cpu" and target.is_contiguous():
                f.read_into(info, target.reshape(-1).view(torch.uint8))  # straight into the parameter
            else:
                target.copy_(f.read(key))
