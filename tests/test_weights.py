"""Per-key parameter values: block strings of every preset, components, overrides, precedence."""
import pytest
import torch

from lineage.errors import LineageError
from lineage.merge.weights import BLOCK_NAMES, KeyWeights, parse_blocks

UNET = "model.diffusion_model."
TIME = UNET + "time_embed.0.weight"
IN04 = UNET + "input_blocks.4.1.proj_in.weight"
MID1 = UNET + "middle_block.1.proj_in.weight"
OUT = UNET + "out.2.weight"
CLIP_G = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"
VAE = "first_stage_model.decoder.conv_in.weight"
POSITIONAL_EMBEDDING = "conditioner.embedders.1.model.positional_embedding"
TEXT_PROJECTION = "conditioner.embedders.1.model.text_projection"


def test_supermerger_xl_string_maps_values_in_block_order():
    values = [i / 100 for i in range(20)]
    blocks = parse_blocks(",".join(map(str, values)), "supermerger")
    assert list(blocks) == BLOCK_NAMES["supermerger"]
    assert blocks["BASE"] == 0.0 and blocks["IN00"] == 0.01 and blocks["M00"] == 0.10 and blocks["OUT08"] == 0.19


def test_sd1_string_drops_the_blocks_sdxl_does_not_have():
    # BASE, IN00..IN11, M00, OUT00..OUT11: give each its own value and see which survive where.
    sd1 = [0.5] + [i / 100 for i in range(12)] + [0.77] + [(50 + i) / 100 for i in range(12)]
    blocks = parse_blocks(",".join(map(str, sd1)), "supermerger-legacy")
    assert len(blocks) == 20
    assert blocks["IN08"] == 0.08 and blocks["M00"] == 0.77 and blocks["OUT00"] == 0.50 and blocks["OUT08"] == 0.58
    assert not {"IN09", "IN11", "OUT09", "OUT11"} & set(blocks)


def test_comfyui_ratios_are_the_weight_of_model_1():
    blocks = parse_blocks("input_blocks.4=0.25,out.=1", "comfyui")
    assert blocks["input_blocks.4"] == 0.75 and blocks["out."] == 0.0  # stored as alpha, the weight of model B


def test_comfyui_blocks_not_named_keep_model_1_like_untouched_sliders():
    blocks = parse_blocks("input_blocks.4=0.25", "comfyui")
    assert list(blocks) == BLOCK_NAMES["comfyui"]
    assert blocks == {**dict.fromkeys(BLOCK_NAMES["comfyui"], 0.0), "input_blocks.4": 0.75}  # ratio 1.0: alpha 0
    w = KeyWeights(preset="comfyui", blocks=blocks)
    assert w.value_for(OUT, 0.5) == 0.0 and w.value_for(IN04, 0.5) == 0.75  # not the scalar 0.5
    # Other presets leave unnamed blocks at the scalar value.
    assert parse_blocks("IN04=0.3", "supermerger") == {"IN04": 0.3}


def test_supermerger_keeps_model_a_for_keys_without_weight_or_bias():
    for preset in ("supermerger", "supermerger-legacy"):
        w = KeyWeights(preset=preset, blocks={"BASE": 0.7})
        for key in (POSITIONAL_EMBEDDING, TEXT_PROJECTION):
            assert w.value_for(key, 0.5) is None, (preset, key)  # not merged: model A's tensor
        assert w.value_for(CLIP_G, 0.5) == 0.7
    assert KeyWeights(preset="sd-mecha", blocks={"BASE": 0.7}).value_for(POSITIONAL_EMBEDDING, 0.5) == 0.7


def test_named_values_and_bad_strings():
    assert parse_blocks("IN04=0.3, M00=1", "supermerger") == {"IN04": 0.3, "M00": 1.0}
    with pytest.raises(LineageError, match="unknown block names.*IN99"):
        parse_blocks("IN99=1", "supermerger")
    with pytest.raises(LineageError, match="takes 20 .* got 3"):
        parse_blocks("1,2,3", "supermerger")
    with pytest.raises(LineageError, match="not a mix"):
        parse_blocks("1,IN04=2", "supermerger")
    with pytest.raises(LineageError, match="'x' is not a number"):
        parse_blocks("IN04=x", "supermerger")
    with pytest.raises(LineageError, match="unknown block preset"):
        parse_blocks("1", "a1111")


