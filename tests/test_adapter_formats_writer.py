"""Keys per dialect (adapters/writer.py) and the metadata an adapter gets (adapters/metadata.py)."""
import json

import pytest

from lineage.adapters.dialects import DIALECTS, SGM_TO_DIFFUSERS_BLOCKS
from lineage.adapters.metadata import BaseModel, adapter_metadata, adapter_record
from lineage.adapters.writer import adapter_key, dialect_metadata, peft_config
from lineage.errors import LineageError
from lineage.graph.metadata import lineage_from_metadata
from lineage.graph.recording import origins_from_metadata


def test_keys_per_dialect():
    name = "lora_unet_output_blocks_2_2_conv"
    assert adapter_key("kohya", name, "lora_down") == f"{name}.lora_down.weight"
    assert adapter_key("kohya", name, "lokr_w1") == f"{name}.lokr_w1"
    assert adapter_key("kohya", name, "alpha") == f"{name}.alpha"
    assert adapter_key("peft", name, "lora_up") == "unet.up_blocks.0.upsamplers.0.conv.lora_B.weight"
    assert adapter_key("peft", "lora_unet_input_blocks_3_0_op", "lora_down") == \
        "unet.down_blocks.0.downsamplers.0.conv.lora_A.weight"
    assert adapter_key("peft", "lora_unet_middle_block_1_proj_out", "lora_down") == \
        "unet.mid_block.attentions.0.proj_out.lora_A.weight"
    assert adapter_key("peft", "lora_unet_output_blocks_8_0_skip_connection", "lora_down") == \
        "unet.up_blocks.2.resnets.2.conv_shortcut.lora_A.weight"
    assert adapter_key("peft", "lora_te1_text_model_encoder_layers_3_mlp_fc2", "lora_down") == \
        "text_encoder.text_model.encoder.layers.3.mlp.fc2.lora_A.weight"
    with pytest.raises(LineageError, match="peft dialect has no key for lokr_w1"):
        adapter_key("peft", name, "lokr_w1")
    with pytest.raises(LineageError, match="cannot write the 'lycoris'"):
        adapter_key("lycoris", name, "lora_down")


def test_block_table_covers_sdxl():
    # 3 levels down (2 resnets, attention from level 1, 2 downsamplers), mid, 3 up (3 resnets, 2 upsamplers)
    assert len([k for k in SGM_TO_DIFFUSERS_BLOCKS if k.startswith("input_blocks")]) == 6 + 4 + 2
    assert len([k for k in SGM_TO_DIFFUSERS_BLOCKS if k.startswith("output_blocks")]) == 9 + 6 + 2
    assert SGM_TO_DIFFUSERS_BLOCKS["output_blocks.5.2"] == "up_blocks.1.upsamplers.0"
    # every dialect names every SDXL module at most once
    for dialect in DIALECTS.values():
        assert len(set(dialect.modules)) == len(dialect.modules)


def test_peft_config_carries_every_alpha():
    ranks = {"lora_unet_input_blocks_4_1_proj_in": 4, "lora_unet_input_blocks_4_1_proj_out": 8,
             "lora_te2_text_model_encoder_layers_0_mlp_fc1": 4}
    alphas = {"lora_unet_input_blocks_4_1_proj_in": 4.0, "lora_unet_input_blocks_4_1_proj_out": 1.5,
              "lora_te2_text_model_encoder_layers_0_mlp_fc1": None}
    config = peft_config(ranks, alphas)
    assert config["unet.rank_pattern"] == {"down_blocks.1.attentions.0.proj_out": 8} or \
        config["unet.rank_pattern"] == {"down_blocks.1.attentions.0.proj_in": 4}
    unet_alpha = {p: config["unet.alpha_pattern"].get(p, config["unet.lora_alpha"])
                  for p in config["unet.target_modules"]}
    assert unet_alpha == {"down_blocks.1.attentions.0.proj_in": 4.0, "down_blocks.1.attentions.0.proj_out": 1.5}
    assert config["text_encoder_2.lora_alpha"] == 4.0  # no alpha: alpha = rank
    assert "text_encoder.r" not in config
    assert dialect_metadata("kohya", ranks, alphas) == {}
    assert json.loads(dialect_metadata("peft", ranks, alphas)["lora_adapter_metadata"]) == config


def test_adapter_metadata_kohya_modelspec_and_record_read_back():
    base = BaseModel("base.safetensors", autov3="a" * 64, sha256="b" * 64, autov1="c" * 8)
    record = adapter_record("adapter", [("base.safetensors", "a" * 64)], tuned={"name": "tuned", "autov3": "d" * 64},
                            algorithm="lora", rank=16)
    meta = adapter_metadata(algorithm="lokr", dim=16, alpha=16.0, base=base, title="out", output_autov3="e" * 64,
                            network_args={"factor": 8}, record=record)
    assert meta["ss_network_module"] == "lycoris.kohya" and meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert json.loads(meta["ss_network_args"]) == {"algo": "lokr", "factor": "8"}
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("16", "16")
    assert meta["ss_new_sd_model_hash"] == "b" * 64 and meta["ss_sd_model_hash"] == "c" * 8
    assert meta["sshs_model_hash"] == "e" * 64 and meta["modelspec.hash_sha256"] == "0x" + "e" * 64
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lycoris"
    lora = adapter_metadata(algorithm="lora", dim="Dynamic", alpha="Dynamic", base=None, title="x", output_autov3=None)
    assert lora["ss_network_module"] == "networks.lora" and lora["modelspec.architecture"].endswith("/lora")
    assert "ss_network_args" not in lora and "sshs_model_hash" not in lora
    found = lineage_from_metadata(meta)
    (origin,) = origins_from_metadata(found, "lokr")
    assert origin.relation == "adapter" and origin.parents[0].value == "a" * 64
    assert origin.params["tuned"]["autov3"] == "d" * 64


def test_lora_shapes_are_what_kohya_and_the_reader_take():
    from lineage.adapters.modules import reference_modules
    from lineage.adapters.writer import lora_shapes
    modules = reference_modules()
    assert lora_shapes(modules["lora_unet_input_blocks_1_0_in_layers_2"], 8) == {
        "lora_down": (8, 320, 3, 3), "lora_up": (320, 8, 1, 1), "alpha": ()}
    assert lora_shapes(modules["lora_unet_input_blocks_4_0_skip_connection"], 4)["lora_down"] == (4, 320, 1, 1)
    assert lora_shapes(modules["lora_te2_text_model_encoder_layers_0_self_attn_v_proj"], 16) == {
        "lora_down": (16, 1280), "lora_up": (1280, 16), "alpha": ()}
