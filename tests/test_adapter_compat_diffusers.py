"""diffusers (the real package, with peft) loads our SDXL LoRA files: `lora_state_dict` takes our kohya
LoRA / LoCon and our PEFT file, and its own conversion of our kohya file gives exactly our PEFT keys,
tensors and alphas."""
import types

import diffusers  # noqa: F401 (a test extra: fails loudly when missing)
import peft  # noqa: F401
import pytest
import torch
from adapter_samples import modules_of, write_lora
from loader_rules import comfyui_key_map, comfyui_unloaded

from lineage.adapters.convert import convert
from lineage.adapters.reader import open_adapter
from lineage.io.safetensors import SafetensorsFile, read_header

SDXL_UNET_CONFIG = types.SimpleNamespace(layers_per_block=2)  # what diffusers reads to renumber sgm blocks
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Our LoCon (default + convolution modules, alpha != rank) in kohya's dialect and converted to PEFT."""
    from lineage.sdxl.synthetic import write_base
    d = tmp_path_factory.mktemp("diffusers")
    base = write_base(d / "base.safetensors", size="tiny")
    kohya = write_lora(d / "kohya.safetensors", modules_of(base, conv=True), rank=4, alpha=2)
    return {"base": base, "kohya": kohya, "peft": convert(kohya, d / "peft.safetensors", to="peft", record=False).path}


def tensors(path):
    with SafetensorsFile(path) as f:
        return {k: f.read(k) for k in f.keys()}


def diffusers_peft_of_kohya(path):
    """What diffusers makes of a kohya SDXL file on load: its state dict in PEFT names, and the alphas."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils.state_dict_utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    state, alphas = StableDiffusionXLPipeline.lora_state_dict(path, unet_config=SDXL_UNET_CONFIG)
    out = {"unet." + k: v for k, v in convert_unet_state_dict_to_peft(
        {k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")}).items()}
    for prefix in ("text_encoder.", "text_encoder_2."):
        part = {k: v for k, v in state.items() if k.startswith(prefix)}
        out.update(convert_state_dict_to_peft(convert_state_dict_to_diffusers(part)))
    return out, alphas


def test_diffusers_reads_our_kohya_file_as_our_peft_file(pair):
    theirs, alphas = diffusers_peft_of_kohya(pair["kohya"])
    ours = tensors(pair["peft"])
    assert theirs.keys() == ours.keys() and len(ours) == 2 * (986 + 66)
    for key, value in ours.items():
        assert torch.equal(theirs[key], value), key
    assert len(alphas) == 986 + 66 and set(alphas.values()) == {2.0}


def test_diffusers_reads_our_peft_file_with_its_alphas(pair):
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig

    state, alphas, metadata = StableDiffusionXLPipeline.lora_state_dict(pair["peft"], return_lora_metadata=True)
    assert alphas is None  # PEFT files carry alpha in the config, not in tensors
    ours = tensors(pair["peft"])
    assert state.keys() == ours.keys() and all(torch.equal(state[k], v) for k, v in ours.items())
    for component in COMPONENTS:
        config = LoraConfig(**{k.removeprefix(component + "."): v for k, v in metadata.items()
                               if k.startswith(component + ".")})
        assert (config.r, config.lora_alpha) == (4, 2.0)
        names = {k.removeprefix(component + ".").rsplit(".", 2)[0] for k in ours if k.startswith(component + ".")}
        # PEFT takes a target as the module's path or a dot-separated suffix of it
        targeted = {n for n in names if any(n == t or n.endswith("." + t) for t in config.target_modules)}
        assert targeted == names and len(config.target_modules) == len(names)


def test_diffusers_alpha_pattern_for_modules_that_differ(pair, tmp_path):
    """Per-module alphas other than the common one go to alpha_pattern, which diffusers hands to PEFT."""
    adapter = open_adapter(pair["kohya"])
    with SafetensorsFile(pair["kohya"]) as f:
        values = {k: f.read(k) for k in f.keys()}
    odd = "lora_unet_input_blocks_4_1_proj_in"
    values[f"{odd}.alpha"] = torch.tensor(1.0, dtype=torch.float16)
    from lineage.io.safetensors import save_file
    save_file(values, tmp_path / "k.safetensors")
    out = convert(tmp_path / "k.safetensors", tmp_path / "p.safetensors", to="peft", record=False)
    from diffusers import StableDiffusionXLPipeline
    _, _, metadata = StableDiffusionXLPipeline.lora_state_dict(out.path, return_lora_metadata=True)
    assert metadata["unet.alpha_pattern"] == {"down_blocks.1.attentions.0.proj_in": 1.0}
    assert metadata["unet.lora_alpha"] == 2.0 and len(adapter.modules) == 986 + 66


def test_comfyui_takes_our_peft_file_only_outside_unet_attention(pair):
    """ComfyUI maps diffusers UNet attention only under the old attention-processor names
    (`…attn1.processor.to_q`), so a PEFT file's UNet attention keys stay unloaded there: for ComfyUI,
    A1111 and Forge, convert to kohya (which loads completely, see test_adapter_compat.py)."""
    theirs, _ = diffusers_peft_of_kohya(pair["kohya"])
    kohya = tensors(pair["kohya"])
    # diffusers' UNet path -> sgm path, from diffusers' own renaming of our kohya file (same tensors)
    by_value = {(tuple(v.shape), v.flatten()[:8].tolist().__repr__()): k for k, v in kohya.items()}
    diffusers_unet = {}
    for key, value in theirs.items():
        if key.startswith("unet.") and key.endswith(".lora_A.weight"):
            source = by_value[(tuple(value.shape), value.flatten()[:8].tolist().__repr__())]
            sgm = source.split(".")[0].removeprefix("lora_unet_")
            diffusers_unet[key.removeprefix("unet.").removesuffix(".lora_A.weight")] = sgm
    key_map = comfyui_key_map(read_header(pair["base"])[0], diffusers_unet)
    unloaded = comfyui_unloaded(tensors(pair["peft"]), key_map)
    attention = {k for k in tensors(pair["peft"]) if k.startswith("unet.") and ".attn" in k and ".to_" in k}
    assert unloaded == attention and attention


def sdxl_like_models():
    """diffusers' UNet and transformers' CLIP text models with SDXL's structure at the "small" size
    (the widths of lineage.sdxl.synthetic's small checkpoints), randomly initialised."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    unet = UNet2DConditionModel(
        sample_size=32, layers_per_block=2, block_out_channels=(32, 64, 128),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(1, 2, 4), cross_attention_dim=144,
        addition_embed_type="text_time", addition_time_embed_dim=16, projection_class_embeddings_input_dim=176,
        use_linear_projection=True)
    clip_l = CLIPTextModel(CLIPTextConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=12,
                                          num_attention_heads=4, vocab_size=1000))
    clip_g = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=80, intermediate_size=320, num_hidden_layers=32,
                                                        num_attention_heads=4, vocab_size=1000, projection_dim=80))
    return unet, clip_l, clip_g


