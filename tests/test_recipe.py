"""Recipes: validation, per-key parameters, the TOML file format and its round trip."""
import json
import subprocess
import sys
import time

import pytest

from lineage.errors import LineageError
from lineage.merge.recipe import Input, Recipe, load_recipe
from lineage.merge.weights import KeyWeights

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

UNET_IN04 = "model.diffusion_model.input_blocks.4.1.proj_in.weight"
VAE = "first_stage_model.decoder.conv_in.weight"


def _recipe(**changes):
    fields = dict(method="weighted_sum", inputs=(Input("a.safetensors", "ab" * 32, "A"), Input("b.safetensors")),
                  params={"alpha": 0.25},
                  per_key={"alpha": KeyWeights(preset="supermerger", blocks={"IN04": 1.0},
                                               overrides=((r"decoder\.conv_in", 0.0),))},
                  seed=7, dtype="bf16", mismatch="first", prediction_type="v")
    fields.update(changes)
    return Recipe(**fields)


def test_params_for_resolves_each_key():
    r = _recipe()
    assert r.params_for(UNET_IN04) == {"alpha": 1.0}
    assert r.params_for(VAE) == {"alpha": 0.0}
    assert r.params_for("model.diffusion_model.output_blocks.0.0.in_layers.0.weight") == {"alpha": 0.25}
    legacy = _recipe(per_key={"alpha": KeyWeights(preset="supermerger-legacy")})
    assert legacy.params_for("model.diffusion_model.time_embed.0.weight") is None  # not merged: A kept


def test_toml_round_trip_keeps_everything():
    r = _recipe()
    text = r.to_toml()
    data = tomllib.loads(text)
    assert data["method"] == "weighted_sum" and data["per_key"]["alpha"]["blocks"] == {"IN04": 1.0}
    assert data["inputs"][0] == {"path": "a.safetensors", "name": "A", "autov3": "ab" * 32}
    assert Recipe.from_dict(data) == r


def test_recipe_file_paths_are_relative_to_the_file(tmp_path):
    (tmp_path / "r.toml").write_text(
        'method = "add_difference"\n'
        '[params]\nalpha = 0.5\n'
        '[per_key.alpha]\npreset = "comfyui"\nblocks = "out.=0.25"\ncomponents = { vae = 0.0 }\n'
        '[[inputs]]\npath = "a.safetensors"\n[[inputs]]\npath = "/abs/b.safetensors"\n'
        '[[inputs]]\npath = "c.safetensors"\n')
    r = load_recipe(tmp_path / "r.toml")
    assert [i.path for i in r.inputs] == [str(tmp_path / "a.safetensors"), "/abs/b.safetensors",
                                          str(tmp_path / "c.safetensors")]
    assert r.per_key["alpha"].blocks["out."] == 0.75  # a ComfyUI string: the weight of model 1
    assert r.per_key["alpha"].blocks["input_blocks.4"] == 0.0  # an untouched ComfyUI slider keeps model 1
    assert r.params_for(VAE) is None  # ComfyUI's preset does not merge the VAE; only an override would
    assert r.params_for("model.diffusion_model.out.2.weight") == {"alpha": 0.75}


