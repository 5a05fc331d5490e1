"""The SQLite registry: location, transactions, integrity rules, damaged files, export/import, concurrency."""
import json
import multiprocessing
import os
import sqlite3

import pytest

from lineage import LineageError
from lineage.graph.catalog import catalog_graph
from lineage.graph.interchange import from_document, read_graph_file, to_graphml, to_json
from lineage.graph.recording import record
from lineage.graph.registry import Registry, default_registry_path, user_data_dir


def _user_counts(reg):
    """(nodes, edges) the user added (the catalog nodes their edges hang from not counted)."""
    g = reg.user_graph()
    return sum(a.get("source") != "catalog" for _, a in g.nodes(data=True)), g.number_of_edges()


def test_location_follows_lineage_home_then_the_user_data_dir(isolated_registry, monkeypatch, tmp_path):
    assert default_registry_path() == isolated_registry
    with Registry() as reg:
        assert reg.path == isolated_registry and isolated_registry.is_file()
    monkeypatch.delenv("LINEAGE_HOME")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert user_data_dir() == tmp_path / "xdg" / "lineage"
    assert default_registry_path() == tmp_path / "xdg" / "lineage" / "registry.sqlite"
    with Registry(tmp_path) as reg:  # a directory means the registry file inside it
        assert reg.path == tmp_path / "registry.sqlite"


def test_fresh_registry_shows_the_catalog():
    with Registry() as reg:
        g = reg.graph()
        assert "noobai-xl-vpred-1.0" in g and _user_counts(reg) == (0, 0)
        assert reg.has_node("sdxl-1.0-base") and not reg.has_node("nope")
        assert reg.node("illustrious-xl-v0.1")["maker"] == "Onoma AI"


def test_a_failing_batch_leaves_nothing_behind():
    with Registry() as reg:
        with pytest.raises(LineageError, match="no node 'missing'"):
            with reg.batch() as b:
                b.put_node("x", {"name": "X"})
                b.put_edge("sdxl-1.0-base", "x", "finetune")
                b.put_edge("missing", "x", "merge")
        assert _user_counts(reg) == (0, 0)


def test_catalog_is_read_only_and_cycles_are_refused():
    with Registry() as reg, reg.batch() as b:
        with pytest.raises(LineageError, match="built-in catalog node"):
            b.put_node("sdxl-1.0-base", {"name": "mine"})
        b.put_node("a", {"name": "A"})
        b.put_node("b", {"name": "B"})
        b.put_node("c", {"name": "C"})
        with pytest.raises(LineageError, match="parents cannot be changed"):
            b.put_edge("a", "illustrious-xl-v0.1", "finetune")
        b.put_edge("sdxl-1.0-base", "a", "finetune")
        b.put_edge("a", "b", "finetune")
        b.put_edge("b", "c", "merge", weight=0.5)
        with pytest.raises(LineageError, match="cannot descend from itself"):
            b.put_edge("c", "a", "finetune")
        with pytest.raises(LineageError, match="unknown relation"):
            b.put_edge("a", "c", "blend")
    with Registry() as reg:
        assert _user_counts(reg) == (3, 3)
        assert reg.graph().edges["b", "c"] == {"relation": "merge", "weight": 0.5}


def test_node_attributes_merge_names_and_hashes():
    with Registry() as reg:
        with reg.batch() as b:
            b.put_node("n", {"name": "first", "hashes": {"sha256": "AB" * 32}})
            b.put_node("n", {"name": "second", "kind": "lora"}, defaults={"kind": "checkpoint", "maker": "me"})
        node = reg.node("n")
        assert node["name"] == "second" and node["kind"] == "lora" and node["maker"] == "me"
        assert node["names"] == ["first", "second"]
        assert reg.find_by_hash("abab" * 4) == ["n"]
        assert reg.find_by_hash("ab" * 32, "sha256") == ["n"] and reg.find_by_hash("ab" * 32, "autov1") == []
        assert reg.resolve("second") == "n" and reg.resolve("ABABABABAB") == "n"
        with pytest.raises(LineageError, match="no node 'third'"):
            reg.resolve("third")


def test_garbage_file_is_reported_and_left_untouched(tmp_path):
    path = tmp_path / "registry.sqlite"
    garbage = b"this is not a database" * 300
    path.write_bytes(garbage)
    with pytest.raises(LineageError, match="not a lineage registry or is damaged.*left as it is"):
        Registry(path)
    assert path.read_bytes() == garbage


