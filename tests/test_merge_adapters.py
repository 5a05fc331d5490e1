"""Adapters in a merge recipe (`lmerge merge A B --lora X:0.7`, `[[adapters]]`, `lineage.merge(..., adapters=)`):
the merged result with each adapter added in the same streaming pass equals `lmerge merge` then `lmerge apply`
(bit for bit in fp32, to fp16 rounding in fp16); the recipe round-trips and is type-checked; the output records
the adapters as parents; `reproduce` re-runs it with the adapters' hashes checked; bad input is a one-line error
naming the file, and nothing is written."""
from __future__ import annotations

import json
import os

import pytest
import torch
from adapter_samples import modules_of, write_loha, write_lokr, write_lora

import lineage
import lineage.adapters
from lineage.adapters.extract import extract
from lineage.errors import CheckpointError, LineageError
from lineage.graph.recording import scan_file
from lineage.graph.registry import using_registry
from lineage.io.hashing import hash_file
from lineage.io.safetensors import SafetensorsFile, read_header, save_file
from lineage.merge.api import build_recipe, plan
from lineage.merge.jobs import MergeJobs
from lineage.merge.recipe import Adapter, Recipe, load_recipe
from lineage.merge.reproduce import reproduce
from lineage.merge.weights import KeyWeights


@pytest.fixture(scope="module")
def lora(trio, tmp_path_factory) -> str:
    """A rank-4 LoRA extracted (`lmerge extract`) from the trio's base and its fine-tune x."""
    out = tmp_path_factory.mktemp("lora") / "x_lora.safetensors"
    return extract(trio["base"], trio["x"], out, rank=4, record=False, progress=False).path


def load(path) -> dict[str, torch.Tensor]:
    with SafetensorsFile(path) as f:
        return {k: f.read(k) for k in f.keys()}


def merge_then_apply(trio, tmp_path, adapters, **options) -> str:
    """The two-pass reference: `lmerge merge` then `lmerge apply` of the merged file."""
    merged = lineage.merge([trio["x"], trio["y"]], tmp_path / "plain.safetensors", alpha=0.5, record=False,
                           progress=False, **options)
    return lineage.adapters.apply(merged.path, adapters, tmp_path / "applied.safetensors", record=False,
                                  progress=False).path


def nothing_written(tmp_path) -> bool:
    return not [p for p in tmp_path.iterdir() if p.name.startswith(("out", ".out"))]


# ---- equal to merge, then apply ------------------------------------------------------------------

def test_merge_with_lora_equals_merge_then_apply_bit_for_bit_in_fp32(trio, lora, tmp_path):
    result = lineage.merge([trio["x"], trio["y"]], tmp_path / "out.safetensors", alpha=0.5, dtype="fp32",
                           adapters=[(lora, 0.7)], progress=False)
    reference = merge_then_apply(trio, tmp_path, [(lora, 0.7)], dtype="fp32")
    assert result.autov3 == hash_file(reference).autov3  # the same tensor bytes
    assert result.plan.patched_keys > 0
    plain = load(tmp_path / "plain.safetensors")
    out = load(result.path)
    changed = [k for k in out if not torch.equal(out[k], plain[k])]
    assert len(changed) == result.plan.patched_keys  # the adapter did change the merge, on its keys only


