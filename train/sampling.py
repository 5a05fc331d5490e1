"""Text to image with an SDXL checkpoint: `lineage.sample(...)` and the denoising loop under it
(docs/models.md, "Sampling").

    images = lineage.sample("model.safetensors", "a lighthouse at dusk", steps=28, cfg=7, seed=1, batch=2)
    images[0].save("out.png", pnginfo=png_info(images[0]))

1. The checkpoint loads (train/loading.py); adapters, if any, are added to the weights in memory, the same
   arithmetic `lmerge apply` bakes into a file (adapters/delta.py), so nothing is written.
2. The prompt and the negative prompt become context and pooled vectors (train/conditioning.py); the pooled
   vector and SDXL's six size/crop values form the UNet's `y`.
3. Each image starts from its own seed (seed, seed+1, … as A1111), noise drawn on the CPU so a seed gives the
   same image on any device; the sampler (train/samplers.py) walks the schedule (train/schedules.py), the
   UNet run on [negative, positive] in one batch and the two predictions mixed by classifier-free guidance.
4. The VAE decodes latent / 0.13025 into the image; each PIL image carries A1111-style `parameters` text.

Only the models run in the caller's dtype (fp32, bf16 or fp16): the noise, the sigmas, the latents the sampler
steps and the guidance mix stay fp32, each UNet output converted back before it is used. Under fp16 the VAE
stays fp32 (VAE_DTYPE).
"""
from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, PngImagePlugin
from tqdm import tqdm

from lineage.errors import CheckpointError, LineageError
from lineage.train.conditioning import SIZE_VALUES, encode_with_negatives, micro_conditioning
from lineage.train.samplers import SAMPLERS, Model
from lineage.train.schedules import make_schedule
from lineage.train.unet import UNet
from lineage.train.vae import VAE

log = logging.getLogger(__name__)

SCHEDULERS = {"normal": "Normal", "karras": "Karras"}  # ours -> A1111's "Schedule type"
MAX_SEED = 2 ** 32 - 1  # A1111's seed range
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # by the names the CLI takes
# The VAE's dtype where it differs from the models': SDXL's VAE overflows fp16's range in its decoder (NaN,
# black images: A1111 needs --no-half-vae, ComfyUI upcasts it), so it stays fp32. bf16 has fp32's range.
VAE_DTYPE = {torch.float16: torch.float32}


@dataclass(frozen=True)
class Conditioning:
    """What guides the UNet, for a batch: the prompt's and the negative prompt's context and pooled vectors."""

    context: torch.Tensor  # [B, 77·k, 2048]
    pooled: torch.Tensor  # [B, 1280]
    negative_context: torch.Tensor
    negative_pooled: torch.Tensor


def latent_scale(vae: VAE) -> int:
    """Pixels per latent cell: 2 per VAE downsampling (8 for SDXL's VAE)."""
    return 2 ** (len(vae.config.channel_mult) - 1)


def size_multiple(unet: UNet, vae: VAE) -> int:
    """What width and height must be multiples of: the VAE's scale times the UNet's downsamplings
    (8 · 4 = 32 for SDXL), so every skip connection meets a feature map of its own size."""
    return latent_scale(vae) * 2 ** (len(unet.config.channel_mult) - 1)


def initial_noise(seeds: Sequence[int], shape: tuple[int, ...]) -> tuple[torch.Tensor, list[torch.Generator]]:
    """Unit noise [len(seeds), *shape], each image's from its own CPU generator, and the generators (an
    ancestral sampler keeps drawing from them)."""
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
    return torch.cat([torch.randn((1, *shape), generator=g) for g in generators]), generators


