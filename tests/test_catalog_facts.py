"""The catalog's identity facts (Hugging Face repo ids, Civitai ids, file names and hashes): every fact
carries its source, ids are well formed and no two models share a name, repo id, version id or hash."""
import json
import re
from collections import Counter
from importlib import resources

import pytest

from lineage.graph.catalog import catalog_graph, catalog_node_for_repo
from lineage.graph.naming import display_names, resolve

SEEDS = {"000", "001", "002", "003", "004", "handbook"}
HEX = {"sha256": 64, "autov2": 10, "autov3": 64, "autov1": 8, "crc32": 8}


@pytest.fixture(scope="module")
def nodes():
    text = (resources.files("lineage.graph") / "data" / "catalog.json").read_text(encoding="utf-8")
    return json.loads(text)["nodes"]


def is_source(value):
    return value in SEEDS or re.fullmatch(r"https://[\w.-]+(/\S*)?", value) is not None


def facts(nodes):
    for n in nodes:
        for key in ("huggingface", "civitai", "files"):
            for fact in n.get(key, ()):
                yield n["id"], key, fact


def test_every_identity_fact_has_a_source(nodes):
    found = list(facts(nodes))
    assert len(found) > 40
    for node_id, key, fact in found:
        assert is_source(fact.get("source", "")), (node_id, key, fact)


def test_ids_and_hashes_are_well_formed(nodes):
    for node_id, key, fact in facts(nodes):
        if key == "huggingface":
            assert re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", fact["repo"]), (node_id, fact)
        elif key == "civitai":
            assert isinstance(fact["model_id"], int) and fact["model_id"] > 0, (node_id, fact)
            assert isinstance(fact.get("version_id", 1), int), (node_id, fact)
        else:
            hashes = {k: v for k, v in fact.items() if k in HEX}
            assert hashes or fact.get("name"), (node_id, fact)
            for kind, value in hashes.items():
                assert re.fullmatch(f"[0-9a-f]{{{HEX[kind]}}}", value), (node_id, kind, value)
            if fact.get("name"):
                assert fact["name"].endswith((".safetensors", ".ckpt")), (node_id, fact)


def test_no_duplicate_names_repo_ids_versions_or_hashes(nodes):
    names = Counter(name for n in nodes for name in {n["id"].lower(), n["name"].lower()})
    assert [k for k, c in names.items() if c > 1] == []
    repos = Counter(f["repo"].lower() for _, key, f in facts(nodes) if key == "huggingface")
    assert [k for k, c in repos.items() if c > 1] == []
    versions = Counter((f["model_id"], f["version_id"]) for _, key, f in facts(nodes)
                       if key == "civitai" and "version_id" in f)
    assert [k for k, c in versions.items() if c > 1] == []
    hashes = Counter(v for _, key, f in facts(nodes) if key == "files" for k, v in f.items() if k in HEX)
    assert [k for k, c in hashes.items() if c > 1] == []


def test_every_sdxl_checkpoint_has_a_prediction_type_and_assumed_ones_say_why(nodes):
    for n in nodes:
        if n["architecture"] == "sdxl" and n["kind"] == "checkpoint":
            assert n.get("prediction_type") in ("epsilon", "v"), n["id"]
            if "prediction_type" in n.get("assumed", {}):
                assert n["prediction_type"] == "epsilon" and "v-prediction" in n["assumed"]["prediction_type"]
    by_id = {n["id"]: n for n in nodes}
    for node_id in ("kohaku-xl-beta5", "illustrious-xl-v1.0", "illustrious-xl-v2.0", "pony-diffusion-v6-xl",
                    "animagine-xl-3.1", "wai-nsfw-illustrious-sdxl"):
        assert by_id[node_id]["prediction_type"] == "epsilon"


def test_sdxl_base_carries_its_published_file_and_hash():
    g = catalog_graph()
    assert resolve(g, "31e35c80fc").node == "sdxl-1.0-base"
    assert resolve(g, "sd_xl_base_1.0.safetensors").how == "file name"
    assert resolve(g, "67ab2fd8ec").node == "pony-diffusion-v6-xl"  # Civitai's AutoV2 of the V6 file


def test_every_repo_id_and_civitai_version_resolves_to_its_node(nodes):
    for node_id, key, fact in facts(nodes):
        if key == "huggingface":
            assert catalog_node_for_repo()[fact["repo"].lower()] == node_id
            assert resolve(catalog_graph(), fact["repo"]).node == node_id
        elif key == "civitai" and "version_id" in fact:
            url = f"https://civitai.com/models/{fact['model_id']}?modelVersionId={fact['version_id']}"
            assert resolve(catalog_graph(), url).node == node_id


def test_the_catalog_names_are_display_names(nodes):
    g = catalog_graph()
    assert all(n["name"] in display_names(n["id"], dict(g.nodes[n["id"]])) for n in nodes)


def test_circulating_civitai_file_names_are_exact_matches():
    g = catalog_graph()
    assert resolve(g, "noobaiXLNAIXL_vPred05Version.safetensors").how == "file name"
    assert resolve(g, "noobaiXLNAIXL_vPred075SVersion").node == "noobai-xl-vpred-0.75s"
