"""The SDXL module inventory (adapters/modules.py): kohya's default set, LoCon's convolutions, the
OpenCLIP-G q/k/v split, shapes from the header at every generated size."""
from collections import Counter

import pytest

from lineage.adapters.modules import modules_by_name, reference_modules, sdxl_modules
from lineage.errors import LineageError
from lineage.io.safetensors import read_header
from lineage.sdxl.synthetic import sdxl_shapes, write_base


class Info:
    def __init__(self, shape):
        self.shape = shape


def header(size):
    return {k: Info(s) for k, (_, s) in sdxl_shapes(size).items()}


def test_full_size_counts_are_kohyas_default_set():
    modules = sdxl_modules(header("full"))
    assert Counter(m.component for m in modules) == {"unet": 722, "clip_l": 72, "clip_g": 192}
    assert not any(m.conv for m in modules)
    assert len({m.name for m in modules}) == len(modules)


def test_locon_adds_the_resnet_and_sampler_layers():
    modules = sdxl_modules(header("full"), conv=True)
    extra = [m for m in modules if m.conv]
    assert len(modules) == 722 + 72 + 192 + len(extra)
    # 17 resnets x (in_layers.2, out_layers.3, emb_layers.1) + 11 skips + 2 downsamplers + 2 upsamplers
    assert len(extra) == 66
    by_name = {m.name: m for m in extra}
    assert by_name["lora_unet_input_blocks_1_0_in_layers_2"].shape == (320, 320, 3, 3)
    assert by_name["lora_unet_input_blocks_1_0_in_layers_2"].spatial
    assert by_name["lora_unet_input_blocks_4_0_skip_connection"].shape == (640, 320, 1, 1)
    assert not by_name["lora_unet_input_blocks_4_0_skip_connection"].spatial
    assert by_name["lora_unet_input_blocks_1_0_emb_layers_1"].shape == (320, 1280)
    assert "lora_unet_input_blocks_3_0_op" in by_name and "lora_unet_output_blocks_2_2_conv" in by_name
    names = {m.name for m in modules}
    for never in ("time_embed", "label_emb", "input_blocks_0_0", "lora_unet_out_", "norm", "in_layers_0"):
        assert not any(never in n for n in names), never


def test_names_keys_and_the_openclip_split():
    modules = modules_by_name(header("full"), conv=False)
    q = modules["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"]
    assert q.key == "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"
    assert (q.component, q.rows, q.shape) == ("unet", None, (640, 640))
    fc1 = modules["lora_te1_text_model_encoder_layers_0_mlp_fc1"]
    assert fc1.key == "conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
    assert fc1.shape == (3072, 768)
    in_proj = "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight"
    for i, part in enumerate("qkv"):
        m = modules[f"lora_te2_text_model_encoder_layers_31_self_attn_{part}_proj"]
        assert (m.key, m.rows, m.shape) == (in_proj, (1280 * i, 1280 * (i + 1)), (1280, 1280))
    assert modules["lora_te2_text_model_encoder_layers_0_mlp_fc2"].key.endswith("resblocks.0.mlp.c_proj.weight")
    assert modules["lora_te2_text_model_encoder_layers_0_self_attn_out_proj"].key.endswith("attn.out_proj.weight")


def test_shapes_come_from_the_header(tmp_path):
    path = write_base(tmp_path / "tiny.safetensors", size="tiny")
    tensors, _ = read_header(path)
    modules = modules_by_name(tensors)
    g = tensors["conditioner.embedders.1.model.transformer.resblocks.0.attn.out_proj.weight"].shape[0]
    assert modules["lora_te2_text_model_encoder_layers_0_self_attn_v_proj"].rows == (2 * g, 3 * g)
    assert modules["lora_te2_text_model_encoder_layers_0_self_attn_v_proj"].shape == (g, g)
    width = tensors["model.diffusion_model.input_blocks.4.0.out_layers.3.weight"].shape[0]  # the second level's
    assert modules["lora_unet_input_blocks_4_1_proj_in"].shape == (width, width)
    assert set(modules) == set(reference_modules())


def test_components_select_and_unknown_is_an_error():
    unet = sdxl_modules(header("tiny"), components=["unet"])
    assert {m.component for m in unet} == {"unet"} and len(unet) == 722
    with pytest.raises(LineageError, match="vae"):
        sdxl_modules(header("tiny"), components=["vae"])
