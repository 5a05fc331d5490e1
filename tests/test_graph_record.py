"""Recording files: `lineage.record`, `scan` (parents from metadata), `link`, and their CLI commands."""
import json
import os
import shutil
import sqlite3

import pytest

import lineage
import lineage.graph.recording as record_module
from lineage import LineageError, hash_file
from lineage.graph.editing import link
from lineage.graph.recording import scan, scan_file
from lineage.graph.registry import Registry


def dump(path) -> list[str]:
    """Every row of a registry, as SQL text (to show that something changed nothing)."""
    with sqlite3.connect(path) as conn:
        return list(conn.iterdump())


def edges_into(node):
    with Registry() as reg:
        g = reg.graph()
    return {parent: g.edges[parent, node] for parent in g.predecessors(node)}


def children_of(node):
    with Registry() as reg:
        return set(reg.graph().successors(node))


def test_record_makes_a_node_named_by_autov3_with_detected_attributes(tiny):
    path = tiny("my-model.safetensors", 1, {"modelspec.title": "My Model", "modelspec.author": "me"})
    node_id = lineage.record(path)
    assert node_id == hash_file(path).autov3 and len(node_id) == 64
    with Registry() as reg:
        node = reg.node(node_id)
        assert reg.find_paths(node_id) == [path]
    assert node["name"] == "My Model" and node["maker"] == "me"
    assert (node["kind"], node["architecture"], node["format"]) == ("checkpoint", "sdxl", "sdxl-single-file")
    assert node["hashes"]["sha256"] == hash_file(path).sha256
    assert "autov1" not in node["hashes"]  # a file this small has no bytes in the AutoV1 range
    assert node["source"] == "user"


def test_recording_again_changes_nothing(tiny, isolated_registry):
    base = tiny("base.safetensors", 1)
    child = tiny("child.safetensors", 2)
    lineage.record(child, parents=[base, "sdxl-1.0-base"], relation="merge", weights=[0.5, 0.5],
                   params={"method": "weighted_sum"})
    before = dump(isolated_registry)
    lineage.record(child, parents=[base, "sdxl-1.0-base"], relation="merge", weights=[0.5, 0.5],
                   params={"method": "weighted_sum"})
    assert dump(isolated_registry) == before


def test_merge_parents_weights_and_params(tiny):
    a, b = tiny("a.safetensors", 1), tiny("b.safetensors", 2)
    merged = lineage.record(tiny("m.safetensors", 3), parents=[a, b], relation="merge", weights=[0.3, 0.7],
                            params={"method": "weighted_sum", "recipe": {"alpha": 0.7}})
    edges = edges_into(merged)
    assert {e["weight"] for e in edges.values()} == {0.3, 0.7}
    assert all(e["relation"] == "merge" and e["params"]["method"] == "weighted_sum" for e in edges.values())
    assert edges[hash_file(a).autov3]["weight"] == 0.3  # parents recorded on the fly, by hash


def test_parents_by_catalog_id_hash_prefix_and_name(tiny):
    base = lineage.record(tiny("base.safetensors", 1), attrs={"name": "House Base"})
    by_catalog = lineage.record(tiny("c1.safetensors", 2), parents=["noobai-xl-vpred-1.0"])
    by_hash = lineage.record(tiny("c2.safetensors", 3), parents=[base[:12]])
    by_name = lineage.record(tiny("c3.safetensors", 4), parents=["house base", "Illustrious-XL v0.1"],
                             relation="merge")
    assert set(edges_into(by_catalog)) == {"noobai-xl-vpred-1.0"}
    assert set(edges_into(by_hash)) == {base}
    assert set(edges_into(by_name)) == {base, "illustrious-xl-v0.1"}


def test_bad_parents_and_weights_are_refused_and_nothing_is_written(tiny):
    path = tiny("child.safetensors", 1)
    with pytest.raises(LineageError, match="no node 'no-such-model'"):
        lineage.record(path, parents=["sdxl-1.0-base", "no-such-model"])
    with pytest.raises(LineageError, match="2 weights for 1 parents"):
        lineage.record(path, parents=["sdxl-1.0-base"], weights=[0.5, 0.5])
    with pytest.raises(LineageError, match="unknown relation"):
        lineage.record(path, parents=["sdxl-1.0-base"], relation="blend")
    with Registry() as reg:
        assert not reg.has_node(hash_file(path).autov3)