def test_merge_with_lora_equals_merge_then_apply_to_fp16_rounding(trio, lora, tmp_path):
    result = lineage.merge([trio["x"], trio["y"]], tmp_path / "out.safetensors", alpha=0.5,
                           adapters=[(lora, 0.7)], record=False, progress=False)
    exact = lineage.merge([trio["x"], trio["y"]], tmp_path / "exact.safetensors", alpha=0.5, dtype="fp32",
                          adapters=[(lora, 0.7)], record=False, progress=False)
    two_pass = load(merge_then_apply(trio, tmp_path, [(lora, 0.7)]))
    merged = load(tmp_path / "plain.safetensors")
    out, reference = load(result.path), load(exact.path)
    eps, smallest = torch.finfo(torch.float16).eps, 2.0 ** -24  # fp16's step at 1, and below its normal range
    for key, value in out.items():
        assert value.dtype == two_pass[key].dtype, key
        if not value.is_floating_point():
            assert torch.equal(value, two_pass[key]), key
            continue
        # one pass rounds once, the fp32 result to fp16: within half a step of it
        assert bool(((value.float() - reference[key]).abs() <= (eps * reference[key].abs() + smallest) / 2).all()), key
        # two passes round the merge first (a step of the merged value), then the patched value
        twice = (eps * (merged[key].float().abs() + reference[key].abs()) + 2 * smallest) / 2
        assert bool(((two_pass[key].float() - reference[key]).abs() <= twice * 1.01).all()), key


def test_every_apply_format_and_several_adapters_in_order(trio, tmp_path):
    modules = modules_of(trio["base"], conv=True)
    adapters = [(write_lokr(tmp_path / "k.safetensors", modules[:40], seed=1), 0.5),
                (write_loha(tmp_path / "h.safetensors", modules[20:60], seed=2), -0.3),
                (write_lora(tmp_path / "p.safetensors", modules[50:90], seed=3, dialect="peft"), 1.0),
                (write_lora(tmp_path / "c.safetensors", modules[-30:], seed=4, mid=True), 0.8)]
    result = lineage.merge([trio["x"], trio["y"]], tmp_path / "out.safetensors", alpha=0.5, dtype="fp32",
                           adapters=adapters, record=False, progress=False)
    assert result.autov3 == hash_file(merge_then_apply(trio, tmp_path, adapters, dtype="fp32")).autov3
    assert [f.algorithm for f in result.plan.adapter_files] == ["lokr", "loha", "lora", "lora"]
    assert result.plan.adapter_files[2].dialect == "peft"


def test_keys_a_block_preset_copies_are_patched_too(trio, lora, tmp_path):
    # ComfyUI's blocks leave the text encoders unmerged: copied from the first model, then patched
    result = lineage.merge([trio["x"], trio["y"]], tmp_path / "out.safetensors", dtype="fp32",
                           per_key={"alpha": KeyWeights(preset="comfyui")}, adapters=[(lora, 0.7)],
                           record=False, progress=False)
    copied = [s for s in result.plan.steps if s.action == "copy" and s.patches]
    assert copied and all(s.key.startswith("conditioner.") for s in copied)
    first = lineage.adapters.apply(trio["x"], [(lora, 0.7)], tmp_path / "x_applied.safetensors", record=False,
                                   progress=False).path
    out, expected = load(result.path), load(first)
    assert all(torch.equal(out[s.key].half(), expected[s.key]) for s in copied)  # the same fp32 sum, rounded


def test_adapter_tensors_are_read_only_by_the_jobs_of_their_keys(trio, lora):
    recipe = build_recipe([trio["x"], trio["y"]], alpha=0.5, adapters=[(lora, 0.7)])
    merge_plan = plan(recipe)
    jobs = MergeJobs(merge_plan, [f.path for f in recipe.files]).jobs()
    for step, job in zip(merge_plan.steps, jobs):
        adapter_keys = [s.key for s in job.sources if s.input == 2]
        assert bool(adapter_keys) == bool(step.patches), step.key
        assert all(s.input in (0, 1) and s.key == step.key for s in job.sources if s.input != 2)
        modules = {p.module.name for p in step.patches}
        assert all(k.split(".")[0] in modules for k in adapter_keys), step.key


# ---- the recipe --------------------------------------------------------------------------------

