"""Identity and editing (lineage/graph/editing.py, edit_commands.py): link, show, edit, merge-nodes, remove."""
import json

import networkx as nx
import pytest
import torch

import lineage
from lineage import LineageError, hash_file
from lineage.graph.editing import ALIAS, alias_target, canonical, link, merge_nodes, remove_node, set_attributes
from lineage.graph.recording import scan_file
from lineage.graph.registry import Registry
from lineage.io.safetensors import save_file


def graph():
    with Registry() as reg:
        return reg.graph()


def marked_pair(tmp_path):
    """Two files with the same tensor bytes; the second carries the v-prediction root markers."""
    weights = {"model.diffusion_model.label_emb.0.0.weight": torch.ones(4, 4)}
    eps, vpred = tmp_path / "eps.safetensors", tmp_path / "vpred.safetensors"
    save_file(weights, eps)
    save_file({**weights, "v_pred": torch.empty(0), "ztsnr": torch.empty(0)}, vpred)
    return str(eps), str(vpred)


def test_equal_tensor_bytes_with_different_prediction_markers_are_different_nodes(tmp_path):
    eps, vpred = marked_pair(tmp_path)
    assert hash_file(eps).autov3 == hash_file(vpred).autov3  # markers are empty tensors: no data bytes
    a, b = lineage.record(eps), lineage.record(vpred)
    assert a != b and b.startswith(a)
    g = graph()
    assert g.nodes[a]["prediction_type"] == "epsilon" and g.nodes[b]["prediction_type"].startswith("v")
    with Registry() as reg:
        assert reg.find_paths(a) == [eps, vpred] or set(reg.find_paths(a)) == {eps, vpred}


def test_link_attaches_the_file_to_the_node_and_its_children_follow(tiny, lmerge):
    base = tiny("illustriousXL_v01.safetensors", 1)
    assert link(base, "illustrious-xl-v0.1") == "illustrious-xl-v0.1"
    child = lineage.record(tiny("mine.safetensors", 2), parents=[base])
    g = graph()
    assert list(g.predecessors(child)) == ["illustrious-xl-v0.1"]
    assert hash_file(base).autov3 not in g  # the file is the catalog node, not a node of its own
    code, out, _ = lmerge("hub", "card", child)
    assert code == 0 and "base_model: OnomaAIResearch/Illustrious-xl-early-release-v0" in out
    assert "base_model_relation: finetune" in out


def test_a_lora_cannot_be_linked_to_a_checkpoint(tiny):
    with pytest.raises(LineageError, match="cannot be the same model"):
        link(tiny("style.safetensors", 1, lora=True), "illustrious-xl-v0.1")


def test_a_vpred_file_cannot_be_linked_to_an_epsilon_model(tmp_path):
    _, vpred = marked_pair(tmp_path)
    with pytest.raises(LineageError, match="prediction type"):
        link(vpred, "noobai-xl-eps-1.1")
    assert link(vpred, "noobai-xl-vpred-1.0") == "noobai-xl-vpred-1.0"


def test_show_prints_a_fact_that_is_a_mapping_a_line_per_entry(lmerge):
    code, out, _ = lmerge("show", "noobai-xl-vpred-1.0")  # the catalog's prompt advice: {"notes": ...}
    assert code == 0 and "  prompt notes: Danbooru tags + e621 tags" in out and "{" not in out


def test_show_lists_names_hashes_paths_parents_children(tiny, lmerge):
    a, b = tiny("a.safetensors", 1), tiny("b.safetensors", 2)
    mix = lineage.record(tiny("mix.safetensors", 3), parents=[a, b], relation="merge", weights=[0.7, 0.3],
                         params={"method": "ties"})
    code, out, _ = lmerge("show", mix)
    assert code == 0 and out.startswith(f"mix [{mix}] (user)")
    assert "a [" in out and "(merge, weight 0.7, method TIES)" in out and "path: " in out and "autov3: " in out
    code, out, _ = lmerge("show", a, "--json")
    facts = json.loads(out)
    assert code == 0 and facts["children"][0]["id"] == mix and facts["children"][0]["weight"] == 0.7
    code, out, _ = lmerge("show", "noobaiXLNAIXL_vPred10Version.safetensors")
    assert code == 0 and "prediction type: v" in out and "Civitai: model 833294, version 1190596" in out
    assert "NoobAI-XL V-pred 0.75 [noobai-xl-vpred-0.75] (finetune)" in out.split("parents:")[1]


