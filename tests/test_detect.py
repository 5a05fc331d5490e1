import json

import pytest
import torch

from lineage.errors import CheckpointError
from lineage.io.safetensors import save_file
from lineage.sdxl.detection import detect, require_sdxl
from lineage.sdxl.synthetic import write_base


def test_sdxl_single_file_variants(family, tmp_path):
    d = detect(family["base"])
    assert (d.format, d.architecture, d.variant, d.prediction_type) == ("sdxl-single-file", "sdxl", "full", "epsilon")
    assert detect(family["vchild"]).prediction_type == "v+ztsnr"
    unet = write_base(tmp_path / "u.safetensors", components=["unet"], dtype="F32")
    assert detect(unet).variant == "unet-only"
    novae = write_base(tmp_path / "n.safetensors", components=["unet", "clip_l", "clip_g"], dtype="BF16",
                       prediction_type="v")
    d = detect(novae)
    assert d.variant == "without-vae" and d.prediction_type == "v" and d.prediction_source == "markers"


def test_modelspec_prediction_type_without_markers(tmp_path):
    p = write_base(tmp_path / "m.safetensors", components=["unet"], metadata={"modelspec.prediction_type": "v"})
    d = detect(p)
    assert (d.prediction_type, d.prediction_source) == ("v", "modelspec")


def _sd1(tmp_path, context=768, text_prefix="cond_stage_model.transformer.text_model."):
    tensors = {
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, 4, 3, 3),
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(32, context),
        text_prefix + "final_layer_norm.weight": torch.zeros(8),
    }
    path = tmp_path / f"sd{context}.safetensors"
    save_file(tensors, path)
    return path


def test_sd1_and_sd2_are_recognised_and_refused_where_sdxl_is_required(tmp_path):
    assert detect(_sd1(tmp_path)).format == "sd1"
    assert detect(_sd1(tmp_path, 1024, "cond_stage_model.model.")).format == "sd2"
    with pytest.raises(CheckpointError, match="is an SD 1.x checkpoint, but an SDXL checkpoint is required"):
        require_sdxl(_sd1(tmp_path))


@pytest.mark.parametrize("fmt,keys", [
    ("lora-kohya", {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight": (4, 64),
                    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight": (64, 4)}),
    ("locon", {"lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight": (4, 32, 3, 3),
               "lora_unet_input_blocks_1_0_in_layers_2.lora_up.weight": (32, 4, 1, 1)}),
    ("lokr", {"lora_unet_output_blocks_2_1_proj_in.lokr_w1": (8, 8),
              "lora_unet_output_blocks_2_1_proj_in.lokr_w2": (16, 16)}),
    ("loha", {"lora_te1_text_model_encoder_layers_0_mlp_fc1.hada_w1_a": (64, 4),
              "lora_te1_text_model_encoder_layers_0_mlp_fc1.hada_w1_b": (4, 64),
              "lora_te1_text_model_encoder_layers_0_mlp_fc1.hada_w2_a": (64, 4),
              "lora_te1_text_model_encoder_layers_0_mlp_fc1.hada_w2_b": (4, 64)}),
])
def test_adapters(tmp_path, fmt, keys):
    path = tmp_path / "a.safetensors"
    save_file({k: torch.zeros(s) for k, s in keys.items()}, path)
    d = detect(path)
    assert (d.format, d.architecture) == (fmt, "sdxl")


def test_sd1_lora_by_key_names(tmp_path):
    path = tmp_path / "a.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 4)}, path)
    assert detect(path).architecture == "sd1"


def test_diffusers_folder(tmp_path):
    root = tmp_path / "pipe"
    for rel in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
                "text_encoder_2/model.safetensors", "vae/diffusion_pytorch_model.safetensors"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        save_file({"conv_in.weight": torch.zeros(2, 2)}, root / rel)
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps({"prediction_type": "v_prediction"}))
    d = detect(root)
    assert (d.format, d.architecture, d.variant, d.prediction_type) == ("sdxl-diffusers", "sdxl", "full", "v")


def test_unknown_reports_what_was_seen(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"encoder.layer.0.weight": torch.zeros(2), "encoder.layer.1.weight": torch.zeros(2)}, path)
    d = detect(path)
    assert d.format == "unknown" and d.seen == ["encoder.layer (2)"]


@pytest.mark.parametrize("flags, expected", [
    ({"ss_zero_terminal_snr": "True"}, "epsilon+ztsnr"),
    ({"ss_zero_terminal_snr": "True", "ss_v_parameterization": "True"}, "v+ztsnr"),
    ({"ss_zero_terminal_snr": "False", "ss_v_parameterization": "True"}, "v"),
])
def test_kohya_zero_terminal_snr_is_recognised(tmp_path, flags, expected):
    key = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    lora = tmp_path / "lora.safetensors"
    save_file({f"{key}.lora_down.weight": torch.zeros(4, 8), f"{key}.lora_up.weight": torch.zeros(8, 4)}, lora,
              {"ss_base_model_version": "sdxl_base_v1-0", **flags})
    checkpoint = tmp_path / "trained.safetensors"  # a full fine-tune by kohya's scripts, without marker tensors
    save_file({"model.diffusion_model.label_emb.0.0.weight": torch.zeros(4, 4)}, checkpoint, flags)
    for path in (lora, checkpoint):
        d = detect(path)
        assert (d.prediction_type, d.prediction_source) == (expected, "kohya metadata")


@pytest.mark.parametrize("config, expected", [
    ({"prediction_type": "v_prediction", "rescale_betas_zero_snr": True}, "v+ztsnr"),
    ({"prediction_type": "epsilon", "rescale_betas_zero_snr": True}, "epsilon+ztsnr"),
])
def test_diffusers_zero_terminal_snr_is_recognised(tmp_path, config, expected):
    root = tmp_path / "pipe"
    for rel in ("unet/diffusion_pytorch_model.safetensors", "text_encoder_2/model.safetensors"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        save_file({"conv_in.weight": torch.zeros(2, 2)}, root / rel)
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    assert detect(root).prediction_type == expected


def test_an_unreadable_scheduler_config_is_named(tmp_path):
    root = tmp_path / "pipe"
    (root / "text_encoder_2").mkdir(parents=True)
    save_file({"conv_in.weight": torch.zeros(2, 2)}, root / "text_encoder_2" / "model.safetensors")
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="scheduler config"):
        detect(root)