def test_adapters_round_trip_through_dict_json_and_toml(tmp_path):
    recipe = Recipe("weighted_sum", ("a.safetensors", "b.safetensors"), params={"alpha": 0.5},
                    adapters=(Adapter("style.safetensors", strength=0.7, autov3="ab" * 32),
                              Adapter("detail.safetensors", strength=-1)))
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    assert Recipe.from_dict(json.loads(recipe.to_json())) == recipe
    (tmp_path / "r.toml").write_text(recipe.to_toml())
    loaded = load_recipe(tmp_path / "r.toml")
    assert [(a.path, a.strength, a.autov3, a.name) for a in loaded.adapters] == [
        (str(tmp_path / "style.safetensors"), 0.7, "ab" * 32, "style"),
        (str(tmp_path / "detail.safetensors"), -1, None, "detail")]
    assert "[[adapters]]" in recipe.to_toml()
    assert "adapters" not in Recipe("weighted_sum", ("a", "b")).to_dict()  # no table when there are none


@pytest.mark.parametrize("entry, message", [
    ('path = "s.safetensors"\nstrength = "0.7"', "`adapters[0].strength` must be a finite number, got '0.7'"),
    ('path = "s.safetensors"\nstrength = true', "`adapters[0].strength` must be a finite number"),
    ('path = "s.safetensors"\nstrength = nan', "`adapters[0].strength` must be a finite number"),
    ('path = 3', "`adapters[0].path` must be a file path"),
    ('strength = 0.5', "`adapters[0].path` must be given"),
    ('path = "s.safetensors"\nweight = 0.5', "unknown fields in recipe `adapters[0]`: weight"),
    ('path = "s.safetensors"\nautov3 = "abc"', "`adapters[0].autov3` must be a hex string"),
])
def test_bad_adapter_entries_are_one_line_errors_naming_the_field(tmp_path, entry, message):
    path = tmp_path / "r.toml"
    path.write_text(f'method = "weighted_sum"\n[[inputs]]\npath = "a"\n[[inputs]]\npath = "b"\n'
                    f'[[adapters]]\n{entry}\n')
    with pytest.raises(LineageError) as e:
        load_recipe(path)
    assert message in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)


def test_api_adapters_are_paths_pairs_or_adapters():
    recipe = build_recipe(["a", "b"], adapters=["x.safetensors", ("y.safetensors", 0.25), Adapter("z", strength=2)])
    assert [(a.path, a.strength) for a in recipe.adapters] == [("x.safetensors", 1.0), ("y.safetensors", 0.25),
                                                               ("z", 2)]
    with pytest.raises(LineageError, match="adapters\\[0\\].strength"):
        build_recipe(["a", "b"], adapters=[Adapter("x.safetensors", strength="strong")])


@pytest.mark.parametrize("spec, message", [
    (("x.safetensors", "0.5"), "x.safetensors: the strength must be a finite number, got '0.5'"),
    (("x.safetensors", float("nan")), "x.safetensors: the strength must be a finite number, got nan"),
    (("x.safetensors", True), "x.safetensors: the strength must be a finite number, got True"),
    (("x.safetensors", 0.5, 1), "an adapter is a path or a \\(path, strength\\) pair"),
])
def test_a_merge_apply_and_sampling_read_adapter_pairs_alike(spec, message):
    """One reading of a (path, strength) pair for a merge's adapters and for apply, lora-merge and sampling."""
    from lineage.adapters.apply import adapter_inputs

    with pytest.raises(LineageError, match=message):
        build_recipe(["a", "b"], adapters=[spec])
    with pytest.raises(LineageError, match=message):
        adapter_inputs([spec])


# ---- the command line, the record, reproduce -----------------------------------------------------------