def test_edit_sets_and_clears_attributes_of_own_nodes_only(tiny, lmerge):
    node = scan_file(tiny("a.safetensors", 1))
    code, out, _ = lmerge("edit", node, "--rename", "My Mix", "--set-repo", "me/my-mix", "--set-license",
                          "openrail++", "--set-notes", "first try",
                          "--set-civitai", "https://civitai.com/models/1?modelVersionId=2")
    assert code == 0 and "edited My Mix" in out
    facts = json.loads(lmerge("show", "me/my-mix", "--json")[1])
    assert (facts["name"], facts["license"], facts["notes"]) == ("My Mix", "openrail++", "first try")
    assert facts["civitai"] == [{"model_id": 1, "version_id": 2}] and "a" in facts["names"]
    assert lmerge("edit", node, "--set-notes", "")[0] == 0
    assert "notes" not in json.loads(lmerge("show", node, "--json")[1])
    code, _, err = lmerge("edit", "illustrious-xl-v0.1", "--rename", "x")
    assert code == 1 and "read-only" not in err and "catalog node and cannot be edited" in err
    with pytest.raises(LineageError, match="not a Hugging Face repo id"):
        set_attributes(node, {"repo": "no repo"})
    assert lmerge("edit", node)[0] == 1


def test_remove_parent_and_replace_parents(tiny, lmerge):
    a, b, c = tiny("a.safetensors", 1), tiny("b.safetensors", 2), tiny("c.safetensors", 3)
    child = lineage.record(tiny("child.safetensors", 4), parents=[a, b], relation="merge")
    ida, idb, idc = (hash_file(p).autov3 for p in (a, b, c))
    code, out, err = lmerge("edit", child, "--remove-parent", a)
    assert code == 0, err
    assert set(graph().predecessors(child)) == {idb}
    code, out, _ = lmerge("edit", child, "--parent", c, "--parent", "illustrious-xl-v0.1", "--weight", "0.5",
                          "--weight", "0.5")
    assert code == 0 and "parents now:" in out
    assert set(graph().predecessors(child)) == {idc, "illustrious-xl-v0.1"}
    assert graph().edges[idc, child]["relation"] == "merge"
    code, _, err = lmerge("edit", child, "--remove-parent", ida)
    assert code == 1 and "is not a parent" in err


def test_add_says_whether_it_adds_or_replaces_and_warns_on_contradictions(tiny, lmerge):
    model = tiny("model.safetensors", 1)
    lmerge("add", model, "--parent", "illustrious-xl-v0.1")
    code, out, err = lmerge("add", model, "--parent", "pony-diffusion-v6-xl")
    assert code == 0 and "parent added: Pony Diffusion V6 XL" in out and "parent kept: Illustrious-XL v0.1" in out
    assert "keeps its earlier parent" in err and "--replace" in err
    code, out, _ = lmerge("add", model, "--parent", "pony-diffusion-v6-xl", "--replace")
    assert code == 0 and "parent replaced: Illustrious-XL v0.1" in out
    assert list(graph().predecessors(hash_file(model).autov3)) == ["pony-diffusion-v6-xl"]
    code, out, err = lmerge("add", model, "--parent", "pony-diffusion-v6-xl", "--relation", "merge")
    assert "parent changed" in out and "was recorded as a finetune parent" in err


def test_add_again_keeps_what_it_does_not_restate_and_says_what_changed(trio, lmerge, tmp_path):
    mix = tmp_path / "mix.safetensors"
    assert lmerge("merge", trio["base"], trio["x"], "--alpha", "0.25", "-o", mix)[0] == 0
    node, base, x = (hash_file(p).autov3 for p in (mix, trio["base"], trio["x"]))
    recorded = {p: graph().edges[p, node] for p in (base, x)}
    assert recorded[base]["weight"] == 0.75 and recorded[base]["params"]["method"] == "weighted_sum"
    for weights in ((), ("--weight", "0.75", "--weight", "0.25")):  # said again: nothing changes
        code, out, _ = lmerge("add", mix, "--parent", trio["base"], "--parent", trio["x"], *weights)
        assert code == 0 and out.count("parent kept: ") == 2 and "parent changed" not in out
        assert {p: graph().edges[p, node] for p in (base, x)} == recorded
    code, out, err = lmerge("add", mix, "--parent", trio["base"], "--parent", trio["x"], "--weight", "0.1",
                            "--weight", "0.9")
    assert code == 0 and out.count("parent changed: ") == 2 and "(merge 0.1)" in out and err == ""
    edge = graph().edges[base, node]
    assert edge["weight"] == 0.1 and edge["params"] == recorded[base]["params"] and edge["source"] == "user"


