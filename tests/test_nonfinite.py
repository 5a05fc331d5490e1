"""One NaN or infinite weight used to make every later command fail, `registry export` included.
Each entry point refuses it in one line; a row an older version stored is read as an unknown value;
JSON output stays valid JSON (lineage/graph/registry.py, recording.py, interchange.py, metadata.py)."""
import json
import sqlite3

import pytest

from lineage.io import strict_json


def _registry_still_works(lmerge, tmp_path) -> dict:
    """tree, info and export succeed, and the export is strict JSON (no bare NaN / Infinity)."""
    for args in (("tree",), ("tree", "--format", "json"), ("registry", "info")):
        code, _, err = lmerge(*args)
        assert code == 0, (args, err)
    export = tmp_path / "export.json"
    code, _, err = lmerge("registry", "export", export)
    assert code == 0, err
    return strict_json.loads(export.read_text())


@pytest.mark.parametrize("weight", ["inf", "-inf", "nan", "1e309"])
def test_add_refuses_a_weight_that_is_not_finite(lmerge, tiny, tmp_path, weight):
    base, child = tiny("base.safetensors", 1), tiny("child.safetensors", 2)
    code, _, err = lmerge("add", child, "--parent", base, "--weight", weight)
    assert code == 1 and "is not a finite number" in err and err.count("\n") == 1, err
    assert _registry_still_works(lmerge, tmp_path)["edges"] == []


def test_a_merge_with_a_nan_alpha_does_not_poison_the_registry(lmerge, tiny, tmp_path):
    a, b = tiny("a.safetensors", 1), tiny("b.safetensors", 2)
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'method = "weighted_sum"\n[params]\nalpha = nan\n[[inputs]]\npath = "{a}"\n'
                      f'[[inputs]]\npath = "{b}"\n')
    lmerge("merge", "--recipe", recipe, "-o", tmp_path / "m.safetensors")  # refused, or recorded without the NaN
    lmerge("merge", a, b, "--alpha", "inf", "-o", tmp_path / "m2.safetensors")
    document = _registry_still_works(lmerge, tmp_path)
    assert strict_json.nonfinite_path(document) is None


def test_registry_import_refuses_nan_in_json_and_graphml(lmerge, tmp_path):
    document = {"format": "lineage-graph", "version": 1,
                "nodes": [{"id": "p", "name": "p"}, {"id": "c", "name": "c"}],
                "edges": [{"parent": "p", "child": "c", "relation": "merge", "weight": float("nan")}]}
    as_json = tmp_path / "bad.json"
    as_json.write_text(json.dumps(document))  # Python writes the bare NaN that JSON does not have
    code, _, err = lmerge("registry", "import", as_json)
    assert code == 1 and "NaN is not a JSON number" in err and err.count("\n") == 1, err

    typed = tmp_path / "typed.graphml"  # GraphML's own double type reads "INF" as infinity
    typed.write_text(
        '<?xml version="1.0"?><graphml xmlns="http://graphml.graphdrawing.org/xmlns">'
        '<key id="w" for="edge" attr.name="weight" attr.type="double"/>'
        '<key id="r" for="edge" attr.name="relation" attr.type="string"/>'
        '<key id="f" for="graph" attr.name="format" attr.type="string"/>'
        '<key id="v" for="graph" attr.name="version" attr.type="int"/>'
        '<graph edgedefault="directed"><data key="f">lineage-graph</data><data key="v">1</data>'
        '<node id="p"/><node id="c"/><edge source="p" target="c"><data key="w">INF</data>'
        '<data key="r">merge</data></edge></graph></graphml>')
    code, _, err = lmerge("registry", "import", typed)
    assert code == 1 and "edges[0].weight is not a finite number" in err and err.count("\n") == 1, err

    as_text = tmp_path / "text.graphml"  # an attribute stored as JSON text
    as_text.write_text(typed.read_text().replace('attr.name="weight" attr.type="double"',
                                                 'attr.name="params.json" attr.type="string"')
                       .replace(">INF<", '>{"alpha": NaN}<'))
    code, _, err = lmerge("registry", "import", as_text)
    assert code == 1 and "is not valid JSON (NaN is not a JSON number)" in err and err.count("\n") == 1, err
    assert _registry_still_works(lmerge, tmp_path)["nodes"] == []


@pytest.mark.parametrize("multiplier", ["NaN", "Infinity", "1e999"])
def test_a_scanned_a1111_multiplier_that_is_not_finite_is_ignored(lmerge, tiny, tmp_path, multiplier):
    recipe = ('{"type": "webui", "primary_model_hash": "' + "a" * 64 + '", "secondary_model_hash": "' + "b" * 64
              + '", "interp_method": "Weighted sum", "multiplier": ' + multiplier + "}")
    path = tiny("merged.safetensors", 3, metadata={"sd_merge_recipe": recipe})
    code, _, err = lmerge("scan", path)
    assert code == 0, err
    code, out, err = lmerge("inspect", path, "--json")
    assert code == 0 and strict_json.loads(out)["lineage"]["a1111"]["sd_merge_recipe"]["unparsed"] == recipe
    assert strict_json.nonfinite_path(_registry_still_works(lmerge, tmp_path)) is None


def test_an_existing_row_with_nan_does_not_brick_the_registry(lmerge, tiny, tmp_path, isolated_registry):
    """A registry written before the refusal (json.dumps stored NaN and Infinity) still opens; those
    values read as unknown, and the next write of the row drops them."""
    base, child = tiny("base.safetensors", 1), tiny("child.safetensors", 2)
    assert lmerge("add", child, "--parent", base, "--weight", "0.5")[0] == 0
    with sqlite3.connect(isolated_registry) as db:
        db.execute("""UPDATE edges SET attrs = '{"relation":"merge","source":"user","weight":NaN}'""")
        db.execute("""UPDATE nodes SET attrs = json_set(attrs, '$.size', 1) """)
        db.execute("""UPDATE nodes SET attrs = replace(attrs, '"size":1', '"size":Infinity')""")
    document = _registry_still_works(lmerge, tmp_path)
    assert [e.get("weight") for e in document["edges"]] == [None]
    assert [node["size"] for node in document["nodes"]] == [None, None]
    code, _, err = lmerge("add", child, "--parent", base, "--weight", "0.25")
    assert code == 0, err
    assert [e["weight"] for e in _registry_still_works(lmerge, tmp_path)["edges"]] == [0.25]


def test_a_hub_card_with_a_nan_tag_is_refused_in_one_line(lmerge, tmp_path):
    card = tmp_path / "README.md"
    card.write_text("---\nbase_model: stabilityai/stable-diffusion-xl-base-1.0\ntags:\n- .nan\n---\n# x\n")
    code, _, err = lmerge("hub", "import", card, "--as", "someone/model")
    assert code == 1 and "is not a finite number" in err and err.count("\n") == 1, err
    _registry_still_works(lmerge, tmp_path)
