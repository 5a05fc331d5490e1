"""SDXL conditioning (lineage.train.conditioning) against diffusers' StableDiffusionXLPipeline on the generated
tiny checkpoint: the pipeline is built from the same weights (diffusers' single-file converters, as in
tests/test_models_reference.py) and from transformers' CLIPTokenizer over the same vocabulary files."""
from __future__ import annotations

import pytest
import torch
from test_models_reference import SIZE_VALUES, load_exactly, relative_error, text_config
from tokenizer_files import transformers_tokenizer, write_hf_tokenizer

from lineage.errors import LineageError
from lineage.io.safetensors import SafetensorsFile
from lineage.sdxl.synthetic import write_base
from lineage.train.conditioning import (
    encode_prompts,
    encode_with_negatives,
    micro_conditioning,
    size_embedding_width,
    tokenize_prompts,
)
from lineage.train.loading import load_sdxl
from lineage.train.tokenizer import SDXLTokenizer

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from diffusers.loaders.single_file_utils import (  # noqa: E402
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_open_clip_checkpoint,
)

TOLERANCE = 1e-5
PROMPTS = ["a photo of a cat, highly detailed", "Ünïcödé café 日本語 🙂 2 boys, 1024x1024"]


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory) -> str:
    return write_base(tmp_path_factory.mktemp("conditioning") / "tiny.safetensors", size="tiny", seed=0)


@pytest.fixture(scope="module")
def ours(tiny_file):
    return load_sdxl(tiny_file, dtype=torch.float32)


@pytest.fixture(scope="module")
def tokenizer(ours) -> SDXLTokenizer:
    return SDXLTokenizer.default(ours.clip_l.config.vocab_size)  # CLIP's vocabulary cut to the tiny table


@pytest.fixture(scope="module")
def pipeline(ours, tiny_file, tokenizer, tmp_path_factory):
    """diffusers' SDXL pipeline over the same weights and vocabulary (tokenizer_2 pads with '!', id 0)."""
    with SafetensorsFile(tiny_file) as f:
        checkpoint = {k: v.float() for k, v in f.items()}
    folder = tmp_path_factory.mktemp("pipeline")
    clip_l_config, clip_g_config = ours.clip_l.config, ours.clip_g.config
    text_encoder = transformers.CLIPTextModel(text_config(clip_l_config, "quick_gelu"))
    load_exactly(text_encoder, convert_ldm_clip_checkpoint(checkpoint), {"text_model.embeddings.position_ids"})
    text_encoder_2 = transformers.CLIPTextModelWithProjection(
        text_config(clip_g_config, "gelu", clip_g_config.projection_dim))
    load_exactly(text_encoder_2, convert_open_clip_checkpoint(text_encoder_2, checkpoint,
                                                              prefix="conditioner.embedders.1.model."),
                 {"text_model.embeddings.position_ids"})
    unet = diffusers.UNet2DConditionModel(**ours.unet.config.diffusers_kwargs(clip_g_config.projection_dim))
    load_exactly(unet, convert_ldm_unet_checkpoint(checkpoint, dict(unet.config)))
    hf_folder = write_hf_tokenizer(tokenizer, folder / "tokenizer")
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=None, text_encoder=text_encoder.eval(), text_encoder_2=text_encoder_2.eval(),
        tokenizer=transformers_tokenizer(hf_folder, model_max_length=77),
        tokenizer_2=transformers_tokenizer(hf_folder, pad_token="!", model_max_length=77),
        unet=unet.eval(), scheduler=diffusers.EulerDiscreteScheduler(), force_zeros_for_empty_prompt=True)
    return pipe


def test_context_and_pooled_equal_diffusers(ours, tokenizer, pipeline):
    with torch.no_grad():
        context, pooled = encode_prompts(ours, PROMPTS, tokenizer=tokenizer)
        want = pipeline.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)
    width = ours.clip_l.config.width + ours.clip_g.config.width
    assert context.shape == (len(PROMPTS), 77, width)
    assert pooled.shape == (len(PROMPTS), ours.clip_g.config.projection_dim)
    assert relative_error(context, want[0]) <= TOLERANCE
    assert relative_error(pooled, want[2]) <= TOLERANCE


def test_default_tokenizer_fits_the_model(ours, tokenizer):
    """Without a tokenizer, CLIP's shipped vocabulary sized to the model's table: the same result."""
    with torch.no_grad():
        default = encode_prompts(ours, PROMPTS)
        explicit = encode_prompts(ours, PROMPTS, tokenizer=tokenizer)
    assert torch.equal(default[0], explicit[0]) and torch.equal(default[1], explicit[1])
    with pytest.raises(LineageError, match="the tokenizer has 49408 tokens but the text encoders only"):
        encode_prompts(ours, PROMPTS, tokenizer=SDXLTokenizer.default())


@pytest.mark.parametrize("negative", ["", "blurry, low quality"])
def test_negatives_equal_diffusers(ours, tokenizer, pipeline, negative):
    """An empty negative prompt: zeros (diffusers' force_zeros_for_empty_prompt, its negative_prompt=None);
    any other is encoded like the prompt."""
    with torch.no_grad():
        got = encode_with_negatives(ours, PROMPTS, [negative] * len(PROMPTS), tokenizer=tokenizer)
        want = pipeline.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=True,
                                      negative_prompt=[negative] * len(PROMPTS) if negative else None)
    assert relative_error(got[0], want[0]) <= TOLERANCE and relative_error(got[1], want[2]) <= TOLERANCE
    if negative:
        assert relative_error(got[2], want[1]) <= TOLERANCE and relative_error(got[3], want[3]) <= TOLERANCE
    else:
        assert not got[2].any() and not got[3].any() and not want[1].any()