def lora_layers(model):
    from peft.tuners.lora import LoraLayer
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


@pytest.fixture(scope="module")
def small_base(tmp_path_factory):
    from lineage.sdxl.synthetic import write_base
    return write_base(tmp_path_factory.mktemp("small") / "base.safetensors", size="small")


@pytest.mark.parametrize("dialect", ["peft", "kohya"])
def test_diffusers_loads_our_files_into_sdxl_models(tmp_path, small_base, dialect):
    """diffusers puts every module of our PEFT and kohya files into real SDXL-shaped models, each with
    our factors and the scale alpha / rank."""
    from diffusers.loaders.lora_pipeline import StableDiffusionXLLoraLoaderMixin as Loader

    kohya = write_lora(tmp_path / "kohya.safetensors", modules_of(small_base, conv=True), rank=4, alpha=2)
    path = kohya if dialect == "kohya" else convert(kohya, tmp_path / "peft.safetensors", to="peft", record=False).path
    unet, clip_l, clip_g = sdxl_like_models()
    state, alphas, metadata = Loader.lora_state_dict(path, unet_config=unet.config, return_lora_metadata=True)
    Loader.load_lora_into_unet(state, alphas, unet, metadata=metadata, adapter_name="ours")
    for model, prefix in ((clip_l, "text_encoder"), (clip_g, "text_encoder_2")):
        Loader.load_lora_into_text_encoder(state, alphas, model, prefix=prefix, metadata=metadata, adapter_name="ours")
    layers = {**lora_layers(unet), **lora_layers(clip_l), **lora_layers(clip_g)}
    assert len(layers) == 986 + 66  # every module of the file, none left out
    assert {layer.scaling["ours"] for layer in layers.values()} == {0.5}
    ours = tensors(kohya)
    q = lora_layers(unet)["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"]
    name = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    assert torch.equal(q.lora_A["ours"].weight.to(torch.float16), ours[f"{name}.lora_down.weight"])
    assert torch.equal(q.lora_B["ours"].weight.to(torch.float16), ours[f"{name}.lora_up.weight"])


def test_per_module_alphas_reach_diffusers_through_our_peft_file(tmp_path, small_base):
    """Modules whose alpha differs from the others keep their own scale in diffusers when loaded from our
    PEFT file (the alpha_pattern of its adapter config), in the UNet and in both text encoders."""
    from diffusers.loaders.lora_pipeline import StableDiffusionXLLoraLoaderMixin as Loader

    from lineage.io.safetensors import save_file
    values = tensors(write_lora(tmp_path / "k0.safetensors", modules_of(small_base), rank=4, alpha=2))
    odd = {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": 1.0,
           "lora_te1_text_model_encoder_layers_3_self_attn_k_proj": 3.0,
           "lora_te2_text_model_encoder_layers_30_mlp_fc1": 8.0}
    for name, alpha in odd.items():
        values[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float16)
    save_file(values, tmp_path / "k.safetensors")
    path = convert(tmp_path / "k.safetensors", tmp_path / "p.safetensors", to="peft", record=False).path
    unet, clip_l, clip_g = sdxl_like_models()
    state, alphas, metadata = Loader.lora_state_dict(path, return_lora_metadata=True)
    Loader.load_lora_into_unet(state, alphas, unet, metadata=metadata, adapter_name="ours")
    Loader.load_lora_into_text_encoder(state, alphas, clip_l, prefix="text_encoder", metadata=metadata,
                                       adapter_name="ours")
    Loader.load_lora_into_text_encoder(state, alphas, clip_g, prefix="text_encoder_2", metadata=metadata,
                                       adapter_name="ours")
    expected = [(unet, "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", 0.25),
                (clip_l, "encoder.layers.3.self_attn.k_proj", 0.75), (clip_g, "encoder.layers.30.mlp.fc1", 2.0)]
    others = []
    for model, suffix, scale in expected:
        scales = {name: layer.scaling["ours"] for name, layer in lora_layers(model).items()}
        assert [s for n, s in scales.items() if n == suffix or n.endswith("." + suffix)] == [scale], suffix
        others += [s for n, s in scales.items() if not (n == suffix or n.endswith("." + suffix))]
    assert set(others) == {0.5} and len(others) == 986 - 3