def test_merge_nodes_makes_one_model_and_unlink_undoes_it(tiny, lmerge):
    a, b = tiny("fp16.safetensors", 1), tiny("fp32.safetensors", 2)
    ida, idb = scan_file(a), scan_file(b)
    child = lineage.record(tiny("child.safetensors", 3), parents=[b])
    code, out, _ = lmerge("merge-nodes", ida, idb)
    assert code == 0 and f"merged {idb} into fp16" in out
    g = graph()
    assert idb not in g and list(g.predecessors(child)) == [ida] and set(g.nodes[ida]["paths"]) == {a, b}
    with Registry() as reg:
        assert reg.resolve(b) == ida
    with pytest.raises(LineageError, match="built-in catalog"):
        merge_nodes(ida, "illustrious-xl-v0.1")
    code, out, _ = lmerge("edit", b, "--unlink")
    assert code == 0 and "its own model again" in out and list(graph().predecessors(child)) == [idb]


def test_remove_deletes_own_nodes_with_their_links_never_catalog_nodes(tiny, lmerge):
    a = tiny("a.safetensors", 1)
    node = scan_file(a)
    child = lineage.record(tiny("child.safetensors", 2), parents=[a])
    code, out, _ = lmerge("remove", node)
    assert code == 0 and f"removed {node}" in out
    g = graph()
    assert node not in g and child in g and not list(g.predecessors(child))
    with pytest.raises(LineageError, match="cannot be removed"):
        remove_node("sdxl-1.0-base")


def test_a_marked_file_recorded_elsewhere_resolves_to_its_own_node(tmp_path):
    eps, vpred = marked_pair(tmp_path)
    a, b = lineage.record(eps), lineage.record(vpred)
    copy = tmp_path / "copy-of-vpred.safetensors"
    copy.write_bytes((tmp_path / "vpred.safetensors").read_bytes())
    with Registry() as reg:
        assert reg.resolve(str(copy)) == b and reg.resolve(eps) == a


def test_add_refuses_parents_for_a_file_linked_to_a_catalog_model(tiny, lmerge):
    path = tiny("noob.safetensors", 1)
    link(path, "noobai-xl-vpred-1.0")
    code, _, err = lmerge("add", path, "--parent", "pony-diffusion-v6-xl")
    assert code == 1 and "linked to the catalog model NoobAI-XL V-pred 1.0" in err and "--unlink" in err
    assert list(graph().predecessors("noobai-xl-vpred-1.0")) == ["noobai-xl-vpred-0.75"]


def test_links_that_go_round_are_refused_in_the_graph_and_in_the_registry(tmp_path):
    """alias_target (a graph) and canonical (the registry) follow `same_as` links the same way: a file
    linked through another to a model lands on the model, and links in a circle are one error naming them."""
    links = {"file1": "file2", "file2": "model"}
    g = nx.DiGraph()
    g.add_nodes_from([("file1", {ALIAS: "file2"}), ("file2", {ALIAS: "model"}), ("model", {})])
    with Registry(tmp_path / "registry.sqlite") as reg:
        with reg.batch() as b:
            for node, target in links.items():
                b.put_node(node, {ALIAS: target})
            b.put_node("model", {})
        assert canonical(reg, "file1") == alias_target(g, "file1") == "model"
        with reg.batch() as b:
            b.put_node("model", {ALIAS: "file1"})
        g.nodes["model"][ALIAS] = "file1"
        for follow in (lambda: canonical(reg, "file1"), lambda: alias_target(g, "file1")):
            with pytest.raises(LineageError, match="the links file1 -> file2 -> model go round in a circle"):
                follow()
