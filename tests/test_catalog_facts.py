"""The catalog's identity facts (Hugging Face repo ids, Civitai ids, file names and hashes): every fact
carries its source, ids are well formed and no two models share a name, repo id, version id or hash."""
import json
import re
from collections import Counter
from importlib import resources
from urllib.parse import urlparse

import pytest

from lineage.errors import LineageError
from lineage.graph import catalog
from lineage.graph.catalog import SEED_SOURCES, catalog_graph, catalog_node_for_repo, is_source, source_problems
from lineage.graph.naming import display_names, resolve

# the hubs themselves, Civitai's archive and GitHub; never a mirror or proxy of them
SOURCE_HOSTS = {"huggingface.co", "civitai.com", "civitaiarchive.com", "github.com"}
HEX = {"sha256": 64, "autov2": 10, "autov3": 64, "autov1": 8, "crc32": 8}


@pytest.fixture(scope="module")
def nodes():
    text = (resources.files("lineage.graph") / "data" / "catalog.json").read_text(encoding="utf-8")
    return json.loads(text)["nodes"]


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


@pytest.mark.parametrize("name, node", [
    ("noobaiXLNAIXL_vPred10Version.safetensors", "noobai-xl-vpred-1.0"),
    ("noobaiXLNAIXL_vPred05Version.safetensors", "noobai-xl-vpred-0.5"),
    ("noobaiXLNAIXL_vPred075SVersion", "noobai-xl-vpred-0.75s"),
    ("noobaiXLNAIXL_epsilonPred11Version.safetensors", "noobai-xl-eps-1.1"),
    ("ponyDiffusionV6XL_v6StartWithThisOne.safetensors", "pony-diffusion-v6-xl"),
    ("illustriousXL_v01.safetensors", "illustrious-xl-v0.1"),
    ("animagineXLV31_v31.safetensors", "animagine-xl-3.1"),
    ("kohakuXLEpsilon_rev1.safetensors", "kohaku-xl-epsilon"),
    ("/models/Stable-diffusion/NoobAI-XL-v1.0.safetensors", "noobai-xl-eps-1.0"),  # the hub's own names
    ("NoobAI-XL-Vpred-v1.0.safetensors", "noobai-xl-vpred-1.0"),
    ("Illustrious-XL-v2.0.safetensors", "illustrious-xl-v2.0"),
    ("v2-1_768-ema-pruned.ckpt", "sd-2.1-768"),
    ("illustriousXL11_v11.safetensors", "illustrious-xl-v1.1"),  # Civitai's names of the Illustrious releases
    ("illustriousXLV20_v20Stable.safetensors", "illustrious-xl-v2.0"),
    ("autismmixSDXL_autismmixPony.safetensors", "autismmix-sdxl"),
    ("tPonynai3_v65.safetensors", "t-ponynai3"),
])
def test_circulating_file_names_are_exact_matches(name, node):
    found = resolve(catalog_graph(), name)
    assert (found.node, found.how) == (node, "file name")


def test_no_file_name_belongs_to_two_models(nodes):
    owners = {}  # name without its extension (name matching ignores it) -> the models it is a file of
    for node_id, key, f in facts(nodes):
        if key == "files" and f.get("name"):
            owners.setdefault(re.sub(r"\.(safetensors|ckpt)$", "", f["name"].lower()), set()).add(node_id)
    assert {name: ids for name, ids in owners.items() if len(ids) > 1} == {}


def test_published_hashes_find_their_models():
    g = catalog_graph()
    assert resolve(g, "ff827fc345").node == "noobai-xl-eps-1.0"  # LFS SHA256 of NoobAI-XL-v1.0.safetensors
    assert resolve(g, "e41b3cdbfa68").node == "noobai-xl-vpred-0.9r"
    assert resolve(g, "3e15ba0038").node == "illustrious-xl-v0.1"
    assert resolve(g, "c2a1a3eaa13d").node == "illustrious-xl-v2.0"  # the official file = Civitai's v2.0 Stable
    assert resolve(g, "536863e9f0").node == "illustrious-xl-v1.1"
    assert resolve(g, "e3d12d0f76d6").node == "illustrious-xl-v0.1-guided"
    assert resolve(g, "2c0205c93e63").node == "noobai-0.9r-cyberfix"