def test_given_hashes_and_unchanged_files_are_not_hashed_again(tiny, monkeypatch):
    path = tiny("model.safetensors", 1)
    hashes = hash_file(path)

    def no_hashing(p, *args, **kwargs):
        raise AssertionError(f"hashed {p} again")

    monkeypatch.setattr(record_module, "hash_file", no_hashing)
    assert lineage.record(path, hashes=hashes) == hashes.autov3
    assert lineage.record(path) == hashes.autov3  # size and mtime unchanged: hashes come from the registry
    os.utime(path, ns=(0, 0))
    with pytest.raises(AssertionError, match="hashed"):
        lineage.record(path)


def test_find_paths_lists_the_most_recently_seen_first(tiny, tmp_path):
    first = tiny("first.safetensors", 1)
    second = str(tmp_path / "copy.safetensors")
    shutil.copy(first, second)
    node_id = lineage.record(first)
    assert lineage.record(second) == node_id  # same content, same node
    with Registry() as reg:
        assert reg.find_paths(node_id) == [second, first]


def test_a_cycle_through_files_is_refused(tiny):
    a = lineage.record(tiny("a.safetensors", 1))
    b = lineage.record(tiny("b.safetensors", 2), parents=[a])
    with pytest.raises(LineageError, match="cannot descend from itself"):
        lineage.record(tiny("a.safetensors", 1), parents=[b])
    assert children_of(a) == {b}


# ---------------------------------------------------------------- parents from metadata


def test_scan_links_parents_from_our_own_record_in_any_order(tiny, tmp_path, isolated_registry):
    a, b = tiny("b-parent.safetensors", 1), tiny("c-parent.safetensors", 2)
    record = {"method": "weighted_sum", "params": {"alpha": 0.25}, "weights": [0.75, 0.25],
              "inputs": [{"path": a, "name": "parent A", "autov3": hash_file(a).autov3},
                         {"path": b, "name": "parent B", "autov3": hash_file(b).autov3}]}
    merged = tiny("a-merged.safetensors", 3, {"lineage.record": json.dumps(record)})  # sorts before its parents
    result = scan(tmp_path)
    assert len(result.recorded) == 3 and result.edges == 2 and result.failed == []
    edges = edges_into(hash_file(merged).autov3)
    assert {p: e["weight"] for p, e in edges.items()} == {hash_file(a).autov3: 0.75, hash_file(b).autov3: 0.25}
    assert all(e["source"] == "lineage" and e["params"]["method"] == "weighted_sum" for e in edges.values())
    before = dump(isolated_registry)
    assert scan(tmp_path).edges == 2
    assert dump(isolated_registry) == before  # re-scanning is idempotent


def test_own_record_of_inputs_not_on_disk_creates_their_nodes_by_autov3(tiny):
    record = {"method": "add_difference", "inputs": [{"path": "/gone/x.safetensors", "autov3": "ab" * 32}]}
    merged = scan_file(tiny("m.safetensors", 1, {"lineage.record": json.dumps(record)}))
    assert set(edges_into(merged)) == {"ab" * 32}
    with Registry() as reg:
        assert reg.node("ab" * 32)["name"] == "x" and reg.node("ab" * 32)["source"] == "file metadata"


def _a1111_metadata(primary_sha, secondary_sha, grandparents):
    """A1111's keys: this merge's recipe, and the flattened ancestry where the primary is itself a merge."""
    recipe = {"type": "webui", "primary_model_hash": primary_sha, "secondary_model_hash": secondary_sha,
              "tertiary_model_hash": None, "interp_method": "Weighted sum", "multiplier": 0.3}
    primary_recipe = {"type": "webui", "primary_model_hash": grandparents[0],
                      "secondary_model_hash": grandparents[1], "interp_method": "Add difference", "multiplier": 0.5,
                      "tertiary_model_hash": grandparents[2]}
    models = {primary_sha: {"name": "primary", "legacy_hash": "00000000", "sd_merge_recipe": primary_recipe},
              secondary_sha: {"name": "secondary", "legacy_hash": "11111111", "sd_merge_recipe": None}}
    return {"sd_merge_recipe": json.dumps(recipe), "sd_merge_models": json.dumps(models)}


