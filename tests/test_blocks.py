from collections import Counter

import pytest

from lineage.sdxl.blocks import BLOCK_NAMES, SCHEMES, block_of
from lineage.sdxl.layout import base_inventory

P = "model.diffusion_model."


@pytest.mark.parametrize("key,expected", [
    (P + "time_embed.0.weight", {"supermerger": "IN00", "supermerger-legacy": None, "sd-mecha": "BASE",
                                 "comfyui": "time_embed.", "lineage": "TIME"}),
    (P + "label_emb.0.0.weight", {"supermerger": "IN00", "supermerger-legacy": None, "sd-mecha": "BASE",
                                  "comfyui": "label_emb.", "lineage": "LABEL"}),
    (P + "input_blocks.7.1.proj_in.weight", {"supermerger": "IN07", "sd-mecha": "IN07", "comfyui": "input_blocks.7",
                                             "lineage": "IN07"}),
    (P + "middle_block.2.out_layers.3.weight", {"supermerger": "M00", "sd-mecha": "M00", "comfyui": "middle_block.2",
                                                "lineage": "M02"}),
    (P + "output_blocks.8.0.skip_connection.weight", {"supermerger": "OUT08", "comfyui": "output_blocks.8",
                                                      "lineage": "OUT08"}),
    (P + "out.2.weight", {"supermerger": "OUT08", "sd-mecha": "OUT08", "comfyui": "out.", "lineage": "OUT"}),
    ("conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
     {"supermerger": "BASE", "comfyui": None, "lineage": "CLIP_L"}),
    ("conditioner.embedders.1.model.ln_final.weight", {"supermerger": "BASE", "sd-mecha": "BASE", "lineage": "CLIP_G"}),
    ("first_stage_model.decoder.conv_in.weight", {"supermerger": "BASE", "sd-mecha": "VAE", "comfyui": None,
                                                  "lineage": "VAE"}),
    ("conditioner.embedders.1.model.text_projection", {"supermerger": None, "supermerger-legacy": None,
                                                       "sd-mecha": "BASE", "lineage": "CLIP_G"}),
])
def test_block_tables(key, expected):
    for scheme, block in expected.items():
        assert block_of(key, scheme) == block, scheme


def test_every_inventory_key_lands_in_a_named_block():
    for scheme in SCHEMES:
        counts = Counter(block_of(k, scheme) for k in base_inventory())
        assert set(counts) - {None} <= set(BLOCK_NAMES[scheme]), scheme
    # Our finest scheme leaves nothing unassigned and uses every block name.
    counts = Counter(block_of(k, "lineage") for k in base_inventory())
    assert None not in counts and set(counts) == set(BLOCK_NAMES["lineage"])
    assert counts["CLIP_L"] == 197 and counts["CLIP_G"] == 390 and counts["VAE"] == 248
    # supermerger's 20 values cover every key with "weight" or "bias" in its name; it keeps model
    # A's tensor for the others.
    unmerged = sorted(k for k in base_inventory() if block_of(k, "supermerger") is None)
    assert unmerged == ["conditioner.embedders.0.transformer.text_model.embeddings.position_ids",
                        "conditioner.embedders.1.model.logit_scale",
                        "conditioner.embedders.1.model.positional_embedding",
                        "conditioner.embedders.1.model.text_projection"]
    assert len(BLOCK_NAMES["supermerger"]) == 20


def test_unknown_scheme():
    with pytest.raises(KeyError, match="unknown block scheme"):
        block_of(P + "out.0.weight", "nope")
