"""Adapter/checkpoint compatibility from the graph (lineage/compat.py) and `lmerge compat`."""
import json

import pytest
import torch

import lineage
from lineage import LineageError, hash_file
from lineage.graph.compat import check
from lineage.graph.editing import link
from lineage.graph.recording import scan_file
from lineage.graph.registry import Registry
from lineage.io.safetensors import save_file


@pytest.fixture
def lora_on(tiny):
    """A LoRA file recorded as an adapter of the given node; returns its node id."""
    def make(base: str, seed: int = 1) -> str:
        return lineage.record(tiny(f"lora-{seed}.safetensors", seed, lora=True), parents=[base], relation="adapter")
    return make


def verdict(adapter, checkpoint):
    with Registry() as reg:
        return check(reg.graph(), adapter, checkpoint)


def test_same_base_and_descendants_are_compatible(lora_on):
    lora = lora_on("illustrious-xl-v0.1")
    same = verdict(lora, "illustrious-xl-v0.1")
    assert (same.relationship, same.verdict, same.generations) == ("same-base", "compatible", 0)
    down = verdict(lora, "noobai-xl-eps-1.0")
    assert (down.relationship, down.verdict, down.generations) == ("descendant", "compatible", 5)
    assert "Illustrious-XL v0.1 → NoobAI-XL Epsilon-pred 0.5 →" in down.reason


def test_epsilon_lora_on_a_v_prediction_model_of_its_family_is_a_warning(lora_on):
    result = verdict(lora_on("illustrious-xl-v0.1"), "noobai-xl-vpred-1.0")
    assert (result.relationship, result.verdict, result.compatible) == ("prediction-in-family", "likely compatible",
                                                                          True)
    assert result.reason.startswith("trained on ε, used on v-pred; NoobAI-XL V-pred 1.0 descends from")
    assert result.base == "illustrious-xl-v0.1" and result.generations == 10


def test_epsilon_lora_on_a_v_prediction_model_of_another_family_is_incompatible(lora_on):
    result = verdict(lora_on("pony-diffusion-v6-xl"), "noobai-xl-vpred-1.0")
    assert (result.relationship, result.verdict, result.compatible) == ("prediction", "incompatible", False)
    assert result.reason == ("prediction-type mismatch: the adapter is for epsilon-prediction, "
                             "the checkpoint is a v-prediction model")


def test_a_lora_where_a_checkpoint_is_expected_is_an_error(lora_on, lmerge, tiny):
    lora = lora_on("illustrious-xl-v0.1")
    with pytest.raises(LineageError, match="is an adapter .*not a checkpoint"):
        verdict(lora, lora_on("noobai-xl-eps-1.0", 2))
    code, _, err = lmerge("compat", lora, tiny("other-lora.safetensors", 5, lora=True))
    assert code == 2 and "not a checkpoint" in err
    code, _, err = lmerge("compat", lora, "no-such-model")
    assert code == 2 and err.startswith("error: no node")


def test_ancestors_relatives_and_distant_families(lora_on):
    up = verdict(lora_on("rouwei-0.7-eps", 1), "illustrious-xl-v0.1")
    assert (up.relationship, up.verdict, up.generations) == ("ancestor", "likely compatible", -2)
    cousin = verdict(lora_on("rouwei-0.8-eps", 2), "noobai-xl-eps-1.1")
    assert (cousin.relationship, cousin.verdict, cousin.common_ancestor) == (
        "relative", "likely compatible", "illustrious-xl-v0.1")
    distant = verdict(lora_on("pony-diffusion-v6-xl", 3), "animagine-xl-3.1")
    assert (distant.relationship, distant.verdict, distant.common_ancestor) == ("distant", "uncertain", "sdxl-1.0-base")


def test_catalog_adapter_across_architectures():
    result = verdict("kohaku-xl-epsilon-lokr", "sd-1.5")
    assert (result.relationship, result.verdict) == ("architecture", "incompatible")
    assert result.reason == "different architecture: the adapter is for SDXL, the checkpoint is SD 1.x"
    assert verdict("kohaku-xl-epsilon-lokr", "kohaku-xl-delta").relationship == "same-base"


def test_unknown_base_and_non_adapters(tiny):
    orphan = lineage.record(tiny("orphan.safetensors", 1, lora=True))
    result = verdict(orphan, "illustrious-xl-v0.1")
    assert (result.relationship, result.verdict) == ("unrelated", "uncertain")
    with pytest.raises(LineageError, match="is not an adapter"):
        verdict("illustrious-xl-v0.1", "noobai-xl-eps-1.0")


def test_an_sd1_lora_file_on_sdxl(tmp_path):
    path = tmp_path / "sd1-lora.safetensors"
    key = "lora_unet_down_blocks_0_attentions_0_proj_in"
    save_file({f"{key}.lora_down.weight": torch.ones(4, 8), f"{key}.lora_up.weight": torch.ones(8, 4)}, path)
    result = verdict(lineage.record(path), "sdxl-1.0-base")
    assert (result.relationship, result.verdict) == ("architecture", "incompatible")


def test_files_linked_to_catalog_models_count_as_those_models(tiny):
    base_file = tiny("illustrious.safetensors", 1)
    link(base_file, "illustrious-xl-v0.1")
    lora = tiny("style.safetensors", 2, lora=True, metadata={"ss_new_sd_model_hash": hash_file(base_file).sha256})
    noob_file = link(tiny("noob-eps.safetensors", 3), "noobai-xl-eps-1.1")
    result = verdict(scan_file(lora), noob_file)  # the LoRA's base comes from its kohya metadata
    assert (result.relationship, result.base, result.generations) == ("descendant", "illustrious-xl-v0.1", 6)


def test_cli_compat_records_files_and_exits_1_when_incompatible(lmerge, tiny):
    base_file = tiny("illustrious.safetensors", 1)
    lmerge("link", base_file, "illustrious-xl-v0.1")
    lora = tiny("style.safetensors", 2, lora=True, metadata={"ss_new_sd_model_hash": hash_file(base_file).sha256})
    code, out, _ = lmerge("compat", lora, "noobai-xl-eps-1.1")
    assert code == 0 and out.startswith("compatible: NoobAI-XL Epsilon-pred 1.1 descends from the adapter's base "
                                        "Illustrious-XL v0.1 (6 generations")
    code, out, _ = lmerge("compat", lora, "NoobAI-XL V-pred 1.0")
    assert code == 0 and out.startswith("likely compatible: trained on ε, used on v-pred;")
    code, out, _ = lmerge("compat", lora, "sd-1.5")
    assert code == 1 and out.startswith("incompatible: different architecture")
    code, out, _ = lmerge("compat", lora, base_file, "--json")
    result = json.loads(out)
    assert code == 0 and result["verdict"] == "compatible" and result["relationship"] == "same-base"
    assert result["adapter"] == hash_file(lora).autov3 and result["base"] == "illustrious-xl-v0.1"