def test_a1111_recipe_and_flattened_ancestry(tiny, tmp_path):
    primary, secondary = tiny("primary.safetensors", 1), tiny("secondary.safetensors", 2)
    grandparents = [f"{i}" * 64 for i in (7, 8, 9)]
    merged = tiny("merged.safetensors", 3, _a1111_metadata(hash_file(primary).sha256, hash_file(secondary).sha256,
                                                           grandparents))
    scan(tmp_path)
    edges = edges_into(hash_file(merged).autov3)
    assert {p: e["weight"] for p, e in edges.items()} == {hash_file(primary).autov3: 0.7,
                                                          hash_file(secondary).autov3: 0.3}
    # The primary's own merge (from sd_merge_models): A + (B - C) * 0.5 over placeholders for unseen files.
    up = edges_into(hash_file(primary).autov3)
    assert {p: e["weight"] for p, e in up.items()} == {
        f"sha256:{grandparents[0]}": 1.0, f"sha256:{grandparents[1]}": 0.5, f"sha256:{grandparents[2]}": -0.5}


def test_placeholders_are_absorbed_when_the_named_file_is_recorded(tiny, tmp_path):
    merges = tmp_path / "merges"
    merges.mkdir()
    parent = tiny("parent.safetensors", 1)  # not in the scanned folder yet
    other = tiny("other.safetensors", 2)
    merged = str(merges / "merged.safetensors")
    shutil.move(tiny("merged.safetensors", 3, _a1111_metadata(hash_file(parent).sha256, hash_file(other).sha256,
                                                               ["1" * 64, "2" * 64, "3" * 64])), merged)
    scan(merges)
    placeholder = f"sha256:{hash_file(parent).sha256}"
    assert placeholder in edges_into(hash_file(merged).autov3)
    with Registry() as reg:
        assert reg.node(placeholder)["name"] == "primary"
    parent_id = lineage.record(parent)
    edges = edges_into(hash_file(merged).autov3)
    assert parent_id in edges and placeholder not in edges and edges[parent_id]["weight"] == 0.7
    assert "sha256:" + "1" * 64 in edges_into(parent_id)  # its own ancestry moved over too
    with Registry() as reg:
        assert not reg.has_node(placeholder)
        assert "primary" in reg.node(parent_id)["names"]


def test_kohya_lora_hangs_under_its_base(tiny, tmp_path):
    base = tiny("base.safetensors", 1)
    lora = tiny("style.safetensors", 2, lora=True, metadata={
        "ss_new_sd_model_hash": hash_file(base).sha256, "ss_sd_model_name": "base.safetensors",
        "ss_network_module": "networks.lora", "ss_network_dim": "16", "ss_network_alpha": "8",
        "ss_v_parameterization": "True", "ss_base_model_version": "sdxl_base_v1-0"})
    scan(tmp_path)
    lora_id = hash_file(lora).autov3
    edge = edges_into(lora_id)[hash_file(base).autov3]
    assert edge["relation"] == "adapter" and edge["source"] == "kohya"
    assert edge["params"]["ss_network_dim"] == "16"
    with Registry() as reg:
        node = reg.node(lora_id)
    assert (node["kind"], node["architecture"], node["prediction_type"]) == ("lora", "sdxl", "v")


def test_modelspec_merged_from_resolves_names_or_keeps_placeholders(tiny):
    merged = scan_file(tiny("m.safetensors", 1, {"modelspec.merged_from": "Illustrious-XL v0.1, my secret mix"}))
    edges = edges_into(merged)
    assert set(edges) == {"illustrious-xl-v0.1", "name:my secret mix"}
    assert all(e["relation"] == "merge" and e["source"] == "modelspec" for e in edges.values())


