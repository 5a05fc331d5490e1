"""Our SDXL models against the reference implementations on the same weights: diffusers' UNet2DConditionModel
and AutoencoderKL, transformers' CLIPTextModel and CLIPTextModelWithProjection, each loaded from the
generated tiny checkpoint through diffusers' own single-file converters (no hub access: configs are
passed explicitly). fp32, max relative error (max |ours - ref| / max |ref|) at most 1e-5."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lineage.io.safetensors import SafetensorsFile
from lineage.sdxl.synthetic import write_base
from lineage.train.loading import load_sdxl
from lineage.train.unet import timestep_embedding
from lineage.train.vae import VAEConfig

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from diffusers.loaders.single_file_utils import (  # noqa: E402
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)

TOLERANCE = 1e-5
SIZE_VALUES = 6  # SDXL's micro-conditioning: original h, w, crop top, left, target h, w


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).abs().max() / reference.abs().max()).item()


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory) -> str:
    return write_base(tmp_path_factory.mktemp("models") / "tiny.safetensors", size="tiny", seed=0)


@pytest.fixture(scope="module")
def checkpoint(tiny_file) -> dict[str, torch.Tensor]:
    with SafetensorsFile(tiny_file) as f:
        return {k: v.float() if v.is_floating_point() else v for k, v in f.items()}


@pytest.fixture(scope="module")
def ours(tiny_file):
    return load_sdxl(tiny_file, dtype=torch.float32)


def diffusers_vae_config(c: VAEConfig) -> dict:
    levels = len(c.channel_mult)
    return dict(in_channels=c.in_channels, out_channels=c.out_channels, latent_channels=c.z_channels,
                down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
                block_out_channels=tuple(c.channels * m for m in c.channel_mult), layers_per_block=c.num_res_blocks,
                norm_num_groups=c.norm_groups, scaling_factor=c.scale_factor, sample_size=32)


def text_config(c, act: str, projection_dim: int | None = None):
    """transformers' CLIPTextConfig for our config; eos_token_id=2 selects its argmax pooling, CLIP's rule."""
    extra = {"projection_dim": projection_dim} if projection_dim else {}
    return transformers.CLIPTextConfig(vocab_size=c.vocab_size, hidden_size=c.width, intermediate_size=c.mlp_width,
                                       num_hidden_layers=c.layers, num_attention_heads=c.heads,
                                       max_position_embeddings=c.context_length, hidden_act=act,
                                       layer_norm_eps=1e-5, bos_token_id=c.vocab_size - 2, eos_token_id=2,
                                       pad_token_id=0, **extra)


def load_exactly(model: torch.nn.Module, state: dict[str, torch.Tensor], unused: set[str] = frozenset()) -> None:
    """Load the converted weights: every parameter found, nothing left over but `unused`."""
    names = set(model.state_dict())
    if not any(name.startswith("text_model.") for name in names):  # transformers >= 5 dropped the text_model level
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
        unused = {k.removeprefix("text_model.") for k in unused}
    result = model.load_state_dict(state, strict=False)
    assert result.missing_keys == []
    assert set(result.unexpected_keys) <= unused


def prompts(vocab_size: int, pad: int) -> torch.Tensor:
    """Two token sequences shaped like real ones: start token, words, end token (the highest id), padding."""
    start, end = vocab_size - 2, vocab_size - 1
    g = torch.Generator().manual_seed(0)
    rows = []
    for length in (5, 30):
        words = torch.randint(1, start, (length,), generator=g).tolist()
        ids = [start, *words, end]
        rows.append(ids + [pad] * (77 - len(ids)))
    return torch.tensor(rows)


def reference_unet(ours, checkpoint) -> torch.nn.Module:
    """diffusers' UNet2DConditionModel holding the tiny checkpoint's UNet weights."""
    config = ours.unet.config.diffusers_kwargs(ours.clip_g.config.projection_dim)
    reference = diffusers.UNet2DConditionModel(**config)
    load_exactly(reference, convert_ldm_unet_checkpoint(checkpoint, dict(reference.config)))
    return reference


def unet_calls(ours, reference: torch.nn.Module):
    """One forward of ours and of the reference on the same inputs (batch of two), as two closures."""
    config = ours.unet.config
    pooled_width = ours.clip_g.config.projection_dim
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, config.in_channels, 16, 16, generator=g)
    t = torch.tensor([999.0, 17.0])
    context = torch.randn(2, 77, config.context_dim, generator=g)
    pooled = torch.randn(2, pooled_width, generator=g)
    size_values = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024], [832, 1216, 64, 0, 896, 1152]])
    embed_width = (config.adm_in_channels - pooled_width) // SIZE_VALUES
    y = torch.cat([pooled, timestep_embedding(size_values.flatten(), embed_width).reshape(2, -1)], dim=1)
    added = {"text_embeds": pooled, "time_ids": size_values}
    return (lambda: ours.unet(x, t, context, y),
            lambda: reference(x, t, encoder_hidden_states=context, added_cond_kwargs=added).sample)


def test_unet_equals_diffusers(ours, checkpoint):
    reference = reference_unet(ours, checkpoint).eval()
    run_ours, run_reference = unet_calls(ours, reference)
    with torch.no_grad():
        assert relative_error(run_ours(), run_reference()) <= TOLERANCE


class OperatorCount(TorchDispatchMode):
    """Counts the aten operators a computation dispatches (autograd's backward ones included)."""

    def __init__(self):
        super().__init__()
        self.calls: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def training_step_operators(model: torch.nn.Module, run) -> Counter[str]:
    model.train()
    with OperatorCount() as count:
        run().square().mean().backward()
    model.zero_grad(set_to_none=True)
    return count.calls


# The operators that do the arithmetic of a UNet step, and those that only move memory
HEAVY = ("convolution", "convolution_backward", "mm", "addmm", "bmm", "native_group_norm",
         "native_group_norm_backward", "native_layer_norm", "native_layer_norm_backward",
         "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward")
COPIES = ("clone", "copy_", "cat", "contiguous", "_to_copy")


def test_unet_training_step_does_the_same_work_as_diffusers(ours, checkpoint):
    """Our step's time is held against diffusers' (benchmarks/bench_unet.py): it must run the same heavy
    operators the same number of times and copy memory no more often (no stray `.contiguous()` or layout
    conversion). On the benchmark's mid-size config the traces differ only by diffusers' extra copies and
    divisions by its output scale factors."""
    reference = reference_unet(ours, checkpoint)
    run_ours, run_reference = unet_calls(ours, reference)
    got, want = training_step_operators(ours.unet, run_ours), training_step_operators(reference, run_reference)
    assert {op: got[op] for op in HEAVY} == {op: want[op] for op in HEAVY}
    assert got["convolution"] > 0 and got["mm"] > 0
    assert all(got[op] <= want[op] for op in COPIES), {op: (got[op], want[op]) for op in COPIES}


def test_clip_l_equals_transformers(ours, checkpoint):
    config = ours.clip_l.config
    reference = transformers.CLIPTextModel(text_config(config, "quick_gelu"))
    load_exactly(reference, convert_ldm_clip_checkpoint(checkpoint), {"text_model.embeddings.position_ids"})
    reference.eval()
    ids = prompts(config.vocab_size, pad=config.vocab_size - 1)  # CLIP-L pads with the end token
    with torch.no_grad():
        got = ours.clip_l(ids)
        want = reference(ids, output_hidden_states=True)
    assert len(got.hidden_states) == len(want.hidden_states) == config.layers + 1
    for ours_h, ref_h in zip(got.hidden_states, want.hidden_states, strict=True):
        assert relative_error(ours_h, ref_h) <= TOLERANCE
    assert relative_error(got.last_hidden_state, want.last_hidden_state) <= TOLERANCE
    assert relative_error(got.pooled, want.pooler_output) <= TOLERANCE


def test_openclip_g_equals_transformers(ours, checkpoint):
    config = ours.clip_g.config
    reference = transformers.CLIPTextModelWithProjection(text_config(config, "gelu", config.projection_dim))
    converted = convert_open_clip_checkpoint(reference, checkpoint, prefix="conditioner.embedders.1.model.")
    load_exactly(reference, converted, {"text_model.embeddings.position_ids"})
    reference.eval()
    ids = prompts(config.vocab_size, pad=0)  # OpenCLIP-G pads with 0
    with torch.no_grad():
        got = ours.clip_g(ids)
        want = reference(ids, output_hidden_states=True)
    penultimate = -2  # what SDXL feeds its UNet
    assert relative_error(got.hidden_states[penultimate], want.hidden_states[penultimate]) <= TOLERANCE
    for ours_h, ref_h in zip(got.hidden_states, want.hidden_states, strict=True):
        assert relative_error(ours_h, ref_h) <= TOLERANCE
    assert relative_error(got.pooled, want.text_embeds) <= TOLERANCE


def test_vae_equals_diffusers(ours, checkpoint):
    config = ours.vae.config
    reference = diffusers.AutoencoderKL(**diffusers_vae_config(config))
    load_exactly(reference, convert_ldm_vae_checkpoint(checkpoint, dict(reference.config)))
    reference.eval()
    g = torch.Generator().manual_seed(2)
    image = torch.rand(2, config.in_channels, 32, 32, generator=g) * 2 - 1
    latent = torch.randn(2, config.z_channels, 4, 4, generator=g)
    with torch.no_grad():
        mean, logvar = ours.vae.encode(image)
        distribution = reference.encode(image).latent_dist
        decoded, want_decoded = ours.vae.decode(latent), reference.decode(latent).sample
    assert relative_error(mean, distribution.mean) <= TOLERANCE
    assert relative_error(logvar, distribution.logvar) <= TOLERANCE
    assert relative_error(decoded, want_decoded) <= TOLERANCE
