"""`lmerge merge`, `lmerge reproduce` and `lmerge methods` as a user runs them."""
import json
import shutil

from lineage.io.hashing import hash_file
from lineage.io.safetensors import SafetensorsFile


def test_merge_writes_records_and_reports(lmerge, trio, tmp_path):
    out = tmp_path / "m.safetensors"
    code, stdout, stderr = lmerge("merge", trio["base"], trio["x"], "-o", out, "--alpha", "0.3",
                                  "--save-recipe", tmp_path / "r.toml")
    assert code == 0, stderr
    autov3 = hash_file(out).autov3
    assert f"AutoV3 {autov3[:12]}" in stdout and f"recorded as node {autov3}" in stdout
    assert 'alpha = 0.3' in (tmp_path / "r.toml").read_text()
    # the saved recipe reproduces the same bytes
    code, stdout, stderr = lmerge("merge", "--recipe", tmp_path / "r.toml", "-o", tmp_path / "again.safetensors",
                                  "--no-record")
    assert code == 0, stderr
    assert hash_file(tmp_path / "again.safetensors").autov3 == autov3


def test_recipe_options_on_the_command_line_override_the_file(lmerge, trio, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'method = "weighted_sum"\n[params]\nalpha = 0.9\n'
                      f'[[inputs]]\npath = "{trio["base"]}"\n[[inputs]]\npath = "{trio["x"]}"\n')
    code, stdout, stderr = lmerge("merge", "--recipe", recipe, "--alpha", "0.2", "-o", tmp_path / "m.safetensors",
                                  "--no-record", "--json")
    assert code == 0, stderr
    assert json.loads(stdout)["recipe"]["params"] == {"alpha": 0.2}


def test_dry_run_shows_the_plan_and_writes_nothing(lmerge, trio, tmp_path):
    code, stdout, stderr = lmerge("merge", trio["base"], trio["x"], trio["y"], "-o", tmp_path / "t.safetensors",
                                  "--method", "ties", "--param", "density=0.2", "--dry-run")
    assert code == 0, stderr
    assert "2513  ties" in stdout and "2  pass (pass-through)" in stdout and "memory estimate" in stdout
    assert list(tmp_path.iterdir()) == []
    code, stdout, _ = lmerge("merge", trio["base"], trio["x"], "-o", tmp_path / "t.safetensors", "--dry-run", "--json",
                             "--blocks", "IN04=1", "--preset", "supermerger-legacy")
    plan = json.loads(stdout)
    assert plan["steps"]["copy (not merged by the block preset)"] > 0 and plan["output_bytes"] > 0


def test_block_string_and_params_reach_the_recipe(lmerge, trio, tmp_path):
    out = tmp_path / "m.safetensors"
    blocks = ",".join(["0"] * 10 + ["1"] + ["0"] * 9)  # M00 = 1
    code, _, stderr = lmerge("merge", trio["base"], trio["x"], "-o", out, "--blocks", blocks, "--no-record")
    assert code == 0, stderr
    with SafetensorsFile(out) as f:
        record = json.loads(f.metadata["lineage.record"])
    assert record["per_key"]["alpha"]["preset"] == "supermerger"
    assert record["per_key"]["alpha"]["blocks"]["M00"] == 1.0


def test_errors_are_one_line(lmerge, trio, family, tmp_path):
    cases = [
        (("merge", trio["base"], trio["x"], "-o", trio["x"]), "one of the inputs"),
        (("merge", trio["base"], "-o", tmp_path / "m.safetensors"), "takes 2 models"),
        (("merge", trio["base"], trio["x"], "-o", tmp_path / "m.safetensors", "--blocks", "1,2"), "takes 20"),
        (("merge", trio["base"], trio["x"], "-o", tmp_path / "m.safetensors", "--param", "beta=1"),
         "no parameter 'beta'"),
        (("merge", family["child"], family["vchild"], "-o", tmp_path / "m.safetensors"), "different prediction types"),
        (("merge", trio["base"], tmp_path / "missing.safetensors", "-o", tmp_path / "m.safetensors"), "no such file"),
        (("reproduce", trio["base"]), "has no readable `lineage.record`"),
    ]
    for args, message in cases:
        code, _, stderr = lmerge(*args)
        assert code == 1 and message in stderr and stderr.count("\n") == 1, (args, stderr)
    assert not (tmp_path / "m.safetensors").exists()