def test_sources_are_the_hubs_themselves_and_repo_facts_cite_their_own_repo(nodes):
    for node_id, key, fact in facts(nodes):
        if fact["source"] in SEED_SOURCES:
            continue
        url = urlparse(fact["source"])
        assert url.netloc in SOURCE_HOSTS, (node_id, fact)
        if key == "huggingface" and url.netloc == "huggingface.co":
            assert f"{url.path.lower()}/".startswith(f"/{fact['repo'].lower()}/"), (node_id, fact)


def test_autov2_is_the_prefix_of_the_sha256_published_for_the_same_model(nodes):
    for n in nodes:
        files = n.get("files", ())
        sha256 = [f["sha256"] for f in files if "sha256" in f]
        for f in files:
            if "autov2" in f and sha256:
                assert any(h.startswith(f["autov2"]) for h in sha256), (n["id"], f)
    pony = next(n for n in nodes if n["id"] == "pony-diffusion-v6-xl")
    assert any("sha256" in f for f in pony["files"]) and any("autov2" in f for f in pony["files"])


def test_every_checkpoint_says_its_prediction_type_or_why_not(nodes):
    by_id = {n["id"]: n for n in nodes}
    for n in nodes:
        if n["kind"] == "checkpoint" and "prediction_type" not in n:
            assert n["id"] == "sd-2.0" and "No prediction type" in n["notes"], n["id"]
    assert by_id["sd-2.1-768"]["prediction_type"] == "v"
    for node_id in ("sd-1.4", "sd-1.5", "sd-2.1", "anything-v3", "chilloutmix"):
        assert by_id[node_id]["prediction_type"] == "epsilon", node_id
    for n in nodes:
        if n["architecture"] == "sd1" and "prediction_type" in n.get("assumed", {}):
            assert "v-prediction" in n["assumed"]["prediction_type"], n["id"]


def test_the_hubs_generic_names_do_not_make_near_names_ambiguous():
    # "NoobAI-XL-v1.0" (the ε 1.0 file) names no prediction type: it must not compete with V-pred 1.0 for a
    # name that does, since file names match exactly and are not scored by tokens
    g = catalog_graph()
    assert resolve(g, "noobai vpred 1").node == "noobai-xl-vpred-1.0"
    assert resolve(g, "noobai vpred 0.75").node == "noobai-xl-vpred-0.75"
    # the fixes others made on a version do not take its plain name
    assert resolve(g, "noobai vpred 0.9r").node == "noobai-xl-vpred-0.9r"
    assert resolve(g, "noobai vpred 0.75s").node == "noobai-xl-vpred-0.75s"


def test_node_and_edge_sources_are_seeds_or_pages_of_the_hubs(nodes):
    edges = catalog.catalog_document()["edges"]
    urls = [s for item in nodes + edges for s in item["sources"] if s not in SEED_SOURCES]
    assert urls, "some node or edge is sourced by a public page, not only by the seeds"
    assert all(urlparse(u).netloc in SOURCE_HOSTS for u in urls), urls


@pytest.mark.parametrize("source, ok", [
    ("004", True), ("handbook", True), ("https://huggingface.co/OnomaAIResearch/Illustrious-XL-v2.0", True),
    ("005", False), ("http://civitai.com/models/1", False), ("huggingface.co/a/b", False), ("", False),
    ("https://civitai.com/models/1 and more", False), (4, False), (None, False),
])
def test_a_source_is_a_seed_id_or_an_https_url(source, ok):
    assert is_source(source) is ok


def test_the_loader_refuses_a_catalog_with_a_source_that_is_neither(monkeypatch):
    node = {"id": "m", "name": "M", "sources": ["https://huggingface.co/a/m"],
            "files": [{"name": "m.safetensors", "source": "a forum post"}]}
    edge = {"parent": "m", "child": "m2", "relation": "finetune", "sources": []}
    document = {"schema": 1, "nodes": [node], "edges": [edge]}
    assert source_problems(document) == ["edge 'm' -> 'm2' lists no sources",
                                         "node 'm' has a files fact with source 'a forum post'"]

    class Shipped:  # the package's data file, replaced by `document`
        def __truediv__(self, name):
            return self

        def read_text(self, encoding):
            return json.dumps(document)

    monkeypatch.setattr(catalog.resources, "files", lambda package: Shipped())
    catalog.catalog_document.cache_clear()
    try:
        with pytest.raises(LineageError, match=r"lists no sources .*seed id or an https URL\), and 1 more"):
            catalog.catalog_document()
    finally:
        catalog.catalog_document.cache_clear()