def guided_model(unet: UNet, conditioning: Conditioning, size: tuple[int, int], cfg: float) -> Model:
    """The model function a sampler calls: the UNet on [negative, positive] in one batch, mixed as
    uncond + cfg · (cond − uncond); with cfg ≤ 1 the positive alone (diffusers and A1111 skip the
    negative pass then)."""
    width = (unet.config.adm_in_channels - conditioning.pooled.shape[-1]) // SIZE_VALUES
    sizes = dict(original_size=size, crop=(0, 0), target_size=size, embedding_width=width)
    guided = cfg > 1
    c = conditioning
    context = torch.cat([c.negative_context, c.context]) if guided else c.context
    pooled = torch.cat([c.negative_pooled, c.pooled]) if guided else c.pooled
    y = micro_conditioning(pooled, **sizes)
    dtype = unet.time_embed[0].weight.dtype

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x_in = torch.cat([x, x]) if guided else x
        out = unet(x_in.to(dtype), t.expand(x_in.shape[0]), context.to(dtype), y.to(dtype)).float()
        if not guided:
            return out
        uncond, cond = out.chunk(2)
        return uncond + cfg * (cond - uncond)

    return model


def denoise(unet: UNet, conditioning: Conditioning, *, seeds: Sequence[int], width: int, height: int, steps: int,
            cfg: float, sampler: str, scheduler: str, prediction: str, latent_cells: int,
            on_step: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """The clean latents [B, 4, height/s, width/s] (s = `latent_cells` pixels per cell), fp32 on the CPU."""
    chosen = SAMPLERS[sampler]
    base, _, extra = prediction.partition("+")
    ztsnr = extra == "ztsnr"
    schedule = make_schedule(steps, karras=scheduler == "karras", spacing="trailing" if ztsnr else "leading",
                             zero_terminal_snr=ztsnr, layout=chosen.spacing)
    shape = (unet.config.in_channels, height // latent_cells, width // latent_cells)
    noise, generators = initial_noise(seeds, shape)
    device = next(unet.parameters()).device
    model = guided_model(unet, conditioning, (height, width), cfg)

    def on_device(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return model(x.to(device), t.to(device)).cpu()

    def fresh_noise() -> torch.Tensor:
        return torch.cat([torch.randn((1, *shape), generator=g) for g in generators])

    with torch.no_grad():
        return chosen.run(on_device, noise, schedule, base, fresh_noise, on_step)


def decode(vae: VAE, latents: torch.Tensor) -> torch.Tensor:
    """Images [B, 3, H, W] in [0, 1] from clean latents (SDXL scales latents by 0.13025 in training)."""
    weight = vae.post_quant_conv.weight
    with torch.no_grad():
        image = vae.decode((latents / vae.config.scale_factor).to(weight.device, weight.dtype)).float().cpu()
    return (image / 2 + 0.5).clamp(0, 1)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    pixels = (images.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    return [Image.fromarray(p) for p in pixels]


def _infotext_name(name: str) -> str:
    """A name as A1111 writes it in infotext: without the commas and colons that separate its fields."""
    return name.replace(",", "").replace(":", "")


def parameters_text(*, prompt: str, negative: str, steps: int, sampler: str, scheduler: str, cfg: float, seed: int,
                    width: int, height: int, model_hash: str, model_name: str,
                    lora_hashes: Mapping[str, str] | None = None) -> str:
    """A1111's infotext: the prompt, `Negative prompt: …` when there is one, then `Key: value` pairs in the
    order A1111's `create_infotext` writes them; adapters as its Lora extension lists them
    (`Lora hashes: "name: AutoV3 prefix, …"`), which Civitai reads to link the resources."""
    lines = [prompt]
    if negative:
        lines.append(f"Negative prompt: {negative}")
    pairs = {"Steps": steps, "Sampler": SAMPLERS[sampler].label, "Schedule type": SCHEDULERS[scheduler],
             "CFG scale": f"{cfg:g}", "Seed": seed, "Size": f"{width}x{height}", "Model hash": model_hash,
             "Model": _infotext_name(model_name)}
    if lora_hashes:
        listed = ", ".join(f"{_infotext_name(name)}: {value}" for name, value in lora_hashes.items())
        pairs["Lora hashes"] = f'"{listed}"'
    lines.append(", ".join(f"{key}: {value}" for key, value in pairs.items()))
    return "\n".join(lines)


def png_info(image: Image.Image) -> PngImagePlugin.PngInfo:
    """The `parameters` text chunk to save beside an image from `sample`."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", image.info["parameters"])
    return info


def _check_request(sampler: str, scheduler: str, steps: int, batch: int, width: int, height: int) -> None:
    if sampler not in SAMPLERS:
        raise LineageError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if scheduler not in SCHEDULERS:
        raise LineageError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
    if steps < 1 or batch < 1:
        raise LineageError(f"steps and batch must be at least 1 (got steps={steps}, batch={batch})")
    if width < 8 or height < 8 or width % 8 or height % 8:
        raise LineageError(f"width and height must be positive multiples of 8, got {width}x{height}")


def model_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """The torch dtype a model runs in, from a torch dtype or one of DTYPES' names."""
    chosen = DTYPES.get(dtype) if isinstance(dtype, str) else dtype
    if chosen is None or chosen not in DTYPES.values():
        raise LineageError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return chosen


def infotext_hashes(checkpoint: str, adapters: Sequence[str], *, model_hash: str | None = None,
                    adapter_autov3: Mapping[str, str] | None = None, registry: Any = None) -> tuple[str, list[str]]:
    """The checkpoint's AutoV2 (A1111's `Model hash`) and each adapter's AutoV3, for the infotext: those the
    caller knows, else those the lineage registry recorded for the unchanged file (same path, size and mtime:
    `registry` as lineage.graph.registry.known_hashes takes it), else read from the file (a full-size
    checkpoint is a minute of hashing)."""
    from lineage.graph.registry import known_hashes
    from lineage.io.hashing import hash_file

    paths = [checkpoint, *adapters]
    kinds = ["autov2"] + ["autov3"] * len(adapters)
    found = [model_hash, *((adapter_autov3 or {}).get(a) for a in adapters)]
    if None in found:
        known = known_hashes(paths, registry)
        found = [value or hashes.get(kind) for value, hashes, kind in zip(found, known, kinds)]
    values = [value or getattr(hash_file(path), kind) for value, path, kind in zip(found, paths, kinds)]
    return values[0], values[1:]


class Sampler:
    """An SDXL checkpoint loaded for sampling, with `adapters` (paths or (path, strength) pairs) added
    in memory: call it for images. Loading a full-size file takes a minute or two on a CPU, so a caller
    drawing several images (a preview grid) loads once.

    `dtype` (torch dtype or "fp32" | "bf16" | "fp16") is what the UNet and text encoders run in: bf16 halves
    their memory; under fp16 the VAE stays fp32 (VAE_DTYPE). `device`: "cpu", "cuda" or "cuda:N".
    `model_hash` (the checkpoint's AutoV2) and `adapter_hashes` (adapter path -> AutoV3) are hashes the
    caller knows; the others are looked up in `registry` or hashed (`infotext_hashes`)."""

    def __init__(self, checkpoint: str | os.PathLike, *, adapters: Sequence = (),
                 dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu",
                 model_hash: str | None = None, adapter_hashes: Mapping[str, str] | None = None,
                 registry: Any = None):
        from lineage.adapters.apply import adapter_inputs
        from lineage.engine.device import compute_device
        from lineage.train.live_adapters import apply_in_memory
        from lineage.train.loading import load_sdxl

        self.path = os.fspath(checkpoint)
        self.dtype = model_dtype(dtype)
        on = compute_device(str(device))
        if self.dtype == torch.float16 and on.type == "cpu":
            log.warning("warning: fp16 on a CPU is very slow (CPUs without fp16 arithmetic convert operation by "
                        "operation: hundreds of times slower); bf16 halves the memory as well (--dtype bf16)")
        self.model = load_sdxl(self.path, dtype=self.dtype, device=on,
                               part_dtypes={"vae": VAE_DTYPE.get(self.dtype, self.dtype)})  # names a missing part
        self.prediction = _prediction_type(self.path)
        if adapters:
            apply_in_memory(self.model, self.path, adapters)
        adapter_paths = [os.fspath(a.path) for a in adapter_inputs(adapters)]
        self.model_hash, adapter_autov3 = infotext_hashes(self.path, adapter_paths, model_hash=model_hash,
                                                          adapter_autov3=adapter_hashes, registry=registry)
        # As A1111's Lora extension names them: the file's stem and its AutoV3's first 12 digits.
        self.lora_hashes = {Path(path).stem: autov3[:12] for path, autov3 in zip(adapter_paths, adapter_autov3)}

    def __call__(self, prompt: str, *, negative: str = "", steps: int = 28, cfg: float = 7.0,
                 seed: int | None = None, width: int = 1024, height: int = 1024, sampler: str = "euler",
                 scheduler: str = "normal", batch: int = 1, progress: bool = True,
                 on_step: Callable[[int, int], None] | None = None) -> list[Image.Image]:
        """`batch` images of `prompt`, seeds seed, seed+1, …; `seed=None` picks one. `on_step(i, steps)` is
        called after each denoising step (a caller's own progress). Each image's `info["parameters"]`
        holds A1111's infotext (save it with `png_info(image)`)."""
        _check_request(sampler, scheduler, steps, batch, width, height)
        model = self.model
        multiple = size_multiple(model.unet, model.vae)
        if width % multiple or height % multiple:
            raise LineageError(f"width and height must be multiples of {multiple} for this model "
                               f"(its VAE and UNet downsample that much), got {width}x{height}")
        with torch.no_grad():
            context, pooled, negative_context, negative_pooled = encode_with_negatives(
                model, [prompt] * batch, [negative] * batch)
        conditioning = Conditioning(context, pooled, negative_context, negative_pooled)
        first = random.randrange(MAX_SEED) if seed is None else seed
        seeds = [first + i for i in range(batch)]

        bar = tqdm(total=steps, desc=f"sampling {batch}×{width}x{height}", unit="step",
                   disable=None if progress else True)

        def stepped(i: int, n: int) -> None:
            bar.update(1)
            if on_step:
                on_step(i, n)

        started = time.monotonic()
        with bar:
            latents = denoise(model.unet, conditioning, seeds=seeds, width=width, height=height, steps=steps,
                              cfg=cfg, sampler=sampler, scheduler=scheduler, prediction=self.prediction,
                              latent_cells=latent_scale(model.vae), on_step=stepped)
        seconds_per_step = (time.monotonic() - started) / steps
        images = to_pil(decode(model.vae, latents))
        for image, image_seed in zip(images, seeds):
            image.info["parameters"] = parameters_text(
                prompt=prompt, negative=negative, steps=steps, sampler=sampler, scheduler=scheduler, cfg=cfg,
                seed=image_seed, width=width, height=height, model_hash=self.model_hash,
                model_name=Path(self.path).stem, lora_hashes=self.lora_hashes)
            image.info["seconds_per_step"] = seconds_per_step
        return images


def sample(checkpoint: str | os.PathLike, prompt: str, *, negative: str = "", adapters: Sequence = (),
           steps: int = 28, cfg: float = 7.0, seed: int | None = None, width: int = 1024, height: int = 1024,
           sampler: str = "euler", scheduler: str = "normal", batch: int = 1, dtype: torch.dtype | str = torch.float32,
           device: str | torch.device = "cpu", progress: bool = True,
           on_step: Callable[[int, int], None] | None = None, model_hash: str | None = None,
           adapter_hashes: Mapping[str, str] | None = None, registry: Any = None) -> list[Image.Image]:
    """`batch` images of `prompt` from an SDXL single file, seeds seed, seed+1, …; `seed=None` picks one:
    `Sampler(checkpoint, ...)(prompt, ...)` for one call (see both for the arguments)."""
    _check_request(sampler, scheduler, steps, batch, width, height)  # before a minute of loading
    return Sampler(checkpoint, adapters=adapters, dtype=dtype, device=device, model_hash=model_hash,
                   adapter_hashes=adapter_hashes, registry=registry)(
        prompt, negative=negative, steps=steps, cfg=cfg, seed=seed, width=width, height=height, sampler=sampler,
        scheduler=scheduler, batch=batch, progress=progress, on_step=on_step)


def _prediction_type(path: str) -> str:
    """epsilon | v | v+ztsnr, from the checkpoint's marker tensors or metadata (lineage/sdxl/detection.py)."""
    from lineage.sdxl.detection import require_sdxl

    found = require_sdxl(path)
    base = (found.prediction_type or "epsilon").partition("+")[0]
    if base not in ("epsilon", "v"):
        raise CheckpointError(f"prediction type {found.prediction_type!r} cannot be sampled", path)
    return found.prediction_type or "epsilon"