def test_reproduce_finds_inputs_by_hash_and_verifies(lmerge, trio, tmp_path):
    moved = tmp_path / "inputs"
    moved.mkdir()
    base, x = shutil.copy(trio["base"], moved), shutil.copy(trio["x"], moved)
    out = tmp_path / "m.safetensors"
    code, _, stderr = lmerge("merge", base, x, "-o", out, "--method", "dare_ties", "--param", "density=0.4",
                             "--seed", "9")
    assert code == 0, stderr
    shutil.move(base, tmp_path / "elsewhere.safetensors")  # the recorded path is gone ...
    code, _, _ = lmerge("add", tmp_path / "elsewhere.safetensors")  # ... but the registry knows where it went
    assert code == 0
    code, stdout, stderr = lmerge("reproduce", out)
    assert code == 0, stderr
    assert f"input {tmp_path / 'elsewhere.safetensors'}" in stdout and "matches" in stdout
    code, _, stderr = lmerge("reproduce", out, "--input", trio["y"], "--input", x)  # the wrong input
    assert code == 1 and "is not the expected input" in stderr


def test_methods_lists_every_method_with_its_parameters(lmerge):
    code, stdout, _ = lmerge("methods")
    assert code == 0
    assert "weighted_sum  [elementwise]  (alpha=0.5)" in stdout and "ties" in stdout
    code, stdout, _ = lmerge("methods", "--json")
    rows = {r["name"]: r for r in json.loads(stdout)}
    assert rows["dare_ties"]["random"] and rows["ties"]["needs_base"] and rows["ties"]["params"]["density"] == 0.2


def test_dry_run_shows_each_blocks_alpha_and_the_inputs_roles(lmerge, trio, tmp_path):
    out = tmp_path / "m.safetensors"
    code, stdout, _ = lmerge("merge", trio["base"], trio["x"], trio["y"], "--method", "ties", "--blocks",
                             "IN04=0.3", "-o", out, "--dry-run")
    assert code == 0 and not out.exists()
    lines = stdout.splitlines()
    assert f"  base:    {trio['base']}" in lines and f"  model 2: {trio['y']}" in lines
    table = {line.split()[0]: line.split()[1:] for line in lines if line.startswith("  ") and len(line.split()) == 3}
    assert table["IN04"][1] == "0.3" and table["IN05"][1] == "1" and table["VAE"][1] == "1"
    assert max(len(line) for line in lines) <= 80
    code, stdout, _ = lmerge("merge", trio["base"], trio["x"], "--alpha", "0.25", "-o", out, "--dry-run", "--json")
    summary = json.loads(stdout)
    assert summary["roles"] == ["A", "B"] and {tuple(row["alpha"]) for row in summary["blocks"]} == {(0.25,)}


def test_dry_run_warns_when_the_registry_knows_the_first_input_is_not_the_base(lmerge, trio, tmp_path):
    from lineage.graph.recording import record

    base = record(trio["base"])
    record(trio["x"], parents=[base])
    record(trio["y"], parents=[base])
    out = tmp_path / "m.safetensors"
    code, _, err = lmerge("merge", trio["x"], trio["base"], trio["y"], "--method", "ties", "-o", out, "--dry-run")
    assert code == 0 and err.count("warning:") == 2 and f"{trio['y']} does not descend from {trio['x']}" in err
    code, _, err = lmerge("merge", trio["base"], trio["x"], trio["y"], "--method", "ties", "-o", out, "--dry-run")
    assert code == 0 and "warning" not in err


def test_a1111_recipe_of_a_block_merge_has_no_single_multiplier(lmerge, trio, tmp_path):
    from lineage.io.safetensors import SafetensorsFile

    out = tmp_path / "blocks.safetensors"
    assert lmerge("merge", trio["base"], trio["x"], "--alpha", "0.5", "--blocks", "IN04=0.2", "-o", out,
                  "--no-record")[0] == 0
    with SafetensorsFile(out) as f:
        recipe = json.loads(f.metadata["sd_merge_recipe"])
    assert "multiplier" not in recipe and recipe["interp_method"] == "Weighted sum"
    assert recipe["block_weights"]["alpha"]["blocks"]["IN04"] == 0.2
    from lineage.graph.metadata import lineage_from_metadata
    from lineage.graph.recording import origins_from_metadata

    with SafetensorsFile(out) as f:  # read back as A1111's keys alone: no weights invented from a scalar
        a1111 = {"a1111": lineage_from_metadata(f.metadata)["a1111"]}
    assert origins_from_metadata(a1111, "checkpoint")[0].weights == [None, None]
