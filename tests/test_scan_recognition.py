"""`lmerge scan` takes a download for the catalog model it is, by hash or by its Civitai file name
(lineage/graph/recognition.py); a name that only resembles one is a suggestion."""
import json

import networkx as nx

from lineage import hash_file
from lineage.graph.editing import unlink
from lineage.graph.recognition import recognise
from lineage.graph.recording import describe, scan
from lineage.graph.registry import Registry


def test_a_download_named_like_a_catalog_model_is_that_model(lmerge, tiny, tmp_path):
    path = tiny("noobaiXLNAIXL_vPred10Version.safetensors", 1)
    code, out, _ = lmerge("scan", tmp_path)
    assert code == 0
    assert (f"linked {path}: it is NoobAI-XL V-pred 1.0 [noobai-xl-vpred-1.0] (by its file name, 100%)"
            in out), out
    with Registry() as reg:
        assert reg.resolve(path) == "noobai-xl-vpred-1.0"  # as after `lmerge link`: the file IS the node
        model = reg.graph().nodes["noobai-xl-vpred-1.0"]
    assert path in model["paths"] and hash_file(path).sha256 in [f.get("sha256") for f in model["files"]]


def test_add_without_parents_recognises_a_download_as_scan_does(lmerge, tiny):
    path = tiny("noobaiXLNAIXL_vPred10Version.safetensors", 1)
    code, out, _ = lmerge("add", path)
    assert code == 0
    assert f"recorded {path} as NoobAI-XL V-pred 1.0 [noobai-xl-vpred-1.0]" in out, out
    assert f"linked {path}: it is NoobAI-XL V-pred 1.0 [noobai-xl-vpred-1.0] (by its file name, 100%)" in out
    similar = tiny("kohakuXL_beta.safetensors", 2)
    code, out, _ = lmerge("add", similar, "--json")
    report = json.loads(out)
    assert code == 0 and report["linked"] == [] and report["suggested"][0]["node"] == "kohaku-xl-beta5"
    assert report["node"] == hash_file(similar).autov3


def test_a_name_that_only_resembles_catalog_models_is_suggested_not_linked(lmerge, tiny, tmp_path):
    path = tiny("kohakuXL_beta.safetensors", 1)  # beta5 (75 %), delta and epsilon (67 %): too close to tell
    code, out, _ = lmerge("scan", tmp_path)
    assert code == 0 and "linked" not in out
    assert (f"{path} looks like Kohaku XL beta5 [kohaku-xl-beta5] (75%) or Kohaku XL delta [kohaku-xl-delta] (67%)"
            in out), out
    assert f"run `lmerge link {path} kohaku-xl-beta5` to confirm" in out
    with Registry() as reg:
        assert reg.resolve(path) == hash_file(path).autov3  # still its own node


def test_scan_json_lists_linked_and_suggested_files(lmerge, tiny, tmp_path):
    linked = tiny("illustriousXL_v01_fp16.safetensors", 1)  # not a catalog file name: scored by tokens
    suggested = tiny("kohakuXL_beta.safetensors", 2)
    code, out, _ = lmerge("scan", tmp_path, "--json")
    report = json.loads(out)
    assert code == 0
    assert report["linked"] == [{"path": linked, "node": "illustrious-xl-v0.1", "confidence": 1.0, "how": "tokens"}]
    assert [(s["path"], s["node"]) for s in report["suggested"]][0] == (suggested, "kohaku-xl-beta5")


def test_what_a_file_cannot_be_is_not_taken_from_its_name(tiny, tmp_path):
    # A LoRA is no checkpoint; a merge whose metadata names its parents is made from them, whatever its name.
    lora = tiny("noobaiXLNAIXL_vPred10Version.safetensors", 1, lora=True)
    merge = tiny("illustriousXL_v01.safetensors", 2, {"modelspec.merged_from": "a.safetensors, b.safetensors"})
    result = scan(tmp_path)
    assert result.recognised == [] and len(result.recorded) == 2
    with Registry() as reg:
        assert {reg.resolve(lora), reg.resolve(merge)} == {hash_file(lora).autov3, hash_file(merge).autov3}


def test_a_link_undone_stays_undone_when_the_folder_is_scanned_again(tiny, tmp_path):
    path = tiny("illustriousXL_v01.safetensors", 1)
    assert [r.node for r in scan(tmp_path).recognised if r.linked] == ["illustrious-xl-v0.1"]
    unlink(path)
    assert scan(tmp_path).recognised == []
    with Registry() as reg:
        assert reg.resolve(path) == hash_file(path).autov3


def test_a_hash_the_catalog_publishes_decides_whatever_the_file_name(tiny):
    path = tiny("renamed-download.safetensors", 1)
    hashes = hash_file(path)
    catalog = nx.DiGraph()
    catalog.add_node("published", name="Published", kind="checkpoint", architecture="sdxl",
                     files=[{"name": "published_v1.safetensors", "sha256": hashes.sha256}])
    catalog.add_node("renamed-download", name="Renamed download", kind="checkpoint", architecture="sdxl")
    found = recognise(describe(path), catalog)
    assert [(r.node, r.how, r.confidence, r.linked) for r in found] == [("published", "hash", 1.0, True)]
