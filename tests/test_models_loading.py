"""The plain-PyTorch SDXL models have the single file's exact keys and shapes, load strictly by streaming
from our reader in the caller's dtype, and turn bad files into one-line errors."""
from __future__ import annotations

import pytest
import torch
import torch.utils.checkpoint

from lineage.errors import CheckpointError, LineageError
from lineage.io.safetensors import SafetensorsFile, save_file
from lineage.sdxl.synthetic import sdxl_shapes, write_base
from lineage.train.loading import load_sdxl
from lineage.train.sdxl import SDXL, SDXLConfig, config_from_checkpoint
from lineage.train.text_encoders import CLIPLConfig, OpenCLIPGConfig
from lineage.train.unet import UNetConfig
from lineage.train.vae import VAEConfig


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory) -> str:
    return write_base(tmp_path_factory.mktemp("models") / "tiny.safetensors", size="tiny", seed=0)


def meta_model(config: SDXLConfig) -> SDXL:
    with torch.device("meta"):
        return SDXL(config)


def shapes_of(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_full_size_modules_have_every_key_and_shape_of_the_sdxl_base_file():
    header = {k: shape for k, (_, shape) in sdxl_shapes("full").items()}  # the 2,515 keys of the public file
    assert config_from_checkpoint(header) == SDXLConfig()  # SDXL 1.0 base values are the defaults
    assert shapes_of(meta_model(SDXLConfig())) == header


@pytest.mark.parametrize("size", ["tiny", "small"])
def test_reduced_sizes_have_the_same_keys_with_shapes_inferred_from_the_file(size):
    header = {k: shape for k, (_, shape) in sdxl_shapes(size).items()}
    config = config_from_checkpoint(header)
    assert config.unet.model_channels == header["model.diffusion_model.input_blocks.0.0.weight"][0]
    assert shapes_of(meta_model(config)) == header


def test_tiny_config_keeps_sdxl_structure_at_smaller_widths():
    config = config_from_checkpoint({k: s for k, (_, s) in sdxl_shapes("tiny").items()})
    assert config.unet == UNetConfig(model_channels=4, head_channels=1, context_dim=32, adm_in_channels=44,
                                     norm_groups=4)
    assert config.clip_l == CLIPLConfig(vocab_size=1544, width=12, mlp_width=48)
    assert config.clip_g == OpenCLIPGConfig(vocab_size=1544, width=20, mlp_width=80, projection_dim=20)
    assert config.vae == VAEConfig(channels=2, norm_groups=2)


def test_single_file_loads_with_strict_state_dict_and_identical_values(tiny_file):
    model = load_sdxl(tiny_file, dtype=torch.float32)
    with SafetensorsFile(tiny_file) as f:
        tensors = dict(f.items())
    result = model.load_state_dict(tensors, strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    state = model.state_dict()
    assert set(state) == set(tensors)
    for key, value in tensors.items():
        assert torch.equal(state[key], value.to(state[key].dtype)), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_caller_chooses_the_dtype(tiny_file, dtype):
    model = load_sdxl(tiny_file, dtype=dtype)
    floats = {p.dtype for p in model.state_dict().values() if p.is_floating_point()}
    assert floats == {dtype}
    assert model.clip_l.text_model.embeddings.position_ids.dtype == torch.int64
    with SafetensorsFile(tiny_file) as f:
        stored = f.read("model.diffusion_model.out.2.weight")
    assert torch.equal(model.unet.out[2].weight, stored.to(dtype))
    assert not model.training


def test_a_part_can_have_its_own_dtype(tiny_file):
    model = load_sdxl(tiny_file, dtype=torch.float16, part_dtypes={"vae": torch.float32})
    dtypes = {part: {p.dtype for p in model.part(part).parameters()} for part in model.config.parts}
    assert dtypes == {"unet": {torch.float16}, "clip_l": {torch.float16}, "clip_g": {torch.float16},
                      "vae": {torch.float32}}
    with SafetensorsFile(tiny_file) as f:
        stored = f.read("first_stage_model.decoder.conv_out.weight")
    assert torch.equal(model.vae.decoder.conv_out.weight, stored.float())
    with pytest.raises(LineageError, match="is not one of float32"):
        load_sdxl(tiny_file, part_dtypes={"vae": torch.float64})


def test_same_dtype_tensors_are_read_straight_into_the_parameters(tmp_path, monkeypatch):
    path = write_base(tmp_path / "f32.safetensors", size="tiny", dtype="F32", components=("unet",))

    def no_second_copy(self, name):
        raise AssertionError(f"{name} was read into a separate tensor")

    monkeypatch.setattr(SafetensorsFile, "read", no_second_copy)
    model = load_sdxl(path, parts=("unet",), dtype=torch.float32)
    monkeypatch.undo()
    with SafetensorsFile(path) as f:
        stored = f.read("model.diffusion_model.input_blocks.0.0.weight")
    assert torch.equal(model.unet.input_blocks[0][0].weight, stored)


def test_marker_tensors_do_not_disturb_loading(tmp_path):
    path = write_base(tmp_path / "v.safetensors", size="tiny", prediction_type="v+ztsnr")
    assert load_sdxl(path, parts=("unet",)).unet is not None


def test_a_part_can_be_loaded_alone(tiny_file):
    model = load_sdxl(tiny_file, parts=("vae",))
    assert model.vae is not None and model.unet is None and model.clip_l is None
    assert all(k.startswith("first_stage_model.") for k in model.state_dict())


def test_missing_position_ids_and_logit_scale_get_their_standard_values(tiny_file, tmp_path):
    with SafetensorsFile(tiny_file) as f:
        tensors = {k: v for k, v in f.items() if not k.endswith(("position_ids", "logit_scale"))}
    path = tmp_path / "pruned.safetensors"
    save_file(tensors, path)
    model = load_sdxl(path, parts=("clip_l", "clip_g"))
    assert torch.equal(model.clip_l.text_model.embeddings.position_ids, torch.arange(77)[None])
    assert model.clip_g.logit_scale.item() == pytest.approx(2.6592600)


def test_file_without_clip_l_last_layer_still_gives_the_hidden_state_sdxl_uses(tiny_file, tmp_path):
    with SafetensorsFile(tiny_file) as f:
        tensors = {k: v for k, v in f.items() if ".encoder.layers.11." not in k}
    save_file(tensors, tmp_path / "pruned.safetensors")
    pruned = load_sdxl(tmp_path / "pruned.safetensors", parts=("clip_l",)).clip_l
    full = load_sdxl(tiny_file, parts=("clip_l",)).clip_l
    assert pruned.config.layers == 11
    ids = torch.randint(0, 1500, (1, 77))
    with torch.no_grad():
        assert torch.equal(pruned(ids).hidden_states[11], full(ids).hidden_states[11])


def test_outputs_have_the_expected_shapes(tiny_file):
    model = load_sdxl(tiny_file)
    c = model.unet.config
    ids = torch.zeros(2, 77, dtype=torch.long)
    with torch.no_grad():
        prediction = model.unet(torch.randn(2, 4, 16, 16), torch.tensor([1.0, 999.0]),
                                torch.randn(2, 154, c.context_dim), torch.randn(2, c.adm_in_channels))
        text = model.clip_g(ids)
        mean, logvar = model.vae.encode(torch.zeros(1, 3, 64, 64))
        image = model.vae.decode(mean)
    assert prediction.shape == (2, 4, 16, 16)
    assert len(text.hidden_states) == 33 and text.pooled.shape == (2, model.clip_g.config.projection_dim)
    assert mean.shape == logvar.shape == (1, 4, 8, 8) and image.shape == (1, 3, 64, 64)


# -- gradient checkpointing ----------------------------------------------------------------------------

def test_gradient_checkpointing_gives_the_same_gradients(tiny_file, monkeypatch):
    import lineage.train.text_encoders as text_encoders
    import lineage.train.unet as unet
    import lineage.train.vae as vae

    def run(checkpointing: bool):
        model = load_sdxl(tiny_file).train()
        model.set_gradient_checkpointing(checkpointing)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, 4, 8, 8, generator=g)
        context = torch.randn(1, 77, model.unet.config.context_dim, generator=g)
        y = torch.randn(1, model.unet.config.adm_in_channels, generator=g)
        ids = torch.randint(0, 1500, (1, 77), generator=g)
        loss = (model.unet(x, torch.tensor([500.0]), context, y).square().mean()
                + model.clip_g(ids).pooled.square().mean() + model.clip_l(ids).hidden_states[-2].square().mean()
                + model.vae.decode(x).square().mean())
        loss.backward()
        return {k: p.grad for k, p in model.named_parameters() if p.grad is not None}

    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return torch.utils.checkpoint.checkpoint(*args, **kwargs)

    for module in (unet, text_encoders, vae):
        monkeypatch.setattr(module, "checkpoint", counted)
    plain = run(False)
    assert calls == []
    checkpointed = run(True)
    unet_blocks, text_layers, vae_stages = 9 + 1 + 9, 12 + 32, 1 + 4
    assert len(calls) == unet_blocks + text_layers + vae_stages
    assert plain.keys() == checkpointed.keys() and len(plain) > 2000
    for key, grad in plain.items():
        torch.testing.assert_close(checkpointed[key], grad, rtol=1e-5, atol=1e-7)


# -- bad input -----------------------------------------------------------------------------------------

def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_not_sdxl_is_refused(tmp_path):
    path = tmp_path / "sd1.safetensors"
    save_file({"cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.ones(4),
               "model.diffusion_model.input_blocks.0.0.weight": torch.ones(8, 4, 3, 3)}, path)
    with pytest.raises(CheckpointError) as e:
        load_sdxl(path)
    message = one_line_error(e)
    assert str(path) in message and "not an SDXL checkpoint (sd1" in message


def test_unet_only_file_says_what_is_missing_and_what_loads(tmp_path):
    path = write_base(tmp_path / "unet.safetensors", size="tiny", components=("unet",))
    with pytest.raises(CheckpointError) as e:
        load_sdxl(path)
    message = one_line_error(e)
    assert "has no CLIP-L text encoder and OpenCLIP-G text encoder and VAE (a unet-only file)" in message
    assert load_sdxl(path, parts=("unet",)).unet is not None


def test_vae_less_file_says_what_still_works(tmp_path):
    path = write_base(tmp_path / "novae.safetensors", size="tiny", components=("unet", "clip_l", "clip_g"))
    with pytest.raises(CheckpointError) as e:
        load_sdxl(path)
    message = one_line_error(e)
    assert "has no VAE" in message and 'the UNet and text encoders still load (parts=("unet", "clip_l", "clip_g"))' \
        in message
    assert load_sdxl(path, parts=("unet", "clip_l", "clip_g")).vae is None


def test_stray_and_missing_tensors_are_refused(tiny_file, tmp_path):
    with SafetensorsFile(tiny_file) as f:
        tensors = dict(f.items())
    stray = dict(tensors, **{"first_stage_model.encoder.extra.weight": torch.ones(2)})
    save_file(stray, tmp_path / "stray.safetensors")
    with pytest.raises(CheckpointError, match=r"1 unexpected tensors \(first: first_stage_model.encoder.extra"):
        load_sdxl(tmp_path / "stray.safetensors")
    del tensors["first_stage_model.decoder.conv_out.bias"]
    save_file(tensors, tmp_path / "hole.safetensors")
    with pytest.raises(CheckpointError, match=r"1 missing tensors \(first: first_stage_model.decoder.conv_out.bias"):
        load_sdxl(tmp_path / "hole.safetensors")


def test_a_part_without_its_structure_is_refused(tiny_file, tmp_path):
    with SafetensorsFile(tiny_file) as f:
        tensors = {k: v for k, v in f.items() if k != "model.diffusion_model.input_blocks.0.0.weight"}
    save_file(tensors, tmp_path / "cut.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_sdxl(tmp_path / "cut.safetensors")
    message = one_line_error(e)
    assert message.startswith(str(tmp_path / "cut.safetensors"))
    assert "not an SDXL UNet: no tensor 'input_blocks.0.0.weight'" in message


def test_inconsistent_shapes_are_refused(tiny_file, tmp_path):
    with SafetensorsFile(tiny_file) as f:
        tensors = dict(f.items())
    width = tensors["model.diffusion_model.out.0.weight"].numel()
    tensors["model.diffusion_model.out.0.weight"] = torch.ones(width + 1)
    save_file(tensors, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_sdxl(tmp_path / "bad.safetensors")
    assert f"'model.diffusion_model.out.0.weight' has shape [{width + 1}], expected [{width}]" in one_line_error(e)


def test_bad_arguments_are_one_line_errors(tiny_file):
    with pytest.raises(LineageError, match="is not one of float32, bfloat16, float16"):
        load_sdxl(tiny_file, dtype=torch.int8)
    with pytest.raises(LineageError, match=r"unknown parts \['text'\]"):
        load_sdxl(tiny_file, parts=("text",))
