"""The denoising loop against diffusers' StableDiffusionXLPipeline on the same tiny weights, seeds and scheduler,
with the same prompt embeddings handed to both (no tokenizer involved)."""
from __future__ import annotations

import os
import re
import shutil

import numpy
import pytest
import torch
from adapter_samples import modules_of, write_lora
from PIL import Image

import lineage
import lineage.adapters
from lineage.errors import LineageError
from lineage.io.hashing import hash_file
from lineage.io.safetensors import SafetensorsFile, save_file
from lineage.sdxl.synthetic import write_base
from lineage.train.live_adapters import apply_in_memory
from lineage.train.loading import load_sdxl
from lineage.train.sampling import (
    Conditioning,
    Sampler,
    decode,
    denoise,
    latent_scale,
    parameters_text,
    png_info,
    size_multiple,
)

diffusers = pytest.importorskip("diffusers")
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint  # noqa: E402
from test_models_reference import diffusers_vae_config, load_exactly  # noqa: E402
from test_schedules import reference_scheduler  # noqa: E402

TOLERANCE = 1e-5  # max |ours − diffusers| on images in [0, 1] (measured ~1e-6 after 4 guided steps, fp32)


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory) -> str:
    return write_base(tmp_path_factory.mktemp("sampling") / "tiny.safetensors", size="tiny", seed=0, dtype="F32")


@pytest.fixture(scope="module")
def ours(tiny_file):
    return load_sdxl(tiny_file)


@pytest.fixture(scope="module")
def pipeline_parts(tiny_file, ours):
    with SafetensorsFile(tiny_file) as f:
        checkpoint = dict(f.items())
    pooled_width = ours.clip_g.config.projection_dim
    unet = diffusers.UNet2DConditionModel(**ours.unet.config.diffusers_kwargs(pooled_width))
    load_exactly(unet, convert_ldm_unet_checkpoint(checkpoint, dict(unet.config)))
    vae = diffusers.AutoencoderKL(**diffusers_vae_config(ours.vae.config))
    load_exactly(vae, convert_ldm_vae_checkpoint(checkpoint, dict(vae.config)))
    return unet.eval(), vae.eval(), pooled_width


def conditioning(unet_config, pooled_width: int, batch: int) -> Conditioning:
    g = torch.Generator().manual_seed(5)
    context = torch.randn(2, batch, 77, unet_config.context_dim, generator=g)
    pooled = torch.randn(2, batch, pooled_width, generator=g)
    return Conditioning(context[0], pooled[0], context[1], pooled[1])


