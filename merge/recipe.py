"""A merge recipe: which method, on which inputs, with which parameters — and its file format.

The same recipe is written three ways: as Python (`Recipe(...)` or `lineage.merge(...)`), as a TOML
file (`lmerge merge --recipe FILE`), and as the JSON record every merged file carries under the
metadata key `lineage.record`. All three are the one dict of `Recipe.to_dict`:

    version = 1                      # recipe format version
    method = "weighted_sum"          # a name from `lmerge methods`
    seed = 0                         # random methods: each tensor's seed derives from this and its key
    dtype = "fp16"                   # output dtype of merged tensors: fp16 | bf16 | fp32
    mismatch = "error"               # keys missing from some inputs / shapes that disagree:
                                     #   error | first (take them from the first model) | drop
    prediction_type = "v+ztsnr"      # only when the parents' prediction types differ: the one to keep

    [params]                         # the method's keyword parameters (scalars, or lists such as weights)
    alpha = 0.3                      # weighted_sum: the weight of the second model (A1111's convention)

    [per_key.alpha]                  # optional: how `alpha` varies per key (merge/weights.py)
    preset = "supermerger"           # block preset: supermerger | supermerger-legacy | sd-mecha | comfyui | lineage
    blocks = "0,0.5,0.5,…"           # a block string in the preset's own convention, or a table in
                                     # the method's convention: { IN04 = 0.3, M00 = 1.0 }
    components = { vae = 0.0 }       # per component: unet | clip_l | clip_g | vae
    overrides = [ { pattern = "attn2\\.to_k", value = 0.1 } ]   # regex searched in the key; last match wins

    [[inputs]]                       # in the method's order (the base first for methods that need one)
    path = "a.safetensors"           # relative paths are relative to the recipe file
    autov3 = "1f0c…"                 # sha256 of the data section; filled in when the merge runs
    name = "a"

    [[adapters]]                     # optional: LoRA / LoCon / LoKr / LoHa / diff files added to the merged
    path = "style.safetensors"       #   result, each at its strength, in this order (what `lmerge apply`
    strength = 0.8                   #   would do to the merged file, without the second pass)
    autov3 = "9a3e…"                 # filled in when the merge runs, like the inputs'

TOML was chosen over JSON because people write recipes by hand (comments, less quoting); the
record inside a checkpoint is JSON because metadata values are strings.
"""
from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lineage.errors import LineageError
from lineage.io.atomic import atomic_write
from lineage.io.inputs import read_input

from .parameters import is_number
from .weights import KeyWeights

if TYPE_CHECKING:
    from .methods import MergeMethod

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

RECIPE_VERSION = 1
DTYPES: dict[str, str] = {"fp16": "F16", "bf16": "BF16", "fp32": "F32"}  # recipe name -> safetensors dtype
MISMATCH_POLICIES = ("error", "first", "drop")
ParamValue = float | int | bool | str | list[float]


@dataclass(frozen=True)
class Input:
    """One input model: where it is and, once hashed, its AutoV3 (sha256 of the data section)."""

    path: str
    autov3: str | None = None
    name: str = ""  # default: the file name without its extension

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", Path(self.path).stem)

    def to_dict(self) -> dict[str, str]:
        out = {"path": self.path, "name": self.name}
        if self.autov3:
            out["autov3"] = self.autov3
        return out


@dataclass(frozen=True)
class Adapter(Input):
    """An adapter file the merge adds to its result at `strength` (W + strength·ΔW per adapted key,
    as `lmerge apply` does), with its AutoV3 once hashed."""

    strength: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "strength": self.strength}


def _is_finite_number(value: Any) -> bool:
    return is_number(value) and math.isfinite(value)