def test_empty_prompt_is_encoded(ours, tokenizer, pipeline):
    """An empty positive prompt is a real prompt (start, end, padding): not zeros, equal to diffusers."""
    with torch.no_grad():
        context, pooled = encode_prompts(ours, [""], tokenizer=tokenizer)
        want = pipeline.encode_prompt([""], device="cpu", do_classifier_free_guidance=False)
    assert context.abs().sum() > 0
    assert relative_error(context, want[0]) <= TOLERANCE and relative_error(pooled, want[2]) <= TOLERANCE


def test_micro_conditioning_equals_diffusers(ours, pipeline):
    pooled = torch.randn(2, ours.clip_g.config.projection_dim, generator=torch.Generator().manual_seed(0))
    width = size_embedding_width(ours)
    assert width * SIZE_VALUES + pooled.shape[1] == ours.unet.config.adm_in_channels
    for original, crop, target in [((1024, 1024), (0, 0), (1024, 1024)), ((832, 1216), (64, 8), (896, 1152))]:
        y = micro_conditioning(pooled, original_size=original, crop=crop, target_size=target, embedding_width=width)
        time_ids = pipeline._get_add_time_ids(original, crop, target, torch.float32,
                                              text_encoder_projection_dim=pooled.shape[1])
        sizes = pipeline.unet.add_time_proj(time_ids.flatten()).reshape(1, -1)  # what the UNet embeds
        assert y.shape == (2, ours.unet.config.adm_in_channels)
        assert torch.equal(y[:, :pooled.shape[1]], pooled)
        assert relative_error(y[:, pooled.shape[1]:], sizes.expand(2, -1)) <= TOLERANCE
    sdxl_width = micro_conditioning(pooled, original_size=(1024, 1024), target_size=(1024, 1024)).shape[1]
    assert sdxl_width == pooled.shape[1] + 6 * 256  # 256 per value unless told


def test_emphasis_scales_tokens_and_keeps_the_mean(ours, tokenizer):
    """'(cat:1.5)': cat's hidden states x1.5 relative to the rest, then the whole chunk rescaled to its old mean."""
    with torch.no_grad():
        plain, plain_pooled = encode_prompts(ours, ["a cat"], tokenizer=tokenizer)
        weighted, weighted_pooled = encode_prompts(ours, ["a (cat:1.5)"], tokenizer=tokenizer)
        same, _ = encode_prompts(ours, ["a (cat:1)"], tokenizer=tokenizer)
    n_a, n_cat = len(tokenizer.encode("a ")), len(tokenizer.encode("cat"))
    assert torch.allclose(same, plain)
    cat, rest = slice(1 + n_a, 1 + n_a + n_cat), slice(1 + n_a + n_cat, None)
    width_l = ours.clip_l.config.width
    for encoder in (slice(None, width_l), slice(width_l, None)):  # each encoder's states rescaled on their own
        got, before = weighted[0, :, encoder], plain[0, :, encoder]
        torch.testing.assert_close(got.mean(), before.mean(), rtol=1e-5, atol=1e-7)
        scale = (got[0] / before[0]).mean()  # the start token: weight 1, only rescaled
        torch.testing.assert_close(got[cat], before[cat] * 1.5 * scale, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(got[rest], before[rest] * scale, rtol=1e-4, atol=1e-6)
    assert torch.equal(weighted_pooled, plain_pooled)  # emphasis weights the context only, as A1111


def test_long_prompt_chunks_are_encoded_separately(ours, tokenizer):
    """Chunk i of a long prompt is encoded alone (start/end around it) and placed at 77·i; pooled is chunk 0's."""
    long = "0123456789" * 10  # CLIP splits numbers into digits, one token each: 100 tokens
    first, second = long[:75], long[75:]
    assert tokenizer.encode(long) == tokenizer.encode(first) + tokenizer.encode(second)
    assert len(tokenizer.encode(first)) == 75
    with torch.no_grad():
        context, pooled = encode_prompts(ours, [long, "a cat"], tokenizer=tokenizer)
        parts = encode_prompts(ours, [first, second, "a cat", ""], tokenizer=tokenizer)
    assert context.shape[1] == 2 * 77
    torch.testing.assert_close(context[0, :77], parts[0][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(context[0, 77:], parts[0][1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(context[1, :77], parts[0][2], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(context[1, 77:], parts[0][3], rtol=1e-5, atol=1e-6)  # padded with an empty chunk
    torch.testing.assert_close(pooled, parts[1][[0, 2]], rtol=1e-5, atol=1e-6)
    assert tokenize_prompts(tokenizer, [long]).clip_l_ids.shape[1] == 2
    with torch.no_grad():  # prompt and negative share one chunk count, as guidance needs
        context, _, negative_context, _ = encode_with_negatives(ours, ["a cat"], [long], tokenizer=tokenizer)
    assert context.shape == negative_context.shape == (1, 2 * 77, parts[0].shape[-1])
    torch.testing.assert_close(negative_context[0, 77:], parts[0][1], rtol=1e-5, atol=1e-6)


def test_missing_text_encoder_is_one_line(tiny_file):
    unet_only = load_sdxl(tiny_file, parts=("unet",))
    assert size_embedding_width(unet_only) == 256  # no pooled width to subtract: SDXL's
    with pytest.raises(LineageError, match="no CLIP-L and OpenCLIP-G text encoder: prompts cannot be encoded"):
        encode_prompts(unet_only, ["a cat"])
    with pytest.raises(LineageError, match="2 prompts but 1 negative"):
        encode_with_negatives(unet_only, ["a", "b"], [""])