def test_sd_mecha_recipe_inputs_are_found_next_to_the_file(tiny):
    a, b = tiny("ghost.safetensors", 1), tiny("dream.safetensors", 2)
    recipe = 'version 0.1.0\nmodel "ghost.safetensors" config="sdxl-sgm"\nmodel "dream.safetensors"\n' \
             'merge "weighted_sum" &0 &1 alpha=0.5'
    merged = scan_file(tiny("mix.safetensors", 3, {"mecha_recipe": recipe}))
    edges = edges_into(merged)
    assert set(edges) == {hash_file(a).autov3, hash_file(b).autov3}
    assert all(e["params"]["method"] == "weighted_sum" for e in edges.values())


def test_broken_files_are_reported_and_the_rest_recorded(tiny, tmp_path):
    tiny("good.safetensors", 1)
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 40)
    result = scan(tmp_path)
    assert [os.path.basename(p) for p, _ in result.recorded] == ["good.safetensors"]
    assert len(result.failed) == 1 and "broken.safetensors" in result.failed[0][0]


def test_link_makes_a_file_that_catalog_model(tiny):
    path = tiny("noob.safetensors", 1)
    assert link(path, "NoobAI-XL V-pred 1.0") == "noobai-xl-vpred-1.0"
    with Registry() as reg:
        assert reg.resolve(path) == "noobai-xl-vpred-1.0" and reg.resolve(hash_file(path).sha256[:8]) == \
            "noobai-xl-vpred-1.0"
        model = reg.graph().nodes["noobai-xl-vpred-1.0"]
    linked = [f for f in model["files"] if f.get("linked")]  # after the files the catalog lists for the model
    assert model["paths"] == [path] and linked[0]["sha256"] == hash_file(path).sha256
    with pytest.raises(LineageError, match="no node"):
        link(tiny("noob.safetensors", 1), "not-a-model")


# ---------------------------------------------------------------- command line


def test_cli_add_scan_link(lmerge, tiny, tmp_path):
    a, b = tiny("a.safetensors", 1), tiny("b.safetensors", 2)
    code, out, _ = lmerge("add", a, "--parent", "illustrious-xl-v0.1")
    assert code == 0 and f"recorded {a} as a [{hash_file(a).autov3}]" in out
    assert "parent added: Illustrious-XL v0.1 [illustrious-xl-v0.1] (finetune)" in out
    code, out, _ = lmerge("add", tiny("m.safetensors", 3), "--parent", a, "--parent", b, "--weight", "0.4",
                          "--weight", "0.6", "--name", "Mix")
    assert code == 0 and "as Mix [" in out and "(merge 0.4)" in out and "(merge 0.6)" in out
    code, out, err = lmerge("scan", tmp_path)
    assert code == 0 and "recorded 3 file(s); 0 relation(s) from metadata" in out and "reading" in err
    code, out, _ = lmerge("link", b, "pony-diffusion-v6-xl")
    assert code == 0 and "it is Pony Diffusion V6 XL [pony-diffusion-v6-xl]" in out
    code, _, err = lmerge("add", a, "--weight", "0.5")
    assert code == 1 and "go with --parent" in err
    (tmp_path / "bad.safetensors").write_bytes(b"nope")
    code, _, err = lmerge("scan", tmp_path)
    assert code == 1 and "bad.safetensors" in err and err.startswith("reading") and "error:" in err


def test_cli_uses_the_registry_option(lmerge, tiny, tmp_path, isolated_registry):
    elsewhere = tmp_path / "elsewhere.sqlite"
    code, _, _ = lmerge("add", tiny("a.safetensors", 1), "--registry", elsewhere)
    assert code == 0 and elsewhere.is_file() and not isolated_registry.exists()


def test_scan_reads_the_lineage_a_merge_writes(family, tmp_path):
    """The merge engine's output metadata (our record, ModelSpec, A1111) gives its parents back on a scan."""
    output = tmp_path / "mix.safetensors"
    lineage.merge([family["base"], family["child"]], output, alpha=0.25, record=False, progress=False)
    node = scan_file(output)
    edges = edges_into(node)
    assert {p: e["weight"] for p, e in edges.items()} == {hash_file(family["base"]).autov3: 0.75,
                                                          hash_file(family["child"]).autov3: 0.25}
    assert all(e["source"] == "lineage" and e["params"]["method"] == "weighted_sum" for e in edges.values())
