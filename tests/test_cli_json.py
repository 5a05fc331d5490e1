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


# Commands that print no report and so need no --json. Empty today: every command reports something.
NO_REPORT: set[str] = set()
# Commands whose JSON comes from an output format instead: `tree --format json`.
JSON_BY_FORMAT = {"tree"}


def _commands(group, prefix=()):
    import click

    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            yield from _commands(command, (*prefix, name))
        else:
            yield " ".join((*prefix, name)), command


def test_every_command_that_reports_has_json():
    from lineage.cli import main

    commands = dict(_commands(main))
    assert {"edit", "link", "merge-nodes", "remove", "hub card", "registry info"} <= set(commands)
    missing = []
    for name, command in commands.items():
        if name in NO_REPORT:
            continue
        options = {o for param in command.params for o in getattr(param, "opts", [])}
        if name in JSON_BY_FORMAT:
            fmt = next(p for p in command.params if "--format" in getattr(p, "opts", []))
            if "json" not in fmt.type.choices:
                missing.append(name)
        elif "--json" not in options:
            missing.append(name)
        else:
            flag = next(p for p in command.params if "--json" in p.opts)
            assert flag.is_flag, name
    for name in ("edit", "link", "merge-nodes", "remove", "hub card"):
        flag = next(p for p in commands[name].params if "--json" in getattr(p, "opts", []))
        assert flag.help == "Print one JSON object.", name
    assert missing == []


def test_link_edit_merge_nodes_and_remove_print_json(lmerge, tiny):
    from lineage.graph.recording import scan_file

    a, b = tiny("fp16.safetensors", 1), tiny("fp32.safetensors", 2)
    ida, idb = scan_file(a), scan_file(b)
    code, out, _ = lmerge("merge-nodes", ida, idb, "--json")
    assert code == 0 and json.loads(out) == {"merged": idb, "into": ida, "name": "fp16"}
    code, out, _ = lmerge("edit", b, "--unlink", "--json")
    assert code == 0 and json.loads(out)["unlinked"] == idb
    code, out, _ = lmerge("edit", ida, "--rename", "fp16", "--set-notes", "", "--parent", "illustrious-xl-v0.1",
                          "--json")
    report = json.loads(out)
    assert code == 0 and report["node"] == ida and report["name"] == "fp16"
    assert report["set"] == {"name": "fp16"} and report["cleared"] == ["notes"]
    assert [p["id"] for p in report["parents"]] == ["illustrious-xl-v0.1"]
    code, out, _ = lmerge("link", b, "noobai-xl-vpred-1.0", "--json")
    assert code == 0 and json.loads(out)["node"] == "noobai-xl-vpred-1.0" and json.loads(out)["path"] == b
    code, out, _ = lmerge("remove", ida, "--json")
    assert code == 0 and json.loads(out) == {"removed": ida, "linked_files": []}


def test_hub_card_prints_json(lmerge, tiny, tmp_path):
    import lineage

    child = lineage.record(tiny("c.safetensors", 1), parents=["noobai-xl-vpred-0.75"])
    code, out, _ = lmerge("hub", "card", child, "--json")
    report = json.loads(out)
    assert code == 0 and report["node"] == child and report["output"] is None and report["left_out"] == []
    assert report["base_model"] == "Laxhar/noobai-XL-Vpred-0.75" and report["base_model_relation"] == "finetune"
    readme = tmp_path / "README.md"
    code, out, _ = lmerge("hub", "card", child, "-o", readme, "--json")
    assert code == 0 and json.loads(out)["output"] == str(readme)
    assert "Laxhar/noobai-XL-Vpred-0.75" in readme.read_text()


def test_every_command_that_records_takes_registry(lmerge, family, tmp_path, isolated_registry):
    """What records into the registry (`--no-record` says so) takes `--registry PATH` too, and records there."""
    from lineage.cli import main
    from lineage.graph.registry import Registry

    commands = dict(_commands(main))
    recording = [name for name, command in commands.items()
                 if "--no-record" in {o for param in command.params for o in getattr(param, "opts", [])}]
    assert {"merge", "extract", "apply", "convert", "resize", "lora-merge"} <= set(recording)
    assert [name for name in recording
            if "--registry" not in {o for p in commands[name].params for o in getattr(p, "opts", [])}] == []
    elsewhere = tmp_path / "elsewhere.sqlite"
    lora, peft, applied = tmp_path / "lora.safetensors", tmp_path / "peft.safetensors", tmp_path / "applied.safetensors"
    code, _, err = lmerge("extract", family["base"], family["child"], "-o", lora, "--rank", 2, "--registry", elsewhere)
    assert code == 0, err
    code, out, err = lmerge("apply", family["base"], lora, "-o", applied, "--registry", elsewhere, "--json")
    assert code == 0, err
    applied_node = json.loads(out)["node"]
    code, out, err = lmerge("convert", lora, peft, "--to", "peft", "--registry", elsewhere, "--json")
    assert code == 0, err
    converted_node = json.loads(out)["node"]
    with Registry(elsewhere) as reg:
        assert {applied_node, converted_node} <= set(reg.graph().nodes)
    if isolated_registry.exists():  # the default registry got none of them
        with Registry(isolated_registry) as reg:
            assert not {applied_node, converted_node} & set(reg.graph().nodes)