@pytest.mark.parametrize("sampler,scheduler,prediction,cfg", [
    ("euler", "normal", "epsilon", 7.0),
    ("euler_a", "normal", "v", 5.0),
    ("dpmpp_2m", "karras", "epsilon", 7.0),
    ("dpmpp_2m", "normal", "v+ztsnr", 4.0),
    ("euler", "karras", "epsilon", 1.0),  # cfg 1: no negative pass
])
def test_full_sample_equals_diffusers_pipeline(ours, pipeline_parts, sampler, scheduler, prediction, cfg):
    unet, vae, pooled_width = pipeline_parts
    seeds, steps, width, height = [7, 8], 4, 64, 32
    cond = conditioning(ours.unet.config, pooled_width, len(seeds))
    base, _, extra = prediction.partition("+")
    scheduler_object = reference_scheduler(sampler, scheduler == "karras", base, extra == "ztsnr")
    if sampler == "euler_a" and scheduler == "karras":
        pytest.skip("diffusers' ancestral Euler has no Karras option")
    pipe = diffusers.StableDiffusionXLPipeline(vae=vae, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                               tokenizer_2=None, unet=unet, scheduler=scheduler_object,
                                               add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    want = pipe(prompt_embeds=cond.context, pooled_prompt_embeds=cond.pooled,
                negative_prompt_embeds=cond.negative_context, negative_pooled_prompt_embeds=cond.negative_pooled,
                num_inference_steps=steps, guidance_scale=cfg, width=width, height=height,
                generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="pt").images

    latents = denoise(ours.unet, cond, seeds=seeds, width=width, height=height, steps=steps, cfg=cfg,
                      sampler=sampler, scheduler=scheduler, prediction=prediction, latent_cells=latent_scale(ours.vae))
    got = decode(ours.vae, latents)
    assert got.shape == want.shape == (len(seeds), 3, height, width)
    assert (got - want).abs().max().item() <= TOLERANCE
    assert got.std() > 0.01  # not a flat image


def test_seeds_are_per_image(ours, pipeline_parts):
    """Image i of a batch from seed s equals the single image from seed s + i (A1111's convention)."""
    _, _, pooled_width = pipeline_parts
    cond = conditioning(ours.unet.config, pooled_width, 2)
    settings = dict(width=32, height=32, steps=3, cfg=5.0, sampler="euler_a", scheduler="normal",
                    prediction="epsilon", latent_cells=latent_scale(ours.vae))
    pair = denoise(ours.unet, cond, seeds=[3, 4], **settings)
    second = Conditioning(*(t[1:] for t in (cond.context, cond.pooled, cond.negative_context, cond.negative_pooled)))
    alone = denoise(ours.unet, second, seeds=[4], **settings)
    # batched and single convolutions round differently in fp32: equal to ~1e-4, while seeds differ by O(1)
    assert (pair[1:] - alone).abs().max() < 1e-3
    assert (pair[0] - pair[1]).abs().max() > 0.1


def test_size_multiple_follows_the_model(ours):
    assert size_multiple(ours.unet, ours.vae) == latent_scale(ours.vae) * 2 ** (len(ours.unet.config.channel_mult) - 1)


def test_adapters_in_memory_equal_the_baked_checkpoint(tiny_file, tmp_path):
    """A LoRA (with conv modules) added in memory gives the weights, and so the samples, of `lmerge apply`'s file."""
    lora = write_lora(tmp_path / "lora.safetensors", modules_of(tiny_file, conv=True), rank=4, alpha=2.0)
    baked = lineage.adapters.apply(tiny_file, [(lora, 0.8)], tmp_path / "baked.safetensors", record=False,
                                   progress=False).path
    live = load_sdxl(tiny_file)
    changed = apply_in_memory(live, tiny_file, [(lora, 0.8)])
    reference = load_sdxl(baked)
    plain = load_sdxl(tiny_file)
    assert changed > 0
    live_weights, plain_weights = live.state_dict(), plain.state_dict()
    moved = [k for k, v in live_weights.items() if not torch.equal(v, plain_weights[k])]
    assert len(moved) == changed
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(live_weights[key], value, rtol=1e-6, atol=1e-7)
    pooled_width = live.clip_g.config.projection_dim
    cond = conditioning(live.unet.config, pooled_width, 1)
    settings = dict(seeds=[1], width=32, height=32, steps=3, cfg=6.0, sampler="dpmpp_2m", scheduler="karras",
                    prediction="epsilon", latent_cells=latent_scale(live.vae))
    torch.testing.assert_close(denoise(live.unet, cond, **settings), denoise(reference.unet, cond, **settings),
                               rtol=1e-5, atol=1e-5)
    assert not torch.allclose(denoise(plain.unet, cond, **settings), denoise(live.unet, cond, **settings))


def parse_parameters(text: str) -> dict[str, str]:
    """Read A1111's infotext back the way its PNG-info tab does: prompt lines, `Negative prompt:`, `Key: value, …`."""
    *lines, last = text.split("\n")
    # `Key: value` pairs split at commas, except inside a quoted value (`Lora hashes: "a: 1, b: 2"`).
    found = dict(re.findall(r'\s*([^:,]+): ("[^"]*"|[^,]*)', last))
    negative = [line for line in lines if line.startswith("Negative prompt: ")]
    found["prompt"] = "\n".join(line for line in lines if not line.startswith("Negative prompt: "))
    found["negative"] = negative[0].removeprefix("Negative prompt: ") if negative else ""
    return found


def test_parameters_text_parses_back(tmp_path):
    text = parameters_text(prompt="a red cube", negative="blurry", steps=28, sampler="euler_a", scheduler="karras",
                           cfg=7.0, seed=1234, width=1024, height=768, model_hash="0123456789", model_name="base")
    assert text.split("\n")[-1] == ("Steps: 28, Sampler: Euler a, Schedule type: Karras, CFG scale: 7, Seed: 1234, "
                                    "Size: 1024x768, Model hash: 0123456789, Model: base")
    image = Image.new("RGB", (8, 8))
    image.info["parameters"] = text
    image.save(tmp_path / "x.png", pnginfo=png_info(image))
    read = parse_parameters(Image.open(tmp_path / "x.png").text["parameters"])
    assert read["prompt"] == "a red cube" and read["negative"] == "blurry" and read["Seed"] == "1234"
    assert read["CFG scale"] == "7" and read["Sampler"] == "Euler a" and read["Model hash"] == "0123456789"
    plain = parameters_text(prompt="p", negative="", steps=4, sampler="dpmpp_2m", scheduler="normal", cfg=5.5,
                            seed=0, width=64, height=64, model_hash="a" * 10, model_name="m")
    assert "Negative prompt" not in plain and parse_parameters(plain)["CFG scale"] == "5.5"
    named = parameters_text(prompt="p", negative="", steps=4, sampler="euler", scheduler="normal", cfg=7, seed=0,
                            width=64, height=64, model_hash="a" * 10, model_name="mix: v2, final",
                            lora_hashes={"style, v1": "0123456789ab", "detail": "ba9876543210"})
    assert named.endswith('Model: mix v2 final, Lora hashes: "style v1: 0123456789ab, detail: ba9876543210"')


@pytest.mark.parametrize("components,message", [
    (("unet",), "has no CLIP-L text encoder and OpenCLIP-G text encoder and VAE"),
    (("unet", "clip_l", "clip_g"), "has no VAE"),
])
def test_missing_parts_are_one_line_errors(lmerge, tmp_path, components, message):
    part = write_base(tmp_path / "part.safetensors", size="tiny", components=components)
    code, out, err = lmerge("sample", part, "a cube", "-o", tmp_path / "out.png", "--width", 64, "--height", 64)
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out.png").exists()


def test_bad_requests_are_one_line_errors(lmerge, tiny_file, tmp_path):
    other = tmp_path / "other.safetensors"
    save_file({"some.weight": torch.zeros(2)}, other)
    for args, message in [((other,), "not an SDXL checkpoint"),
                          ((tiny_file, "--width", 100), "multiples of 8"),
                          ((tiny_file, "--width", 72, "--height", 64), "multiples of 32"),
                          ((tiny_file, "--sampler", "heun"), "Invalid value for '--sampler'")]:
        code, _, err = lmerge("sample", args[0], "a cube", "-o", tmp_path / "out.png", *args[1:])
        assert code != 0 and message in err, (args, err)
    with pytest.raises(LineageError, match="unknown sampler 'heun'"):
        lineage.sample(tiny_file, "a cube", sampler="heun")


def test_lmerge_sample_writes_pngs_with_parameters(lmerge, tiny_file, tmp_path):
    code, out, err = lmerge("sample", tiny_file, "a red cube", "--negative", "blurry", "-o", tmp_path / "cube.png",
                            "--steps", 3, "--width", 64, "--height", 32, "--seed", 5, "--batch", 2,
                            "--sampler", "euler_a", "--scheduler", "karras")
    assert code == 0, err
    autov2 = hash_file(tiny_file).autov2
    for index in range(2):
        image = Image.open(tmp_path / f"cube-{index}.png")
        assert image.size == (64, 32)
        read = parse_parameters(image.text["parameters"])
        assert read["prompt"] == "a red cube" and read["negative"] == "blurry"
        assert read["Seed"] == str(5 + index) and read["Steps"] == "3" and read["Size"] == "64x32"
        assert read["Sampler"] == "Euler a" and read["Schedule type"] == "Karras" and read["Model hash"] == autov2
    assert "s per step" in out


def test_sample_reads_the_prediction_type_and_is_reproducible(family):
    settings = dict(steps=2, width=32, height=32, seed=3, progress=False)
    v_model = lineage.sample(family["vchild"], "a cube", sampler="dpmpp_2m", **settings)[0]
    again = lineage.sample(family["vchild"], "a cube", sampler="dpmpp_2m", **settings)[0]
    assert v_model.tobytes() == again.tobytes()
    with_eps = lineage.sample(family["child"], "a cube", sampler="dpmpp_2m", **settings)[0]
    assert with_eps.tobytes() != v_model.tobytes()


def test_sample_with_adapter_equals_the_baked_checkpoint(tiny_file, tmp_path):
    lora = write_lora(tmp_path / "lora.safetensors", modules_of(tiny_file, conv=True), rank=4, alpha=2.0)
    baked = lineage.adapters.apply(tiny_file, [(lora, 0.8)], tmp_path / "baked.safetensors", record=False,
                                   progress=False).path
    settings = dict(steps=2, width=32, height=32, seed=9, cfg=5.0, progress=False)
    live_image = lineage.sample(tiny_file, "a cube", adapters=[(lora, 0.8)], **settings)[0]
    # A1111's Lora extension lists the adapter by name and short AutoV3, which Civitai reads.
    assert parse_parameters(live_image.info["parameters"])["Lora hashes"] == f'"lora: {hash_file(lora).autov3[:12]}"'
    live = torch.tensor(list(live_image.getdata()))
    reference = torch.tensor(list(lineage.sample(baked, "a cube", **settings)[0].getdata()))
    plain = torch.tensor(list(lineage.sample(tiny_file, "a cube", **settings)[0].getdata()))
    assert (live - reference).abs().max() <= 1  # 8-bit rounding at most
    assert (live - plain).abs().max() > 1


def pixels(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(numpy.array(image)).float()


def test_bf16_and_fp16_run_the_models_in_that_dtype_and_draw_close_to_fp32(tiny_file, caplog):
    """The weights load in the dtype (no fp32 copy kept), the VAE stays fp32 under fp16, and the image is close
    to fp32's. cfg 1: guidance multiplies the rounding of cond − uncond by the scale, and the tiny model's random
    weights make that difference as small as the rounding (the UNet's outputs themselves differ by 0.8% in bf16,
    0.3% in fp16, as diffusers' do)."""
    settings = dict(steps=3, width=64, height=64, seed=1, cfg=1.0, progress=False)
    reference = pixels(Sampler(tiny_file, dtype="fp32")("a cat", **settings)[0])
    # (dtype, the VAE's dtype, largest and mean pixel difference allowed in 0..255; measured 5 / 0.5 and 1 / 0.04)
    for name, dtype, vae_dtype, largest, mean in [("bf16", torch.bfloat16, torch.bfloat16, 16, 2.0),
                                                   ("fp16", torch.float16, torch.float32, 4, 0.5)]:
        caplog.clear()
        drawn = Sampler(tiny_file, dtype=name)
        assert ("fp16 on a CPU is very slow" in caplog.text) == (name == "fp16")  # hundreds of times slower
        parts = {part: {p.dtype for p in drawn.model.part(part).parameters()} for part in drawn.model.config.parts}
        assert parts == {"unet": {dtype}, "clip_l": {dtype}, "clip_g": {dtype}, "vae": {vae_dtype}}, name
        difference = (pixels(drawn("a cat", **settings)[0]) - reference).abs()
        assert 0 < difference.max() <= largest and difference.mean() <= mean, (name, difference.max())


def test_sampler_math_stays_fp32_when_the_unet_runs_in_bf16(tiny_file):
    """Noise, latents and the guidance mix are fp32: the UNet sees its own dtype and its output comes back as fp32."""
    model = load_sdxl(tiny_file, dtype=torch.bfloat16)
    seen = []
    model.unet.register_forward_hook(lambda module, args, out: seen.append((args[0].dtype, out.dtype)))
    cond = conditioning(model.unet.config, model.clip_g.config.projection_dim, 1)
    latents = denoise(model.unet, cond, seeds=[1], width=32, height=32, steps=2, cfg=5.0, sampler="dpmpp_2m",
                      scheduler="karras", prediction="epsilon", latent_cells=latent_scale(model.vae))
    assert latents.dtype == torch.float32 and torch.isfinite(latents).all()
    assert seen == [(torch.bfloat16, torch.bfloat16)] * 2


def test_lmerge_sample_dtype_and_device_options(lmerge, tiny_file, tmp_path):
    common = ("--steps", 2, "--width", 64, "--height", 64, "--seed", 2, "--cfg", 1, "--json")
    drawn = {}
    for name in ("fp32", "bf16"):
        code, out, err = lmerge("sample", tiny_file, "a cube", "-o", tmp_path / f"{name}.png", "--dtype", name, *common)
        assert code == 0, err
        drawn[name] = pixels(Image.open(tmp_path / f"{name}.png"))
    # bf16 reached the models: a slightly different image
    assert 0 < (drawn["fp32"] - drawn["bf16"]).abs().max() <= 16
    code, _, err = lmerge("sample", tiny_file, "a cube", "-o", tmp_path / "x.png", "--dtype", "fp8")
    assert code == 2 and "Invalid value for '--dtype'" in err
    for device, message in [("tpu", "--device tpu: not a device"), ("cuda:7", "--device cuda:7: ")]:
        code, _, err = lmerge("sample", tiny_file, "a cube", "-o", tmp_path / "x.png", "--device", device)
        assert code == 1 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x.png").exists()
    with pytest.raises(LineageError, match="dtype 'fp8' is not one of fp32, bf16, fp16"):
        lineage.sample(tiny_file, "a cube", dtype="fp8")
    with pytest.raises(LineageError, match="is not one of fp32, bf16, fp16"):
        Sampler(tiny_file, dtype=torch.float64)


def files_hashed(monkeypatch) -> list[str]:
    """The paths `hash_file` is called for from now on (it still hashes them)."""
    from lineage.io import hashing

    hashed = []

    def counted(path, *args, **kwargs):
        hashed.append(str(path))
        return hash_file(path, *args, **kwargs)  # this module's own reference: the real one

    monkeypatch.setattr(hashing, "hash_file", counted)
    return hashed


def test_known_hashes_are_not_computed_again(ours, tiny_file, lmerge, tmp_path, monkeypatch):
    """The infotext's `Model hash` and `Lora hashes` come from the registry for files it recorded unchanged (same
    path, size and mtime), or from the caller; only the others are hashed."""
    model = tmp_path / "model.safetensors"
    shutil.copy(tiny_file, model)
    lora = write_lora(tmp_path / "lora.safetensors", modules_of(tiny_file), rank=2, alpha=1.0)
    assert lmerge("add", model)[0] == 0 and lmerge("add", lora, "--parent", model, "--relation", "adapter")[0] == 0
    hashed = files_hashed(monkeypatch)
    side = size_multiple(ours.unet, ours.vae)
    settings = dict(steps=1, width=side, height=side, seed=1, progress=False)
    image = lineage.sample(model, "a cube", adapters=[(lora, 0.5)], **settings)[0]
    assert hashed == []
    read = parse_parameters(image.info["parameters"])
    assert read["Model hash"] == hash_file(model).autov2
    assert read["Lora hashes"] == f'"lora: {hash_file(lora).autov3[:12]}"'
    stat = os.stat(model)
    os.utime(model, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched since it was recorded: hashed
    lineage.sample(model, "a cube", adapters=[(lora, 0.5)], **settings)
    assert hashed == [str(model)]
    hashed.clear()
    given = Sampler(tiny_file, adapters=[lora], model_hash="0123456789", adapter_hashes={str(lora): "ab" * 32})
    assert hashed == [] and given.model_hash == "0123456789" and given.lora_hashes == {"lora": "ab" * 6}
