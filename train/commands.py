"""`lmerge sample`: text to image with an SDXL checkpoint, a thin layer over `lineage.sample`
(train/sampling.py). Nothing heavy is imported before the command runs."""
from __future__ import annotations

import io
from pathlib import Path

import click

from lineage.cli.output import echo_json

SAMPLER_CHOICES = ("euler", "euler_a", "dpmpp_2m")  # train/samplers.py SAMPLERS (kept here so --help stays light)
SCHEDULER_CHOICES = ("normal", "karras")
DTYPE_CHOICES = ("fp32", "bf16", "fp16")  # train/sampling.py DTYPES
DTYPE_HELP = ("What the UNet and text encoders run in. fp32 is the default on a CPU; bf16 halves their memory, and "
              "is faster only where the CPU computes in bf16 (AVX512-BF16, AMX). fp16 is for GPUs (on most CPUs "
              "it is very slow); the VAE stays fp32 then, as SDXL's VAE overflows fp16. The sampler's own math "
              "(noise, sigmas, latents, guidance) is fp32 in any case.")
DEVICE_HELP = "Run the models on cpu (default), cuda or cuda:N."


def output_paths(output: str, count: int) -> list[Path]:
    """`out.png` for one image; `out-0.png`, `out-1.png`, … for a batch."""
    path = Path(output)
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix or '.png'}") for i in range(count)]


@click.command()
@click.argument("checkpoint", type=click.Path())
@click.argument("prompt")
@click.option("--negative", default="", help="Negative prompt (empty: SDXL's zero conditioning).")
@click.option("--adapter", "adapters", multiple=True, metavar="PATH[:STRENGTH]",
              help="Apply an adapter (LoRA, LoCon, LoKr, LoHa, diff) in memory at a strength (default 1); repeatable.")
@click.option("-o", "--output", required=True, type=click.Path(), help="PNG to write (out-0.png, … for a batch).")
@click.option("--steps", default=28, show_default=True, type=click.IntRange(min=1))
@click.option("--cfg", default=7.0, show_default=True, help="Classifier-free guidance scale (1: no negative pass).")
@click.option("--seed", default=None, type=click.IntRange(min=0), help="First seed (default: a random one); image i "
                                                                      "of a batch uses seed + i.")
@click.option("--width", default=1024, show_default=True, type=int)
@click.option("--height", default=1024, show_default=True, type=int)
@click.option("--sampler", default="euler", show_default=True, type=click.Choice(SAMPLER_CHOICES))
@click.option("--scheduler", default="normal", show_default=True, type=click.Choice(SCHEDULER_CHOICES))
@click.option("--batch", default=1, show_default=True, type=click.IntRange(min=1), help="Images, one seed each.")
@click.option("--dtype", default="fp32", show_default=True, type=click.Choice(DTYPE_CHOICES), help=DTYPE_HELP)
@click.option("--device", default="cpu", show_default=True, help=DEVICE_HELP)
@click.option("--registry", type=click.Path(), help="The lineage registry whose recorded hashes spare hashing the "
                                                    "files for the infotext (default $LINEAGE_HOME).")
@click.option("--json", "as_json", is_flag=True, help="Print the written files and their parameters as JSON.")
def sample(checkpoint: str, prompt: str, negative: str, adapters: tuple[str, ...], output: str, steps: int,
           cfg: float, seed: int | None, width: int, height: int, sampler: str, scheduler: str, batch: int,
           dtype: str, device: str, registry: str | None, as_json: bool) -> None:
    """Draw PROMPT with the SDXL single file CHECKPOINT into PNGs that carry A1111-style `parameters` text
    (prompt, steps, sampler, CFG, seed, size, model hash). On a CPU a full-size step takes many seconds:
    the progress bar shows the time per step and how long is left."""
    from lineage.adapters.apply import AdapterInput
    from lineage.io.atomic import atomic_write
    from lineage.train.sampling import png_info
    from lineage.train.sampling import sample as sample_images

    specs = [AdapterInput.parse(text) for text in adapters]
    images = sample_images(checkpoint, prompt, negative=negative, adapters=[(a.path, a.strength) for a in specs],
                           steps=steps, cfg=cfg, seed=seed, width=width, height=height, sampler=sampler,
                           scheduler=scheduler, batch=batch, dtype=dtype, device=device, registry=registry,
                           progress=not as_json)
    written = []
    for image, path in zip(images, output_paths(output, len(images))):
        data = io.BytesIO()
        image.save(data, format="PNG", pnginfo=png_info(image))
        atomic_write(path, data.getvalue(), inputs=[checkpoint, *(a.path for a in specs)])
        written.append({"path": str(path), "parameters": image.info["parameters"]})
    seconds = images[0].info["seconds_per_step"]
    if as_json:
        echo_json({"images": written, "seconds_per_step": seconds})
        return
    for item in written:
        click.echo(f"wrote {item['path']}")
    click.echo(f"{seconds:.2f} s per step")


def register(group: click.Group) -> None:
    """Add the sampling command to the `lmerge` group."""
    group.add_command(sample)
