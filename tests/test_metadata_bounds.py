"""Metadata from other tools is bounded: out-of-bounds keys are skipped with a warning naming the file and the key."""
import json
import os
import time

import pytest

from lineage.graph import metadata
from lineage.graph.recording import scan_file
from lineage.graph.registry import Registry

H1, H2 = "ab" * 32, "cd" * 32
LONG_PATH = "/x" * 3000 + ".safetensors"


def _nested(depth):
    value = {}
    for _ in range(depth):
        value = {"a": value}
    return value


def _recipe(**fields):
    return json.dumps({"primary_model_hash": H1, "secondary_model_hash": H2, "interp_method": "Weighted sum",
                       "multiplier": 0.5, **fields})


CASES = {
    "a name that is an object": ({"sd_merge_recipe": _recipe(),
                                  "sd_merge_models": json.dumps({H1: {"name": {"x": 1}}})}, "sd_merge_models"),
    "a method that is a list": ({"sd_merge_recipe": _recipe(interp_method=["x"])}, "sd_merge_recipe"),
    "a multiplier in text": ({"sd_merge_recipe": _recipe(multiplier="0.5")}, "sd_merge_recipe"),
    "a huge multiplier": ({"sd_merge_recipe": _recipe(multiplier=1e308)}, "sd_merge_recipe"),
    "a huge weight": ({"lineage.record": json.dumps({"inputs": [{"autov3": H1}], "weights": [10**19]})},
                      "lineage.record"),
    "deep nesting": ({"lineage.record": json.dumps({"inputs": [{"autov3": H1}], "params": _nested(500)})},
                     "lineage.record"),
    "inputs that are text": ({"lineage.record": json.dumps({"inputs": "a,b,c"})}, "lineage.record"),
    "an unknown relation": ({"lineage.record": json.dumps({"inputs": [{"autov3": H1}], "relation": "zzz"})},
                            "lineage.record"),
    "an over-long merged_from path": ({"modelspec.merged_from": LONG_PATH + ", b"}, "modelspec.merged_from"),
    "an over-long sd-mecha path": ({"mecha_recipe": f'model "{LONG_PATH}"'}, "mecha_recipe"),
    "an over-long title": ({"modelspec.title": "t" * 200_000}, "modelspec.title"),
    "a lone surrogate": ({"sd_merge_recipe": _recipe(), "sd_merge_models": '{"' + H1 + '": {"name": "\\ud800"}}'},
                         "sd_merge_models"),
}


@pytest.mark.parametrize("case", CASES)
def test_malformed_metadata_is_skipped_with_a_warning_naming_file_and_key(case, tiny, caplog, lmerge):
    meta, key = CASES[case]
    path = tiny("odd.safetensors", 1, meta)
    code, _, err = lmerge("scan", path)
    assert code == 0 and "Traceback" not in err
    node = scan_file(path)
    assert any(path in r.getMessage() and repr(key) in r.getMessage() for r in caplog.records), caplog.text
    with Registry() as reg:
        stored = json.dumps(reg.node(node), ensure_ascii=False)
    assert "1e+308" not in stored and "t" * 5000 not in stored and LONG_PATH not in stored


def test_five_thousand_merged_from_names_stay_small_and_fast(tiny, caplog, isolated_registry):
    path = tiny("mega.safetensors", 1, {"modelspec.merged_from": ", ".join(f"model number {i}" for i in range(5000))})
    start = time.monotonic()
    scan_file(path)
    elapsed = time.monotonic() - start
    files = [f"{isolated_registry}{suffix}" for suffix in ("", "-wal")]
    size = sum(os.path.getsize(f) for f in files if os.path.exists(f))
    assert elapsed < 10 and size < 5e6, (elapsed, size)  # before the bounds: 17 s and 499 MB
    with Registry() as reg:
        assert reg.user_graph().number_of_edges() == metadata.MAX_PARENTS
    assert f"names 5,000 models; the first {metadata.MAX_PARENTS} were read" in caplog.text and path in caplog.text


def test_a_long_ancestry_is_read_up_to_its_bound(tiny, caplog, monkeypatch):
    monkeypatch.setattr(metadata, "MAX_ANCESTRY", 40)
    models = {f"{i:064x}": {"name": f"m{i}", "sd_merge_recipe": {"primary_model_hash": f"{i + 1000:064x}",
                                                                  "secondary_model_hash": f"{i + 2000:064x}"}}
              for i in range(1, 200)}
    path = tiny("deep.safetensors", 1, {"sd_merge_recipe": _recipe(), "sd_merge_models": json.dumps(models)})
    scan_file(path)
    with Registry() as reg:
        assert reg.user_graph().number_of_edges() == 2 + 2 * 40
    assert "an ancestry of 199 entries; the first 40 were read" in caplog.text


def test_a_ten_thousand_entry_ancestry_stays_small_and_fast(tiny, caplog, isolated_registry):
    # A1111's flattened ancestry of a chain of weighted-sum merges, as benchmarks/bench_metadata_bounds.py writes it
    models = {f"{i:064x}": {"name": f"m{i}", "sd_merge_recipe": {
        "primary_model_hash": f"{i + 1:064x}", "secondary_model_hash": f"{i + 2:064x}",
        "interp_method": "Weighted sum", "multiplier": 0.5}} for i in range(10_000)}
    path = tiny("ancestry.safetensors", 1, {"sd_merge_recipe": _recipe(), "sd_merge_models": json.dumps(models)})
    start = time.monotonic()
    scan_file(path)
    elapsed = time.monotonic() - start
    size = sum(os.path.getsize(f) for f in (isolated_registry, f"{isolated_registry}-wal") if os.path.exists(f))
    # 1.0 s and 2.6 MB here; before the bound (all 10,000 read) 7 s and 26 MB, and 690 s before the cycle check
    assert elapsed < 15 and size < 4e6, (elapsed, size)
    with Registry() as reg:
        assert reg.user_graph().number_of_edges() == 2 + 2 * metadata.MAX_ANCESTRY
    assert f"an ancestry of 10,000 entries; the first {metadata.MAX_ANCESTRY:,} were read" in caplog.text