def test_cli_lora_and_save_recipe_then_the_recipe_file_route(lmerge, trio, lora, tmp_path):
    out, saved = tmp_path / "m.safetensors", tmp_path / "r.toml"
    code, stdout, stderr = lmerge("merge", trio["x"], trio["y"], "--alpha", "0.5", "--lora", f"{lora}:0.7",
                                  "-o", out, "--save-recipe", saved)
    assert code == 0, stderr
    assert "patched by 1 adapter(s)" in stdout
    recipe = load_recipe(saved)
    assert [(os.path.normpath(a.path), a.strength, a.autov3) for a in recipe.adapters] == [
        (lora, 0.7, hash_file(lora).autov3)]
    assert f'[[adapters]]\npath = "{os.path.relpath(lora, tmp_path)}"' in saved.read_text()  # relative to it
    code, _, stderr = lmerge("merge", "--recipe", saved, "-o", tmp_path / "again.safetensors", "--no-record")
    assert code == 0, stderr
    assert hash_file(tmp_path / "again.safetensors").autov3 == hash_file(out).autov3
    # --lora given with --recipe replaces the recipe's adapters
    code, stdout, stderr = lmerge("merge", "--recipe", saved, "--lora", f"{lora}:0.2", "-o", tmp_path / "d.safetensors",
                                  "--dry-run", "--json")
    assert code == 0, stderr
    assert [a["strength"] for a in json.loads(stdout)["adapters"]] == [0.2]


def test_dry_run_lists_the_adapters_with_strengths(lmerge, trio, lora, tmp_path):
    code, stdout, stderr = lmerge("merge", trio["x"], trio["y"], "--lora", f"{lora}:0.7", "--lora", lora,
                                  "-o", tmp_path / "out.safetensors", "--dry-run")
    assert code == 0, stderr
    assert f"{lora} at 0.7: " in stdout and f"{lora} at 1: " in stdout and "lora modules (kohya)" in stdout
    assert "keys patched by 2 adapter(s)" in stdout
    code, stdout, stderr = lmerge("merge", trio["x"], trio["y"], "--lora", f"{lora}:0.7",
                                  "-o", tmp_path / "out.safetensors", "--dry-run", "--json")
    found = json.loads(stdout)
    assert found["adapters"][0]["strength"] == 0.7 and found["adapters"][0]["algorithm"] == "lora"
    assert found["patched_keys"] > 0 and nothing_written(tmp_path)


def test_output_records_the_adapters_as_parents_and_scan_agrees(trio, lora, tmp_path, isolated_registry):
    result = lineage.merge([trio["x"], trio["y"]], tmp_path / "out.safetensors", alpha=0.25,
                           adapters=[(lora, 0.7)], progress=False)
    ids = [hash_file(p).autov3 for p in (trio["x"], trio["y"], lora)]
    with using_registry() as reg:
        graph = reg.user_graph()
    edges = {p: graph.edges[p, result.node] for p in graph.predecessors(result.node)}
    assert set(edges) == set(ids)
    assert [edges[i]["weight"] for i in ids] == [0.75, 0.25, 0.7]
    assert all(e["relation"] == "merge" for e in edges.values())
    meta = read_header(result.path)[1]
    record = json.loads(meta["lineage.record"])
    assert record["adapters"] == [{"path": "x_lora.safetensors", "name": "x_lora", "autov3": ids[2], "strength": 0.7}]
    assert "x_lora" in meta["modelspec.merged_from"] and "x_lora applied at 0.7" in meta["modelspec.description"]
    # a registry that only scans the file finds the same parents in its record
    fresh = tmp_path / "fresh.sqlite"
    node = scan_file(result.path, fresh)
    with using_registry(fresh) as reg:
        graph = reg.user_graph()
    assert {graph.edges[p, node]["weight"] for p in graph.predecessors(node)} == {0.75, 0.25, 0.7}


def test_reproduce_re_runs_the_adapters_and_checks_their_hash(trio, lora, tmp_path):
    result = lineage.merge([trio["x"], trio["y"]], tmp_path / "out.safetensors", alpha=0.5,
                           adapters=[(lora, 0.7)], progress=False)
    check = reproduce(result.path)
    assert check.matches and check.inputs == [trio["x"], trio["y"], lora]
    other = write_lora(tmp_path / "other.safetensors", modules_of(trio["base"])[:4])
    with pytest.raises(LineageError, match="is not the expected input") as e:
        reproduce(result.path, inputs=[trio["x"], trio["y"], other])
    assert "other.safetensors" in str(e.value)
    with pytest.raises(LineageError, match="the record names 2 inputs and 1 adapters, 2 files were given"):
        reproduce(result.path, inputs=[trio["x"], trio["y"]])