def test_damaged_registry_is_reported_and_left_untouched(tmp_path, tiny):
    path = tmp_path / "registry.sqlite"
    with Registry(path) as reg, reg.batch() as b:
        for i in range(300):
            b.put_node(f"node-{i}", {"name": f"model {i}", "notes": "x" * 200})
    size = path.stat().st_size
    with open(path, "r+b") as f:  # overwrite the middle of the file: pages of the nodes table
        f.seek(size // 2)
        f.write(b"\xff" * 8192)
    damaged = path.read_bytes()
    with pytest.raises(LineageError, match="damaged|cannot be read"):
        with Registry(path) as reg:
            reg.graph()
    assert path.read_bytes() == damaged


def test_other_databases_and_newer_schemas_are_refused(tmp_path):
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE photos (id INTEGER)")
    foreign = other.read_bytes()
    with pytest.raises(LineageError, match="not a lineage registry"):
        Registry(other)
    assert other.read_bytes() == foreign  # not even its journal mode changed
    newer = tmp_path / "newer.sqlite"
    Registry(newer).close()
    with sqlite3.connect(newer) as conn:
        conn.execute("PRAGMA user_version = 99")
    before = newer.read_bytes()
    with pytest.raises(LineageError, match="schema version 99 is newer"):
        Registry(newer)
    assert newer.read_bytes() == before


def _populate(reg, tiny):
    base = record(tiny("base.safetensors", 1), parents=["sdxl-1.0-base"], registry=reg)
    other = record(tiny("other.safetensors", 2), registry=reg)
    merged = record(tiny("merged.safetensors", 3), parents=[base, other], relation="merge", weights=[0.25, 0.75],
                    params={"method": "weighted_sum"}, registry=reg)
    return base, other, merged


@pytest.mark.parametrize("fmt", ["json", "graphml"])
def test_export_then_import_gives_the_same_graph(tmp_path, tiny, fmt):
    with Registry(tmp_path / "a.sqlite") as source:
        _, _, merged = _populate(source, tiny)
        exported = source.user_graph()
    export = tmp_path / f"export.{fmt}"
    export.write_text(to_json(exported) if fmt == "json" else to_graphml(exported))
    with Registry(tmp_path / "b.sqlite") as target:
        counts = target.import_graph(read_graph_file(export))
        assert counts == {"nodes": 3, "edges": 3, "skipped_catalog": 1}  # sdxl-1.0-base, which base hangs from
        imported = target.user_graph()
        assert dict(imported.nodes(data=True)) == dict(exported.nodes(data=True))
        assert sorted(imported.edges(data=True)) == sorted(exported.edges(data=True))
        assert target.find_paths(merged) == [str(tmp_path / "merged.safetensors")]
        assert target.import_graph(read_graph_file(export))["nodes"] == 3  # again: nothing changes
        assert _user_counts(target) == (3, 3)


def test_a_tree_export_with_catalog_nodes_imports_only_the_user_part(tmp_path, tiny):
    with Registry() as reg:
        _populate(reg, tiny)
        whole = reg.graph()
    with Registry(tmp_path / "fresh.sqlite") as fresh:
        counts = fresh.import_graph(whole)
        assert counts["nodes"] == 3 and counts["skipped_catalog"] > 100  # catalog nodes and edges
        assert fresh.user_graph().number_of_edges() == 3


@pytest.mark.parametrize("content, problem", [
    ('{"format": "lineage-graph", "version": 1, "nodes": [{"id": "x"}], "edges": [', "not valid JSON"),
    ('{"format": "something-else", "version": 1, "nodes": [], "edges": []}', "not a lineage-graph document"),
    ('{"format": "lineage-graph", "version": 7, "nodes": [], "edges": []}', "version 7 is newer"),
    ('{"format": "lineage-graph", "version": 1, "nodes": [{"id": "x"}, {"name": "no id"}], "edges": []}',
     r"nodes\[1\] needs"),
    ('{"format": "lineage-graph", "version": 1, "nodes": [{"id": "x"}], '
     '"edges": [{"parent": "sdxl-1.0-base", "child": "x", "relation": "blend"}]}', "relation 'blend'"),
    ('{"format": "lineage-graph", "version": 1, "nodes": [{"id": "x"}], '
     '"edges": [{"parent": "sdxl-1.0-base", "child": "x", "relation": "merge", "weight": "half"}]}', "not a number"),
    ('{"format": "lineage-graph", "version": 1, "nodes": [{"id": "x"}], '
     '"edges": [{"parent": "elsewhere", "child": "x", "relation": "merge"}]}', "'elsewhere' is not listed"),
    ('<graphml><broken', "not valid GraphML"),
])
def test_malformed_imports_are_refused_by_the_reader(tmp_path, content, problem):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    with pytest.raises(LineageError, match=problem):
        read_graph_file(bad)


@pytest.mark.parametrize("edges, problem", [
    ([("x", "y"), ("y", "x")], "has a cycle"),
    ([("sdxl-1.0-base", "x"), ("MERGED", "y"), ("y", "BASE")], "cannot descend from itself"),  # with the registry's
    ([("x", "illustrious-xl-v0.1")], "read-only"),
])
def test_an_import_that_fails_half_way_applies_nothing(tiny, edges, problem):
    with Registry() as reg:
        base, _, merged = _populate(reg, tiny)
        before = reg.user_graph()
        ids = {"BASE": base, "MERGED": merged}
        edges = [(ids.get(p, p), ids.get(c, c)) for p, c in edges]
        listed = {"x", "y"} | {n for edge in edges for n in edge}
        document = {"format": "lineage-graph", "version": 1, "nodes": [{"id": n} for n in sorted(listed)],
                    "edges": [{"parent": p, "child": c, "relation": "finetune"} for p, c in edges]}
        with pytest.raises(LineageError, match=problem):
            reg.import_graph(from_document(document))
        after = reg.user_graph()
        assert dict(after.nodes(data=True)) == dict(before.nodes(data=True))
        assert sorted(after.edges) == sorted(before.edges)


def _register_fifty(worker: int, directory: str, registry: str, start: multiprocessing.Barrier) -> None:
    import torch

    from lineage.io.safetensors import save_file

    files = []
    for i in range(50):
        path = os.path.join(directory, f"w{worker}-{i}.safetensors")
        save_file({"model.diffusion_model.label_emb.0.0.weight": torch.full((2, 2), worker * 1000.0 + i)}, path)
        files.append(path)
    with Registry(registry) as reg:
        start.wait()  # all eight begin writing at the same moment
        previous = "sdxl-1.0-base"
        for path in files:  # a chain: each node is a fine-tune of the one before
            previous = record(path, parents=[previous], registry=reg)


def test_eight_processes_registering_fifty_nodes_each_lose_nothing(tmp_path):
    registry = str(tmp_path / "shared.sqlite")  # created by the racing workers themselves
    context = multiprocessing.get_context("fork")
    start = context.Barrier(8)
    workers = [context.Process(target=_register_fifty, args=(w, str(tmp_path), registry, start)) for w in range(8)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    assert [w.exitcode for w in workers] == [0] * 8
    with Registry(registry) as reg:
        assert _user_counts(reg) == (400, 400)  # 8 chains of 50, each hanging under the catalog's SDXL base
        assert all(len(reg.find_paths(n)) == 1 for n in reg.user_graph() if n != "sdxl-1.0-base")
        assert reg.graph().out_degree("sdxl-1.0-base") == catalog_graph().out_degree("sdxl-1.0-base") + 8


def test_cli_registry_info_export_import(lmerge, tiny, tmp_path):
    with Registry() as reg:
        _populate(reg, tiny)
    code, out, _ = lmerge("registry", "info")
    assert code == 0 and out.endswith("registry.sqlite: 3 model(s), 3 relation(s) over the built-in catalog\n")
    for name in ("backup.json", "backup.graphml"):
        code, out, _ = lmerge("registry", "export", tmp_path / name)
        assert code == 0 and out == f"wrote {tmp_path / name} (4 models, 3 relations)\n"  # + sdxl-1.0-base
        code, out, _ = lmerge("registry", "import", tmp_path / name, "--registry", tmp_path / f"{name}.sqlite")
        assert code == 0 and out == "imported 3 model(s), 3 relation(s) (1 already in the built-in catalog)\n"
    assert json.loads((tmp_path / "backup.json").read_text())["format"] == "lineage-graph"
    (tmp_path / "broken.json").write_text('{"format": "lineage-graph", "version": 1, "nodes": [')
    code, _, err = lmerge("registry", "import", tmp_path / "broken.json")
    assert code == 1 and err.startswith(f"error: {tmp_path / 'broken.json'}: is not valid JSON")
