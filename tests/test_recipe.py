"""Recipes: validation, per-key parameters, the TOML file format and its round trip."""
import sys

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
        '[[inputs]]\npath = "a.safetensors"\n[[inputs]]\npath = "/abs/b.safetensors"\n[[inputs]]\npath = "c.safetensors"\n')
    r = load_recipe(tmp_path / "r.toml")
    assert [i.path for i in r.inputs] == [str(tmp_path / "a.safetensors"), "/abs/b.safetensors",
                                          str(tmp_path / "c.safetensors")]
    assert r.per_key["alpha"].blocks == {"out.": 0.75}  # a ComfyUI string: the weight of model 1
    assert r.params_for(VAE) is None  # ComfyUI's preset does not merge the VAE; only an override would
    assert r.params_for("model.diffusion_model.out.2.weight") == {"alpha": 0.75}


@pytest.mark.parametrize("text, message", [
    ('method = "weighted_sum"\n[[inputs]]\npath = "a"\n', "takes 2 models"),
    ('method = "nope"\n[[inputs]]\npath = "a"\n[[inputs]]\npath = "b"\n', "unknown merge method 'nope'"),
    ('method = "weighted_sum"\nbeta = 1\n[[inputs]]\npath = "a"\n[[inputs]]\npath = "b"\n', "unknown recipe fields beta"),
    ('method = "weighted_sum"\n[params]\ndensity = 0.2\n[[inputs]]\npath = "a"\n[[inputs]]\npath = "b"\n',
     "has no parameter 'density' .*alpha"),
    ('method = "weighted_sum"\ndtype = "fp8"\n[[inputs]]\npath = "a"\n[[inputs]]\npath = "b"\n', "unknown output dtype"),
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
    with pytest.raises(LineageError, match="not a number"):
        Recipe("linear", (Input("a"), Input("b")), params={"weights": [1.0, 2.0]}, per_key={"weights": KeyWeights()})