# ---- bad input --------------------------------------------------------------------------------

def _sd1_lora(path) -> str:
    save_file({"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 768),
               "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(3072, 2)}, path)
    return str(path)


def _misfit_lora(base, path) -> tuple[str, str]:
    m = modules_of(base)[0]
    save_file({f"{m.name}.lora_down.weight": torch.zeros(2, m.shape[1] + 1),
               f"{m.name}.lora_up.weight": torch.zeros(m.shape[0], 2)}, path)
    return str(path), m.name


def test_bad_adapters_are_one_line_errors_naming_the_file(lmerge, trio, tmp_path):
    misfit, module = _misfit_lora(trio["base"], tmp_path / "misfit.safetensors")
    cases = [
        (tmp_path / "missing.safetensors", "missing.safetensors"),
        (trio["base"], "is a checkpoint, not an adapter"),
        (_sd1_lora(tmp_path / "sd1.safetensors"), "SD 1.x adapter"),
        (misfit, module),
        (f"{tmp_path / 'a.safetensors'}:strong", "the strength 'strong' after the colon is not a number"),
        (f"{tmp_path / 'a.safetensors'}:nan", "the strength must be a finite number"),
    ]
    for spec, message in cases:
        for dry_run in ((), ("--dry-run",)):
            code, _, stderr = lmerge("merge", trio["x"], trio["y"], "--lora", spec, "-o", tmp_path / "out.safetensors",
                                     "--no-record", *dry_run)
            assert code == 1 and message in stderr and stderr.count("\n") == 1, (spec, stderr)
            assert str(spec).split(":")[0] in stderr or "strength" in message, stderr
    assert nothing_written(tmp_path)
    with pytest.raises(CheckpointError, match="but the checkpoint's") as e:
        lineage.merge([trio["x"], trio["y"]], tmp_path / "out.safetensors", adapters=[misfit], progress=False)
    assert "misfit.safetensors" in str(e.value) and module in str(e.value)


def test_output_onto_an_adapter_is_refused(lmerge, trio, tmp_path):
    adapter = write_lora(tmp_path / "lora.safetensors", modules_of(trio["base"])[:3])
    before = open(adapter, "rb").read()
    with pytest.raises(LineageError, match="input"):
        lineage.merge([trio["x"], trio["y"]], adapter, adapters=[adapter], progress=False)
    code, _, stderr = lmerge("merge", trio["x"], trio["y"], "--lora", f"{adapter}:0.5", "-o", adapter)
    assert code == 1 and stderr.count("\n") == 1
    code, _, stderr = lmerge("merge", trio["x"], trio["y"], "--lora", adapter, "-o", tmp_path / "m.safetensors",
                             "--save-recipe", adapter)
    assert code == 1 and stderr.count("\n") == 1 and not (tmp_path / "m.safetensors").exists()
    assert open(adapter, "rb").read() == before


def test_an_adapter_on_a_tensor_the_merge_passes_through_is_refused(trio, tmp_path):
    # a weight stored as integers is passed through, never merged: an adapter may not change it either
    module = modules_of(trio["base"])[0]
    copies = []
    for name in ("x", "y"):
        tensors = load(trio[name])
        tensors[module.key] = tensors[module.key].to(torch.int8)
        save_file(tensors, tmp_path / f"{name}_int.safetensors", read_header(trio[name])[1])
        copies.append(tmp_path / f"{name}_int.safetensors")
    adapter = write_lora(tmp_path / "lora.safetensors", [module])
    with pytest.raises(LineageError, match=f"would change {module.key}, which the merge passes through") as e:
        lineage.merge(copies, tmp_path / "out.safetensors", adapters=[adapter], progress=False)
    assert "lora.safetensors" in str(e.value) and module.name in str(e.value)
    assert nothing_written(tmp_path)
