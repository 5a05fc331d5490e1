"""Every adapter file we write loads with no unmatched key in the loaders people use: kohya's sd-scripts,
LyCORIS (its own loader, the real package), ComfyUI / Forge and A1111 (their key rules, reproduced in
tests/loader_rules.py). diffusers' own checks are in test_adapter_compat_diffusers.py."""
import pytest
import torch
from adapter_loading import lycoris_network
from adapter_samples import modules_of, write_diff, write_loha, write_lokr, write_lora
from loader_rules import a1111_unloaded, comfyui_key_map, comfyui_unloaded, kohya_lora_names

from lineage.adapters.convert import convert
from lineage.adapters.modules import sdxl_modules
from lineage.adapters.writer import incomplete_groups
from lineage.io.safetensors import SafetensorsFile, read_header
from lineage.sdxl.synthetic import sdxl_shapes


class Info:
    def __init__(self, shape):
        self.shape = shape


FULL = {k: Info(s) for k, (_, s) in sdxl_shapes("full").items()}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from lineage.sdxl.synthetic import write_base
    return write_base(tmp_path_factory.mktemp("compat") / "base.safetensors", size="tiny")


@pytest.fixture(scope="module")
def files(base, tmp_path_factory):
    """One file of each kind we write, in kohya's dialect (the one every loader takes)."""
    d = tmp_path_factory.mktemp("compat-files")
    default, conv = modules_of(base), modules_of(base, conv=True)
    lora = write_lora(d / "lora.safetensors", default, rank=4, alpha=4)
    return {
        "lora": lora,
        "locon": write_lora(d / "locon.safetensors", conv, rank=4, alpha=4),
        "locon-tucker": write_lora(d / "tucker.safetensors", conv, rank=4, alpha=4, mid=True),
        "lokr": write_lokr(d / "lokr.safetensors", conv),
        "lokr-low-rank": write_lokr(d / "lokr2.safetensors", conv, low_rank_w2=2),
        "loha": write_loha(d / "loha.safetensors", conv),
        "diff": write_diff(d / "diff.safetensors", conv),
        "converted": convert(convert(lora, d / "p.safetensors", to="peft", record=False).path, d / "k.safetensors",
                             to="kohya", record=False).path,
    }


def keys_of(path):
    return list(read_header(path)[0])


@pytest.mark.parametrize("conv", [False, True])
def test_kohyas_own_naming_gives_our_inventory(conv):
    """kohya's rule (Linear / Conv2d inside its target block classes) on a full-size SDXL gives exactly
    our module set: 722 + 72 + 192 by default, plus the 66 convolution-set modules with conv_dim."""
    ours = {m.name for m in sdxl_modules(FULL, conv=conv)}
    assert kohya_lora_names(FULL, conv) == ours
    assert len(ours) == 986 + (66 if conv else 0)


@pytest.mark.parametrize("kind", ["lora", "locon", "converted"])
def test_kohya_sd_scripts_loads_lora_and_locon(base, files, kind):
    """networks/lora.py names each module from the model; a file key must be <module>.lora_down.weight,
    .lora_up.weight or .alpha of such a module, with its LoRAModule's shapes."""
    header = read_header(base)[0]
    names = kohya_lora_names(header, conv=True)
    modules = {m.name: m for m in sdxl_modules(header, conv=True)}
    with SafetensorsFile(files[kind]) as f:
        for key in f.keys():
            name, _, part = key.partition(".")
            assert name in names and part in ("lora_down.weight", "lora_up.weight", "alpha"), key
            shape, m = f.tensors[key].shape, modules[name]
            if part == "lora_down.weight":
                assert shape[1:] == m.shape[1:], key  # Linear (r, in) or Conv2d (r, in, kh, kw)
            elif part == "lora_up.weight":
                assert shape[0] == m.shape[0] and shape[2:] == ((1, 1) if m.shape[2:] else ()), key


@pytest.mark.parametrize("kind", ["lora", "locon", "locon-tucker", "lokr", "lokr-low-rank", "loha", "diff",
                                  "converted"])
def test_lycoris_loads_every_key(base, files, kind):
    network, weights = lycoris_network(base, files[kind])
    assert len(network.unet_loras) + len(network.text_encoder_loras) == len({k.split(".")[0] for k in weights})


@pytest.mark.parametrize("kind", ["lora", "locon", "locon-tucker", "lokr", "lokr-low-rank", "loha", "diff",
                                  "converted"])
def test_comfyui_and_forge_load_every_key(base, files, kind):
    key_map = comfyui_key_map(read_header(base)[0], {})
    assert comfyui_unloaded(keys_of(files[kind]), key_map) == set()


@pytest.mark.parametrize("kind", ["lora", "locon", "locon-tucker", "lokr", "lokr-low-rank", "loha", "diff",
                                  "converted"])
def test_a1111_loads_every_key(base, files, kind):
    assert a1111_unloaded(keys_of(files[kind]), read_header(base)[0]) == set()


def test_rules_catch_what_loaders_refuse(base, tmp_path):
    """The reproduced rules do fail: a LoRA on the fused in_proj, SD 1.x names, and an OpenCLIP-G
    attention without its k_proj (A1111 then applies none of that layer's attention)."""
    header = read_header(base)[0]
    key_map = comfyui_key_map(header, {})
    fused = "lora_te2_model_transformer_resblocks_0_attn_in_proj.lora_up.weight"
    assert comfyui_unloaded([fused], key_map) == {fused}
    assert a1111_unloaded([fused], header) == {fused}
    default = modules_of(base)
    layer0 = [m for m in default if m.name.startswith("lora_te2_text_model_encoder_layers_0_self_attn_")
              and not m.name.endswith("k_proj")]
    path = write_lora(tmp_path / "partial.safetensors", layer0)
    assert a1111_unloaded(keys_of(path), header) == set(keys_of(path))
    assert comfyui_unloaded(keys_of(path), key_map) == set()  # ComfyUI patches each weight on its own
    assert sorted(incomplete_groups(m.name for m in layer0)) == sorted(m.name for m in layer0)
    assert incomplete_groups(m.name for m in default) == {}


def test_lycoris_reconstructs_a_lora_delta(base, files):
    """LyCORIS' own module rebuilds alpha / r * up @ down for a module of our file."""
    network, weights = lycoris_network(base, files["lora"])
    name = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    module = next(m for m in network.unet_loras if m.lora_name == name)
    up, down, alpha = (weights[f"{name}.{r}"] for r in ("lora_up.weight", "lora_down.weight", "alpha"))
    expected = alpha / down.shape[0] * (up @ down)
    torch.testing.assert_close(module.get_diff_weight()[0].reshape(expected.shape), expected)
