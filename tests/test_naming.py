"""Name matching (lineage/graph/naming.py): ids, repo ids, URLs, hash prefixes, Civitai file names."""
import networkx as nx
import pytest

from lineage import LineageError, hash_file
from lineage.graph.catalog import catalog_graph
from lineage.graph.editing import set_attributes, show, show_fields
from lineage.graph.naming import best_match, decisive, display_names, file_names, match, resolve, tokens
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


@pytest.mark.parametrize("title, node, how", [
    ("sd_xl_base_1.0.safetensors [31e35c80fc]", "sdxl-1.0-base", "hash"),  # AutoV2: the SHA256's first 10 digits
    ("a_renamed_copy [31E35C80FC]", "sdxl-1.0-base", "hash"),  # the hash decides, whatever the name says
    ("noobaiXLNAIXL_vPred10Version [ea349eeae8]", "noobai-xl-vpred-1.0", "file name"),  # unknown hash: the name
    ("ponyDiffusionV6XL_v6StartWithThisOne.safetensors [67ab2fd8ec]", "pony-diffusion-v6-xl", "hash"),
])
def test_a1111_checkpoint_titles_match_by_hash_then_name(title, node, how):
    found = resolve(catalog_graph(), title)
    assert (found.node, found.how) == (node, how)


def test_an_a1111_title_names_a_recorded_file_by_its_autov2(tiny):
    path = tiny("mine.safetensors", 1)
    node = scan_file(path)
    with Registry() as reg:
        assert reg.resolve(f"someOtherName_v2 [{hash_file(path).autov2}]") == node


def test_an_a1111_title_with_the_old_eight_digit_hash():
    graph = nx.DiGraph()
    graph.add_node("old", name="Old model", hashes={"autov1": "1a2b3c4d"})
    graph.add_node("other", name="Other model")
    assert resolve(graph, "other_model [1a2b3c4d]").node == "old"
    assert resolve(graph, "other_model [0f0f0f0f]").node == "other"


@pytest.mark.parametrize("url", [
    "https://civitai.com/api/download/models/1190596",  # a version's download link: no model id in it
    "https://civitai.com/api/download/models/1190596?type=Model&format=SafeTensor",
    "civitai.com/api/download/models/1190596",
    "https://civitai.com/api/v1/model-versions/1190596",
    "https://civitai.com/models/833294/noobai-xl-nai-xl?modelVersionId=1190596",
])
def test_civitai_download_links_name_the_version(url):
    found = resolve(catalog_graph(), url)
    assert (found.node, found.how) == ("noobai-xl-vpred-1.0", "civitai")


def test_cli_arguments_take_a1111_titles_and_download_links(lmerge):
    code, out, _ = lmerge("tree", "https://civitai.com/api/download/models/1190596", "--up")
    assert code == 0 and "[noobai-xl-vpred-1.0]  ◀" in out
    code, out, _ = lmerge("tree", "sd_xl_base_1.0.safetensors [31e35c80fc]", "--up")
    assert code == 0 and out.startswith("Stable Diffusion XL 1.0 base  [sdxl-1.0-base]") and "◀" in out


def test_metadata_naming_parents_by_a1111_titles_lands_on_catalog_nodes(tiny):
    merged = scan_file(tiny("m.safetensors", 1, {"modelspec.merged_from": (
        "models/Stable-diffusion/sd_xl_base_1.0.safetensors [31e35c80fc], noobaiXLNAIXL_vPred10Version [ea349eeae8]")}))
    with Registry() as reg:
        assert set(reg.graph().predecessors(merged)) == {"sdxl-1.0-base", "noobai-xl-vpred-1.0"}


def test_a_node_given_a_civitai_download_link_is_found_by_it(tiny):
    node = scan_file(tiny("mine.safetensors", 1))
    set_attributes(node, {"civitai_url": "https://civitai.com/api/download/models/4242424"})
    with Registry() as reg:
        assert reg.resolve("https://civitai.com/api/download/models/4242424") == node
        assert ("Civitai", "version 4242424") in show_fields(show(reg.graph(), node))


def test_leaving_other_families_unscored_changes_no_best_match():
    # best_match scores only names of the query's family (the others cannot reach its floor): same answers
    catalog = catalog_graph()
    names = {n for node, attrs in catalog.nodes(data=True) for n in [*display_names(node, attrs), *file_names(attrs)]}
    names |= {"noobaiXL_v10", "kohakuXL_beta", "illustriousNoobMix_v10", "ponyXL", "animagine_v3", "m123"}
    for name in sorted(names):
        assert best_match(catalog, name) == decisive(match(catalog, name)), name
