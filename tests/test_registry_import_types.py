"""`registry import` checks the type of every attribute the registry gives a meaning to, and imports all or nothing."""
import json

import pytest

from lineage.graph.registry import Registry


@pytest.mark.parametrize("node, problem", [
    ({"paths": "/models/a.safetensors"}, "nodes[1].paths is '/models/a.safetensors', not a list of texts"),
    ({"names": ["a", 3]}, "nodes[1].names is ['a', 3], not a list of texts"),
    ({"hashes": {"sha256": 5}}, "nodes[1].hashes is {'sha256': 5}, not an object of texts"),
    ({"name": ["x"]}, "nodes[1].name is ['x'], not text"),
    ({"size": -1}, "nodes[1].size is -1, not a whole number"),
    ({"urls": "https://a"}, "nodes[1].urls is 'https://a', not a list of texts (node 'bad')"),
    ({"repo": ["o/n"]}, "nodes[1].repo is ['o/n'], not text (node 'bad')"),
    ({"civitai_url": {"u": 1}}, "nodes[1].civitai_url is {'u': 1}, not text (node 'bad')"),
    ({"same_as": ["good"]}, "nodes[1].same_as is ['good'], not text (node 'bad')"),
    ({"date": 2024}, "nodes[1].date is 2024, not text (node 'bad')"),
    ({"huggingface": "o/n"}, "nodes[1].huggingface is 'o/n', not a list of repo ids (node 'bad')"),
    ({"civitai": [1]}, "nodes[1].civitai is [1], not a list of objects (node 'bad')"),
    ({"files": [{"linked": 3}]}, "nodes[1].files is [{'linked': 3}], not a list of objects whose \"linked\" is text"),
])
def test_a_field_of_the_wrong_type_refuses_the_whole_import(node, problem, lmerge, tmp_path):
    document = {"format": "lineage-graph", "version": 1,
                "nodes": [{"id": "good", "name": "good"}, {"id": "bad", **node}],
                "edges": [{"parent": "sdxl-1.0-base", "child": "good", "relation": "finetune"}]}
    source = tmp_path / "export.json"
    source.write_text(json.dumps(document))
    code, _, err = lmerge("registry", "import", source)
    assert code == 1 and problem in err and "nothing was imported" in err
    with Registry() as reg:
        assert not reg.has_node("good") and not reg.has_node("bad")


def test_edge_fields_are_checked_too(lmerge, tmp_path):
    document = {"format": "lineage-graph", "version": 1, "nodes": [{"id": "x"}],
                "edges": [{"parent": "sdxl-1.0-base", "child": "x", "relation": "merge", "via": ["y"]}]}
    source = tmp_path / "export.json"
    source.write_text(json.dumps(document))
    code, _, err = lmerge("registry", "import", source)
    assert code == 1 and "edges[0].via is ['y'], not text (edge sdxl-1.0-base -> x)" in err
