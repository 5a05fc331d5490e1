"""Every command that reports something prints one JSON document with --json."""
import json


def test_graph_and_file_commands_print_json(lmerge, tiny, tmp_path):
    base = tiny("base.safetensors", 1)
    code, out, _ = lmerge("add", base, "--json")
    assert code == 0 and json.loads(out)["path"] == base
    code, out, _ = lmerge("add", tiny("child.safetensors", 2), "--parent", base, "--json")
    assert code == 0 and json.loads(out)["parents"][0]["relation"] == "finetune"
    code, out, _ = lmerge("scan", tmp_path, "--json")
    assert code == 0 and len(json.loads(out)["recorded"]) == 2 and json.loads(out)["failed"] == []
    code, out, _ = lmerge("registry", "info", "--json")
    assert code == 0 and json.loads(out)["models"] == 2
    export = tmp_path / "export.json"
    code, out, _ = lmerge("registry", "export", export, "--json")
    assert code == 0 and json.loads(out)["relations"] == 1
    code, out, _ = lmerge("registry", "import", export, "--json", "--registry", tmp_path / "other.sqlite")
    assert code == 0 and json.loads(out)["models"] == 2


def test_generate_convert_and_reproduce_print_json(lmerge, trio, tmp_path):
    import torch

    code, out, _ = lmerge("generate", tmp_path / "g.safetensors", "--size", "tiny", "--json")
    assert code == 0 and json.loads(out)["bytes"] > 0
    torch.save({"state_dict": {"w": torch.ones(2)}, "step": 3}, tmp_path / "m.ckpt")
    code, out, _ = lmerge("convert", tmp_path / "m.ckpt", tmp_path / "m.safetensors", "--json")
    assert code == 0 and json.loads(out)["tensors"] == 1
    merged = tmp_path / "merged.safetensors"
    assert lmerge("merge", trio["base"], trio["x"], "-o", merged)[0] == 0
    code, out, _ = lmerge("reproduce", merged, "--json")
    assert code == 0 and json.loads(out)["matches"] is True
