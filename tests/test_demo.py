"""`make demo`'s download folder (examples/demo.py): files named and tagged like Civitai downloads land
on the catalog nodes through `lmerge scan` alone. (The whole demo runs in test_examples.py.)"""
import importlib.util
from pathlib import Path

from lineage import hash_file
from lineage.graph.catalog import catalog_graph
from lineage.graph.recording import record
from lineage.graph.registry import Registry

DEMO = Path(__file__).parent.parent / "examples" / "demo.py"


def _demo():
    spec = importlib.util.spec_from_file_location("demo", DEMO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # the demo runs only as a script: importing it defines its steps
    return module


def test_the_demo_downloads_land_on_the_catalog_nodes(tmp_path, lmerge):
    files = _demo().make_downloads(tmp_path / "downloads")
    code, out, _ = lmerge("scan", tmp_path / "downloads")
    assert code == 0
    checkpoints = {"illustrious": "illustrious-xl-v0.1", "noob_eps": "noobai-xl-eps-1.1",
                   "noob_v": "noobai-xl-vpred-1.0"}
    for key, node in checkpoints.items():
        assert f"linked {files[key]}: it is " in out and f"[{node}] (by its file name, 100%)" in out
    with Registry() as reg:
        graph = reg.graph()
        assert {key: reg.resolve(files[key]) for key in checkpoints} == checkpoints
        mix, lora = reg.resolve(files["a1111_mix"]), reg.resolve(files["style_lora"])
    assert mix == hash_file(files["a1111_mix"]).autov3 and lora == hash_file(files["style_lora"]).autov3
    # A1111's sd_merge_models and kohya's ss_new_sd_model_hash name the parents by the downloads' SHA256
    assert {p: graph.edges[p, mix]["source"] for p in graph.predecessors(mix)} == {
        "illustrious-xl-v0.1": "a1111", "noobai-xl-eps-1.1": "a1111"}
    assert [(p, graph.edges[p, lora]["relation"]) for p in graph.predecessors(lora)] == [
        ("illustrious-xl-v0.1", "adapter")]
    assert graph.nodes[lora]["kind"] == "lora" and graph.nodes[lora]["architecture"] == "sdxl"



def test_each_demo_run_starts_its_registry_anew(tmp_path, tiny):
    path = tmp_path / "registry.sqlite"
    with Registry(path) as earlier_run:
        earlier = record(tiny("earlier.safetensors", seed=0), registry=earlier_run)
        assert earlier in earlier_run.graph()
    (tmp_path / "registry.sqlite-wal").write_bytes(b"a log a killed run left")
    registry = _demo().new_registry(path)
    try:
        graph = registry.graph()
        assert earlier not in graph and set(graph) == set(catalog_graph())
    finally:
        registry.close()