@dataclass(frozen=True)
class Recipe:
    """Everything that determines a merge's tensor data (so the same recipe reproduces it bit for bit)."""

    method: str
    inputs: tuple[Input, ...]
    params: Mapping[str, ParamValue] = field(default_factory=dict)
    per_key: Mapping[str, KeyWeights] = field(default_factory=dict)  # param name -> its per-key variation
    seed: int = 0
    dtype: str = "fp16"
    mismatch: str = "error"
    prediction_type: str | None = None
    adapters: tuple[Adapter, ...] = ()  # applied to the merged result, in order

    def __post_init__(self) -> None:
        inputs = tuple(i if isinstance(i, Input) else Input(os.fspath(i)) for i in self.inputs)
        object.__setattr__(self, "inputs", inputs)
        object.__setattr__(self, "adapters", tuple(self.adapters))
        for n, adapter in enumerate(self.adapters):
            _expect(isinstance(adapter, Adapter), f"adapters[{n}]", "an Adapter", adapter)
            _expect(_is_finite_number(adapter.strength), f"adapters[{n}].strength", "a finite number", adapter.strength)
        for name in ("method", "dtype", "mismatch"):
            _expect(isinstance(getattr(self, name), str), name, "a string", getattr(self, name))
        _expect(self.prediction_type is None or isinstance(self.prediction_type, str), "prediction_type",
                "a string", self.prediction_type)
        _expect(_is_whole_number(self.seed), "seed", "a whole number", self.seed)
        if self.dtype not in DTYPES:
            raise LineageError(f"unknown output dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        if self.mismatch not in MISMATCH_POLICIES:
            raise LineageError(f"unknown mismatch policy {self.mismatch!r}; "
                               f"choose one of {', '.join(MISMATCH_POLICIES)}")
        self._check_params()

    def _check_params(self) -> None:
        """Every parameter value the recipe can give any key, checked against the method's types
        (one-line errors naming the parameter), and the rule between the scalar values."""
        method = self.merge_method
        count = len(self.inputs)
        method.check_model_count(count)
        method.check_names([*self.params, *self.per_key])
        for name, value in self.params.items():
            method.check_value(name, value, count)
        for name, variation in self.per_key.items():
            if not method.params[name].type.varies_per_key:
                raise LineageError(f"parameter {name!r} of {self.method!r} cannot vary per key: only a number "
                                   f"can, it is a {method.params[name].type.describe()}")
            for where, value in variation.values():
                method.check_value(name, value, count, f"per_key.{name} {where}")
        method.check_constraint({**method.defaults, **self.params})

    @property
    def merge_method(self) -> MergeMethod:
        from .methods import get_method  # torch is imported only once a recipe is used, not by the CLI's startup

        return get_method(self.method)

    @property
    def storage_dtype(self) -> str:
        """The safetensors dtype of merged tensors (F16, BF16 or F32)."""
        return DTYPES[self.dtype]

    def scalar(self, name: str) -> Any:
        return self.params.get(name, self.merge_method.defaults.get(name))

    def params_for(self, key: str) -> dict[str, Any] | None:
        """The method's keyword parameters for one tensor, or None when the key is not merged
        (a block preset leaves it to the first model)."""
        method = self.merge_method
        values = {**method.defaults, **self.params}
        for name, variation in self.per_key.items():
            value = variation.value_for(key, values[name])
            if value is None:
                return None
            values[name] = value
        if self.per_key:  # each value was checked; this key's combination of them is checked here
            method.check_constraint(values, f"key {key}")
        return values

    @property
    def files(self) -> tuple[Input, ...]:
        """Every file the merge reads: the inputs, then the adapters (the order of a run's inputs, of
        `with_hashes` and of `with_paths`)."""
        return (*self.inputs, *self.adapters)

    def with_hashes(self, autov3: Sequence[str | None]) -> Recipe:
        """The recipe with each file's AutoV3 (in the order of `files`)."""
        return self._with_each("autov3", autov3)

    def with_paths(self, paths: Sequence[str]) -> Recipe:
        """The recipe with each file's path (in the order of `files`)."""
        return self._with_each("path", paths)

    def _with_each(self, name: str, values: Sequence[Any]) -> Recipe:
        files = [replace(f, **{name: v}) for f, v in zip(self.files, values)] + list(self.files[len(values):])
        count = len(self.inputs)
        return replace(self, inputs=tuple(files[:count]), adapters=tuple(files[count:]))  # type: ignore[arg-type]

    # -- serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"version": RECIPE_VERSION, "method": self.method, "seed": self.seed,
                               "dtype": self.dtype, "mismatch": self.mismatch}
        if self.prediction_type:
            out["prediction_type"] = self.prediction_type
        out["params"] = dict(self.params)
        if self.per_key:
            out["per_key"] = {name: w.to_dict() for name, w in self.per_key.items()}
        out["inputs"] = [i.to_dict() for i in self.inputs]
        if self.adapters:
            out["adapters"] = [a.to_dict() for a in self.adapters]
        return out

    @classmethod
    def from_dict(cls, data: Any, base_dir: str | os.PathLike | None = None) -> Recipe:
        """Build a recipe from its dict form (a TOML file, or the JSON record read back from a merged
        file's metadata), every value type-checked; relative input paths are taken relative to `base_dir`."""
        _expect(isinstance(data, Mapping), "", "a table", data)
        version = data.get("version", RECIPE_VERSION)
        if version != RECIPE_VERSION:
            raise LineageError(f"recipe format version {version!r} is not supported "
                               f"(this library reads {RECIPE_VERSION})")
        # `library` and `weights` (each input's nominal weight) are what a merged file's record adds.
        known = {"version", "method", "seed", "dtype", "mismatch", "prediction_type", "params", "per_key", "inputs",
                 "adapters", "library", "weights"}
        unknown = set(data) - known
        if unknown:
            raise LineageError(f"unknown recipe fields {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
        if "method" not in data or not data.get("inputs"):
            raise LineageError("a recipe needs `method` and at least one [[inputs]] entry")
        _expect(isinstance(data.get("library", ""), str), "library", "a string", data.get("library"))
        _expect(isinstance(data.get("weights", []), list), "weights", "a list", data.get("weights"))
        params = data.get("params", {})
        _expect(isinstance(params, Mapping), "params", "a table", params)
        per_key = data.get("per_key", {})
        _expect(isinstance(per_key, Mapping), "per_key", "a table of tables", per_key)
        files: dict[str, list[dict[str, Any]]] = {}
        for table, fields in (("inputs", INPUT_FIELDS), ("adapters", ADAPTER_FIELDS)):
            entries = data.get(table, [])
            _expect(isinstance(entries, list), table, f"a list of [[{table}]] tables", entries)
            files[table] = []
            for i, entry in enumerate(entries):
                _check_input_entry(entry, f"{table}[{i}]", fields)
                found = dict(entry) if isinstance(entry, Mapping) else {"path": entry}
                if base_dir is not None and not os.path.isabs(found["path"]):
                    found["path"] = os.path.join(base_dir, found["path"])
                files[table].append(found)
        return cls(
            method=data["method"],
            inputs=tuple(Input(**entry) for entry in files["inputs"]),
            adapters=tuple(Adapter(**entry) for entry in files["adapters"]),
            params=dict(params),
            per_key={str(name): KeyWeights.from_dict(w, f"per_key.{name}") for name, w in per_key.items()},
            seed=data.get("seed", 0),
            dtype=data.get("dtype", "fp16"),
            mismatch=data.get("mismatch", "error"),
            prediction_type=data.get("prediction_type"),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, sort_keys=False)

    def to_toml(self) -> str:
        return to_toml(self.to_dict())

    def save(self, path: str | os.PathLike, inputs: Sequence[str | os.PathLike | None] = ()) -> None:
        """Write the recipe as TOML, its input and adapter paths relative to the recipe file's folder (as
        `load_recipe` reads them): a shared recipe carries no absolute local paths. Never onto one of
        `inputs` (nor this recipe's own files)."""
        folder = os.path.dirname(os.path.abspath(path))
        relative = self.with_paths([os.path.relpath(os.path.abspath(f.path), folder) for f in self.files])
        atomic_write(path, relative.to_toml(), inputs=[*inputs, *(f.path for f in self.files)])


def _is_whole_number(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _expect(ok: bool, field_name: str, kind: str, value: Any) -> None:
    """A one-line error naming the recipe field unless `ok`."""
    if not ok:
        where = f"recipe field `{field_name}`" if field_name else "a recipe"
        raise LineageError(f"{where} must be {kind}, got {value!r}")


INPUT_FIELDS = {"path": "a file path", "autov3": "a hex string", "name": "a string"}  # an [[inputs]] table's keys
ADAPTER_FIELDS = {**INPUT_FIELDS, "strength": "a finite number"}  # an [[adapters]] table's keys


def _check_input_entry(entry: Any, field_name: str, fields: Mapping[str, str] = INPUT_FIELDS) -> None:
    """An [[inputs]] or [[adapters]] entry: a path string, or a table of `fields` with at least `path`."""
    if isinstance(entry, str):
        return
    _expect(isinstance(entry, Mapping), field_name, "a path or a table with `path`", entry)
    unknown = set(entry) - set(fields)
    if unknown:
        raise LineageError(f"unknown fields in recipe `{field_name}`: {', '.join(sorted(map(str, unknown)))}; "
                           f"known: {', '.join(fields)}")
    _expect("path" in entry, f"{field_name}.path", "given", None)
    for key, kind in fields.items():
        value = entry.get(key)
        if value is None and key != "path":
            continue
        if key == "autov3":
            ok = isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdefABCDEF" for c in value)
        elif key == "strength":
            ok = _is_finite_number(value)
        else:
            ok = isinstance(value, str)
        _expect(ok, f"{field_name}.{key}", kind, value)


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read a TOML recipe file (a `.json` file holding the same dict is accepted too)."""
    path = os.fspath(path)
    try:
        text = read_input(path).decode("utf-8")  # a FIFO or device is refused, not waited on
        data = json.loads(text) if path.endswith(".json") else tomllib.loads(text)
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise LineageError(f"invalid recipe file ({e})", path) from None
    try:
        return Recipe.from_dict(data, base_dir=os.path.dirname(os.path.abspath(path)))
    except LineageError as e:
        raise LineageError(str(e), path) from None
    except (KeyError, TypeError, ValueError) as e:
        raise LineageError(f"malformed recipe ({type(e).__name__}: {e})", path) from None


# ---------------------------------------------------------------------------------------------
# A TOML writer for the recipe's dict: top-level scalars, tables of scalars, nested tables
# (per_key.alpha) and arrays of tables (inputs). Values: str, bool, int, float, lists, inline tables.


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isfinite(value):
            return repr(value)
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # JSON's string escapes are valid TOML basic strings
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise LineageError(f"cannot write {type(value).__name__} value {value!r} to a recipe")


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() and key.isascii() else json.dumps(key)


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, Mapping) for v in value)


def to_toml(data: Mapping[str, Any]) -> str:
    lines = []
    tables = []
    for key, value in data.items():
        if isinstance(value, Mapping) or _is_table_array(value):
            tables.append((key, value))
        else:
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    for key, value in tables:
        if isinstance(value, list):
            for entry in value:
                lines += ["", f"[[{_toml_key(key)}]]",
                          *(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in entry.items())]
        elif all(isinstance(v, Mapping) for v in value.values()) and value:
            for sub, entry in value.items():
                lines += ["", f"[{_toml_key(key)}.{_toml_key(sub)}]",
                          *(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in entry.items())]
        else:
            lines += ["", f"[{_toml_key(key)}]", *(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items())]
    return "\n".join(lines) + "\n"