def test_supermerger_current_and_legacy_differ_on_time_embedding():
    current = KeyWeights(preset="supermerger", blocks={"IN00": 0.9})
    legacy = KeyWeights(preset="supermerger-legacy", blocks={"IN00": 0.9})
    assert current.value_for(TIME, 0.5) == 0.9  # time_embed follows IN00 since 2025-11
    assert legacy.value_for(TIME, 0.5) is None  # before: not merged, A kept
    assert legacy.value_for(UNET + "input_blocks.0.0.weight", 0.5) == 0.9


def test_precedence_scalar_component_block_override():
    w = KeyWeights(preset="lineage", blocks={"IN04": 0.4, "VAE": 0.0}, components={"unet": 0.2, "clip_g": 0.7},
                   overrides=((r"proj_in", 0.9), (r"input_blocks\.4\.", 0.44)))
    assert w.value_for(OUT, 0.5) == 0.2  # component over scalar (block OUT not given)
    assert w.value_for(CLIP_G, 0.5) == 0.7
    assert w.value_for(VAE, 0.5) == 0.0  # block over component / scalar
    assert w.value_for(MID1, 0.5) == 0.9  # override over block
    assert w.value_for(IN04, 0.5) == 0.44  # the last matching override wins


def test_an_override_merges_a_key_the_preset_leaves_alone():
    w = KeyWeights(preset="comfyui", blocks={}, overrides=((r"^first_stage_model\.", 0.3),))
    assert w.value_for(CLIP_G, 0.5) is None  # ComfyUI does not merge text encoders
    assert w.value_for(VAE, 0.5) == 0.3


def test_dict_form_round_trip_and_block_strings():
    w = KeyWeights(preset="sd-mecha", blocks={"VAE": 0.1}, components={"clip_l": 0.0}, overrides=(("attn2", 0.3),))
    assert KeyWeights.from_dict(w.to_dict()) == w
    from_string = KeyWeights.from_dict({"preset": "comfyui", "blocks": "out.=0.2"})
    assert from_string.blocks["out."] == pytest.approx(0.8)
    with pytest.raises(LineageError, match="unknown components"):
        KeyWeights(components={"text": 1.0})
    with pytest.raises(LineageError, match="key override pattern '\\(' is not valid RE2 syntax"):
        KeyWeights(overrides=(("(", 1.0),))
    with pytest.raises(LineageError, match="unknown fields in `per_key`: block"):
        KeyWeights.from_dict({"block": {}})


@pytest.mark.parametrize("args, kept_from_a, merged", [
    # supermerger: keys without weight/bias are A's, whatever the BASE value says
    (("--blocks", ",".join(["1"] * 20)), [POSITIONAL_EMBEDDING, TEXT_PROJECTION], CLIP_G),
    # ComfyUI: sliders not named stay at 1.0 (model 1), not at the scalar alpha's default 0.5
    (("--preset", "comfyui", "--blocks", "input_blocks.4=0"), [OUT, MID1], IN04),
])
def test_preset_merges_keep_model_a_where_the_peer_does(lmerge, trio, tmp_path, args, kept_from_a, merged):
    from safetensors.torch import load_file

    out = tmp_path / "m.safetensors"
    code, _, stderr = lmerge("merge", trio["base"], trio["x"], "-o", out, "--no-record", *args)
    assert code == 0, stderr
    result, a, b = (load_file(p) for p in (out, trio["base"], trio["x"]))
    for key in kept_from_a:
        assert torch.equal(result[key], a[key]) and not torch.equal(a[key], b[key]), key
    assert torch.equal(result[merged], b[merged])  # the named / BASE value 1: model B
