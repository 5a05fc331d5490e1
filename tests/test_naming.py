"""Name matching (lineage/graph/naming.py): ids, repo ids, URLs, hash prefixes, Civitai file names."""
import networkx as nx
import pytest

from lineage import LineageError, hash_file
from lineage.graph.catalog import catalog_graph
from lineage.graph.naming import best_match, match, resolve, tokens
from lineage.graph.recording import scan, scan_file
from lineage.graph.registry import Registry


def token_matcher_graph() -> nx.DiGraph:
    """The catalog without its `files`: the catalog lists many Civitai names as exact file names, which
    match before any tokens are scored; these tests are about the token matcher itself."""
    graph = nx.DiGraph(catalog_graph())
    for _, attrs in graph.nodes(data=True):
        attrs.pop("files", None)
    return graph


@pytest.mark.parametrize("name, node", [
    ("noobaiXLNAIXL_vPred10Version.safetensors", "noobai-xl-vpred-1.0"),
    ("noobaiXLNAIXL_vPred065SVersion.safetensors", "noobai-xl-vpred-0.65s"),
    ("noobaiXLNAIXL_epsilonPred11Version", "noobai-xl-eps-1.1"),
    ("ponyDiffusionV6XL_v6StartWithThisOne.safetensors", "pony-diffusion-v6-xl"),
    ("illustriousXL_v01.safetensors", "illustrious-xl-v0.1"),
    ("animagineXL40_v4Opt.safetensors", "animagine-xl-4.0-opt"),
    ("rouwei_v080Vpred.safetensors", "rouwei-0.8-vpred"),
    ("kohakuXLEpsilon_rev1.safetensors", "kohaku-xl-epsilon"),
    ("noobai vpred 1", "noobai-xl-vpred-1.0"),
])
def test_civitai_style_file_names_match_by_normalised_tokens(name, node):
    found = best_match(token_matcher_graph(), name)
    assert found is not None and found.node == node and found.how == "tokens" and found.confidence >= 0.75


def test_tokens_split_camel_case_and_normalise_versions():
    t = tokens("noobaiXLNAIXL_vPred065SVersion.safetensors")
    assert t.numbers == {"065s"} and "pred" in t.words and "version" not in t.compact
    assert tokens("sd_xl_base_1.0").numbers == tokens("v1-0").numbers == tokens("V10").numbers == {"1"}


def test_a_version_the_candidate_does_not_have_lowers_the_confidence():
    scores = {m.node: m.confidence for m in match(token_matcher_graph(), "noobaiXLNAIXL_vPred10Version")}
    assert scores["noobai-xl-vpred-1.0"] == 1.0 and scores["noobai-xl-vpred-0.5"] < 0.5
    assert scores["noobai-xl-eps-1.0"] < 0.9  # another line with the same version number


@pytest.mark.parametrize("spec, node, how", [
    ("Laxhar/noobai-XL-Vpred-0.75", "noobai-xl-vpred-0.75", "repo"),
    ("laxhar/NOOBAI-xl-vpred-0.75", "noobai-xl-vpred-0.75", "repo"),
    ("https://huggingface.co/Laxhar/noobai-XL-Vpred-0.75/blob/main/README.md", "noobai-xl-vpred-0.75", "repo"),
    ("https://civitai.com/models/833294?modelVersionId=1190596", "noobai-xl-vpred-1.0", "civitai"),
    ("https://civitai.com/models/257749/pony-diffusion-v6-xl", "pony-diffusion-v6-xl", "civitai"),
    ("NoobAI-XL V-pred 1.0", "noobai-xl-vpred-1.0", "name"),
    ("noobai-xl-vpred-1.0", "noobai-xl-vpred-1.0", "id"),
])
def test_ids_repo_ids_urls_and_names_are_exact(spec, node, how):
    found = resolve(catalog_graph(), spec)
    assert (found.node, found.how, found.confidence) == (node, how, 1.0)


def test_a_civitai_model_page_with_several_versions_is_ambiguous():
    with pytest.raises(LineageError, match="ambiguous"):
        resolve(catalog_graph(), "https://civitai.com/models/833294")


def test_a_miss_offers_the_closest_names():
    with pytest.raises(LineageError, match=r"did you mean .*\[kohaku-xl-delta\]"):
        resolve(catalog_graph(), "kohaku-xl-delto")
    with pytest.raises(LineageError, match=r"did you mean .*Illustrious-XL"):
        resolve(catalog_graph(), "ilustrious-xl")


def test_hash_prefixes_of_six_digits_and_more(tiny):
    path = tiny("mine.safetensors", 1)
    node = scan_file(path)
    sha = hash_file(path).sha256
    with Registry() as reg:
        assert reg.resolve(sha[:6]) == node and reg.resolve(sha[:12].upper()) == node
        assert reg.resolve("mine.safetensors") == node  # the name it was recorded under


def test_cli_arguments_take_file_names_and_urls(lmerge):
    code, out, _ = lmerge("tree", "noobaiXLNAIXL_vPred10Version.safetensors", "--up")
    # the file name resolved to the node the tree focuses on (◀); names may be shortened to fit 80 columns
    assert code == 0 and "[noobai-xl-vpred-1.0]  ◀" in out and "[illustrious-xl-v0.1]" in out
    code, _, err = lmerge("tree", "ponyDiffusion_vX")
    assert code == 1 and "did you mean" in err and "Pony Diffusion V6 XL" in err


def test_a_kohya_lora_whose_base_is_a_civitai_download_lands_on_the_catalog_node(tiny, tmp_path):
    lora = tiny("style.safetensors", 2, lora=True, metadata={
        "ss_new_sd_model_hash": "ab" * 32, "ss_sd_model_name": "noobaiXLNAIXL_vPred10Version.safetensors",
        "ss_network_module": "networks.lora", "ss_base_model_version": "sdxl_base_v1-0"})
    scan(tmp_path)
    with Registry() as reg:
        graph = reg.graph()
    assert list(graph.predecessors(hash_file(lora).autov3)) == ["noobai-xl-vpred-1.0"]


def test_merged_from_file_names_land_on_catalog_nodes(tiny):
    merged = scan_file(tiny("m.safetensors", 1, {
        "modelspec.merged_from": "ponyDiffusionV6XL_v6StartWithThisOne.safetensors, illustriousXL_v01"}))
    with Registry() as reg:
        parents = set(reg.graph().predecessors(merged))
    assert parents == {"pony-diffusion-v6-xl", "illustrious-xl-v0.1"}


def test_a_lora_naming_its_base_only_by_file_name_lands_on_the_catalog_node(tiny, tmp_path):
    lora = tiny("style.safetensors", 3, lora=True, metadata={
        "ss_sd_model_name": "ponyDiffusionV6XL_v6StartWithThisOne.safetensors",
        "ss_base_model_version": "sdxl_base_v1-0"})
    scan(tmp_path)
    with Registry() as reg:
        graph = reg.graph()
    assert list(graph.predecessors(hash_file(lora).autov3)) == ["pony-diffusion-v6-xl"]
    assert graph.nodes[hash_file(lora).autov3]["architecture"] == "sdxl"  # ss_base_model_version: the architecture