@pytest.mark.parametrize("text, message", [
    ('method = "weighted_sum"\n[[inputs]]\npath = "a"\n', "takes 2 models"),
    ('method = "nope"\n[[inputs]]\npath = "a"\n[[inputs]]\npath = "b"\n', "unknown merge method 'nope'"),
    ('method = "weighted_sum"\nbeta = 1\n[[inputs]]\npath = "a"\n[[inputs]]\npath = "b"\n',
     "unknown recipe fields beta"),
    ('method = "weighted_sum"\n[params]\ndensity = 0.2\n[[inputs]]\npath = "a"\n[[inputs]]\npath = "b"\n',
     "has no parameter 'density' .*alpha"),
    ('method = "weighted_sum"\ndtype = "fp8"\n[[inputs]]\npath = "a"\n[[inputs]]\npath = "b"\n',
     "unknown output dtype"),
    ('method = "weighted_sum"\nversion = 9\n[[inputs]]\npath = "a"\n[[inputs]]\npath = "b"\n', "version 9"),
    ('method = [\n', "invalid recipe file"),
])
def test_bad_recipe_files_name_the_file_and_the_problem(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(LineageError, match=message) as e:
        load_recipe(path)
    assert str(path) in str(e.value)


def test_a_list_parameter_cannot_vary_per_key():
    with pytest.raises(LineageError, match="parameter 'weights' of 'linear' cannot vary per key: only a number can"):
        Recipe("linear", (Input("a"), Input("b")), params={"weights": [1.0, 2.0]}, per_key={"weights": KeyWeights()})


# ---------------------------------------------------------------------------------------------
# Every value type-checked, with the field named (TOML files and records read back alike)

INPUTS = '[[inputs]]\npath = "a"\n[[inputs]]\npath = "b"\n'


@pytest.mark.parametrize("text, message", [
    ('method = "weighted_sum"\nseed = "7"\n' + INPUTS, "recipe field `seed` must be a whole number, got '7'"),
    ('method = "weighted_sum"\nseed = true\n' + INPUTS, "recipe field `seed` must be a whole number, got True"),
    ('method = 3\n' + INPUTS, "recipe field `method` must be a string, got 3"),
    ('method = "weighted_sum"\ndtype = 16\n' + INPUTS, "recipe field `dtype` must be a string, got 16"),
    ('method = "weighted_sum"\nprediction_type = 1\n' + INPUTS, "recipe field `prediction_type` must be a string"),
    ('method = "weighted_sum"\nparams = 3\n' + INPUTS, "recipe field `params` must be a table, got 3"),
    ('method = "weighted_sum"\n[params]\nalpha = "half"\n' + INPUTS,
     "merge method 'weighted_sum': parameter 'alpha' must be a number, got 'half'"),
    ('method = "weighted_sum"\n[params]\nalpha = nan\n' + INPUTS,
     "merge method 'weighted_sum': parameter 'alpha' must be a finite number, got nan"),
    ('method = "weighted_sum"\nper_key = 1\n' + INPUTS, "recipe field `per_key` must be a table of tables, got 1"),
    ('method = "weighted_sum"\n[per_key]\nalpha = 1\n' + INPUTS, "recipe field `per_key.alpha` must be a table"),
    ('method = "weighted_sum"\n[per_key.alpha]\npreset = "lineage"\nblocks = { IN04 = "x" }\n' + INPUTS,
     "recipe field `per_key.alpha.blocks.IN04` must be a number, got 'x'"),
    ('method = "weighted_sum"\n[per_key.alpha]\ncomponents = { vae = true }\n' + INPUTS,
     "recipe field `per_key.alpha.components.vae` must be a number, got True"),
    ('method = "weighted_sum"\n[per_key.alpha]\noverrides = "attn"\n' + INPUTS,
     "recipe field `per_key.alpha.overrides` must be a list"),
    ('method = "weighted_sum"\n[per_key.alpha]\noverrides = [{ pattern = 1, value = 0.5 }]\n' + INPUTS,
     "recipe field `per_key.alpha.overrides[0].pattern` must be a string, got 1"),
    ('method = "weighted_sum"\n[per_key.alpha]\noverrides = [{ pattern = "a", value = "b" }]\n' + INPUTS,
     "recipe field `per_key.alpha.overrides[0].value` must be a number, got 'b'"),
    ('method = "weighted_sum"\n[per_key.alpha]\noverrides = [{ pattern = "a" }]\n' + INPUTS,
     "recipe field `per_key.alpha.overrides[0]` must have exactly `pattern` and `value`"),
    ('method = "weighted_sum"\ninputs = "a"\n', "recipe field `inputs` must be a list"),
    ('method = "weighted_sum"\ninputs = [1, "b"]\n', "recipe field `inputs[0]` must be a path or a table with `path`"),
    ('method = "weighted_sum"\n[[inputs]]\npath = 1\n[[inputs]]\npath = "b"\n',
     "recipe field `inputs[0].path` must be a file path, got 1"),
    ('method = "weighted_sum"\n[[inputs]]\npath = "a"\nautov3 = 5\n[[inputs]]\npath = "b"\n',
     "recipe field `inputs[0].autov3` must be a hex string, got 5"),
    ('method = "weighted_sum"\n[[inputs]]\npath = "a"\nsize = 5\n[[inputs]]\npath = "b"\n',
     "unknown fields in recipe `inputs[0]`: size"),
])
def test_every_recipe_value_is_type_checked_with_the_field_named(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(LineageError) as e:
        load_recipe(path)
    assert message in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)


def test_a_record_read_back_from_a_files_metadata_is_checked_the_same_way(lmerge, tiny):
    record = {"method": "weighted_sum", "seed": "x", "inputs": [{"path": "a"}, {"path": "b"}]}
    merged = tiny("merged.safetensors", 1, metadata={"lineage.record": json.dumps(record)})
    code, _, stderr = lmerge("reproduce", merged)
    assert code == 1 and "recipe field `seed` must be a whole number, got 'x'" in stderr and stderr.count("\n") == 1
    record = {"method": "weighted_sum", "inputs": [{"path": "a"}, {"path": "b"}],
              "per_key": {"alpha": {"overrides": [{"pattern": "(a)\\1", "value": 0.5}]}}}
    merged = tiny("merged2.safetensors", 2, metadata={"lineage.record": json.dumps(record)})
    code, _, stderr = lmerge("reproduce", merged)
    assert code == 1 and "key override pattern '(a)\\\\1' is not valid RE2 syntax" in stderr
    assert stderr.count("\n") == 1


# ---------------------------------------------------------------------------------------------
# Override patterns cannot hang


def test_a_catastrophic_backtracking_pattern_against_a_long_key_finishes_fast():
    """`(a+)+$` against 'aaa…b' takes exponential time in a backtracking engine (Python's re would
    not finish); RE2 matches in linear time. Run in a child process so a regression fails the test
    (by its timeout) instead of hanging the suite."""
    script = ("import time; from lineage.merge.weights import KeyWeights\n"
              "w = KeyWeights(overrides=(('(a+)+$', 1.0), ('^(x+x+)+y', 2.0)))\n"
              "start = time.perf_counter()\n"
              "print(w.value_for('a' * 50_000 + 'b', 0.5), w.value_for('x' * 50_000, 0.5), w.value_for('aaa', 0.5))\n"
              "print(time.perf_counter() - start)\n")
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    values, seconds = result.stdout.splitlines()
    assert values == "0.5 0.5 1.0" and float(seconds) < 1.0 and time.perf_counter() - started < 60


def test_a_pattern_re2_cannot_compile_is_a_one_line_error_naming_the_override(tmp_path):
    for pattern in (r"(attn)\\1", r"(?!attn)"):  # a backreference, a lookahead
        path = tmp_path / "r.toml"
        path.write_text('method = "weighted_sum"\n[per_key.alpha]\n'
                        f'overrides = [{{ pattern = "{pattern}", value = 0.5 }}]\n' + INPUTS)
        with pytest.raises(LineageError) as e:
            load_recipe(path)
        message = str(e.value)
        assert "`per_key.alpha`" in message and "is not valid RE2 syntax" in message and "\n" not in message
        assert repr(pattern.replace("\\\\", "\\")) in message, message
