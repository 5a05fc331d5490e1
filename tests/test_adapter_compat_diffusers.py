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
        assert set(config.target_modules) == names


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
