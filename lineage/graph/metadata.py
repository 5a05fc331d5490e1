"""Lineage in safetensors metadata (docs/metadata.md): read from what other tools leave, and written so they see ours.

Read into plain dicts (`lineage_from_metadata`):
- ModelSpec (`modelspec.*`), including `merged_from` and `prediction_type`;
- A1111 / supermerger: `sd_merge_recipe` and `sd_merge_models` (the parents' flattened ancestry);
- sd-mecha: `mecha_recipe` (text);
- kohya LoRA training: `ss_*` and `sshs_*` keys (which base the adapter was trained on);
- our own full record under `lineage.record`.
Metadata written by hand is often broken: a value that should be JSON and is not is reported as
such, never raised. Metadata is also bounded (docs/metadata.md): a key whose value is of the wrong
type, too deep, too long, or holds a number out of range is skipped with a warning that names the file
and the key; a merge naming more than `MAX_PARENTS` models or an ancestry of more than `MAX_ANCESTRY`
entries is read up to that many, so no file can make the registry grow without bound.

Written by the same conventions (`modelspec_metadata`, `a1111_merge_metadata`), so what we write
reads back through the functions above. Names only, never local paths: a file's metadata is published
with it.
"""
from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from lineage.graph.model import RELATIONS
from lineage.io import strict_json

log = logging.getLogger(__name__)

LINEAGE_RECORD_KEY = "lineage.record"
KOHYA_KEYS = (
    "ss_base_model_version", "ss_sd_model_name", "ss_sd_model_hash", "ss_new_sd_model_hash",
    "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args", "ss_output_name",
    "ss_training_comment", "ss_v2", "ss_v_parameterization", "ss_zero_terminal_snr",
    "ss_num_train_images", "ss_dataset_dirs", "ss_training_started_at", "sshs_model_hash", "sshs_legacy_hash",
)
MODELSPEC_VERSION = "1.0.0"
# Our prediction types -> ModelSpec's `prediction_type` values (ModelSpec knows only these two).
MODELSPEC_PREDICTION: dict[str, str] = {"epsilon": "epsilon", "epsilon+ztsnr": "epsilon", "v": "v",
                                        "v+ztsnr": "v", "edm-v": "v"}
A1111_HASH_ROLES = ("primary_model_hash", "secondary_model_hash", "tertiary_model_hash")

# Bounds on what other tools' metadata may hold; past them a key is skipped (or a list cut) with a warning.
MAX_TEXT = 65_536      # characters in one metadata value (or one text inside a JSON value)
MAX_JSON = 16 * 2**20  # characters in one value holding a list (JSON, or merged_from's names) before it is cut
MAX_NAME = 4_096       # characters in one model name, hash or path (PATH_MAX on Linux)
MAX_DEPTH = 16         # nesting of a JSON value (our own records nest 4 deep)
MAX_NUMBER = 1e15      # magnitude of any number (weights, multipliers, counts)
MAX_PARENTS = 256      # models one merge names (merged_from, our record's inputs)
MAX_ANCESTRY = 1_000  # entries of A1111's flattened ancestry (sd_merge_models) read (2.6 KB of registry each)
# Keys whose text is a model name (ModelSpec's title, the file name kohya trained on).
_NAME_KEYS = ("modelspec.title", "ss_sd_model_name", "ss_output_name")
_NUMBER = (int, float)
# Fields the readers of lineage use, inside the JSON objects other tools write, and the types they must have.
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "name": (str,), "path": (str,), "autov3": (str,), "relation": (str,), "method": (str,),
    "interp_method": (str,), "merge_method": (str,), "merge_mode": (str,), "hash_kind": (str,),
    "primary_model_hash": (str,), "secondary_model_hash": (str,), "tertiary_model_hash": (str,),
    "multiplier": _NUMBER, "alpha": _NUMBER, "weights": (list,), "inputs": (list,), "sd_merge_recipe": (dict,),
}
_TYPE_NAMES = {str: "text", int: "a number", float: "a number", list: "a list", dict: "an object"}
# A quoted string or a run without spaces in sd-mecha's recipe text (where its model paths sit).
_MECHA_TOKEN = re.compile(r'"[^"]*"|\S+')


def _bound_problem(value: Any, depth: int = 0) -> str | None:
    """What puts a parsed JSON value out of bounds (too deep, too long, a number too large), or None."""
    if depth > MAX_DEPTH:
        return f"nested deeper than {MAX_DEPTH} levels"
    if isinstance(value, str):
        return f"holds text of {len(value):,} characters (at most {MAX_TEXT:,})" if len(value) > MAX_TEXT else None
    if isinstance(value, _NUMBER) and not isinstance(value, bool):
        return None if math.isfinite(value) and abs(value) <= MAX_NUMBER else f"holds the number {value:.3g}, " \
                                                                             f"out of range (at most {MAX_NUMBER:g})"
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        problem = _bound_problem(key, depth + 1) or _bound_problem(item, depth + 1)
        if problem:
            return problem
    return None


def _type_problem(value: Any, field: str) -> str | None:
    """Why `value` cannot be the `field` of an object the lineage readers use (see `_FIELD_TYPES`), or None."""
    expected = _FIELD_TYPES.get(field)
    if expected is None or value is None:
        return None
    if not isinstance(value, expected) or isinstance(value, bool):
        return f"field {field!r} is {_TYPE_NAMES.get(type(value), type(value).__name__)}, expected " \
               f"{_TYPE_NAMES[expected[0]]}"
    if isinstance(value, str) and len(value) > MAX_NAME:
        return f"field {field!r} is {len(value):,} characters long (at most {MAX_NAME:,})"
    if field == "relation" and value not in RELATIONS:
        return f"field 'relation' is {value!r}, not one of {', '.join(RELATIONS)}"
    return None


class _Reader:
    """Reads one file's metadata, skipping what is out of bounds with a warning naming the file and the key."""

    def __init__(self, metadata: Mapping[str, str], where: str):
        self.metadata, self.where = metadata, where

    def skip(self, key: str, problem: str) -> None:
        log.warning("warning: %s: metadata key %r skipped: %s", self.where, key, problem)

    def skip_part(self, key: str, problem: str) -> None:
        log.warning("warning: %s: metadata key %r: %s", self.where, key, problem)

    def text(self, key: str, limit: int = MAX_TEXT) -> str | None:
        value = self.metadata.get(key)
        if value is None:
            return None
        limit = MAX_NAME if key in _NAME_KEYS else limit
        if not isinstance(value, str) or len(value) > limit:
            self.skip(key, f"not text of at most {limit:,} characters")
            return None
        return value

    def json(self, key: str) -> Any:
        """A JSON object from `key`: unparsable text is kept as `unparsed` (so `inspect` shows it); an object
        out of bounds, or of another type, is skipped; so is each of its fields of the wrong type."""
        text = self.text(key, MAX_JSON)
        if text is None:
            return None
        value = _json(text)
        if isinstance(value, dict) and "unparsed" in value:
            self.skip(key, value["error"])
            return value  # kept as text, so that `inspect` shows what is there
        problem = _bound_problem(value) or (None if isinstance(value, dict) else "not a JSON object")
        if problem:
            self.skip(key, problem)
            return None
        return self.fields(key, value)

    def fields(self, key: str, obj: dict[str, Any]) -> dict[str, Any]:
        """`obj` without the fields of a wrong type (the lists of our record's inputs checked item by item)."""
        kept = {}
        for field, value in obj.items():
            problem = _type_problem(value, field)
            if problem:
                self.skip_part(key, f"{problem}; that field was skipped")
                continue
            if field == "inputs":
                value = [self.fields(key, item) for item in value[:MAX_PARENTS] if isinstance(item, dict)]
                if len(obj["inputs"]) > MAX_PARENTS:
                    self.skip_part(key, f"names {len(obj['inputs']):,} inputs; the first {MAX_PARENTS} were read")
            kept[field] = self.fields(key, value) if field == "sd_merge_recipe" and value else value
        return kept

    def ancestry(self, key: str) -> dict[str, Any] | None:
        """A1111's {hash: {name, sd_merge_recipe}}: at most `MAX_ANCESTRY` entries, each checked."""
        models = self.json(key)
        if not isinstance(models, dict) or "unparsed" in models:
            return models
        if len(models) > MAX_ANCESTRY:
            self.skip_part(key, f"an ancestry of {len(models):,} entries; the first {MAX_ANCESTRY:,} were read")
        entries = list(models.items())[:MAX_ANCESTRY]
        return {h: self.fields(key, entry) if isinstance(entry, dict) else entry for h, entry in entries
                if len(h) <= MAX_NAME}

    def names(self, key: str) -> list[str]:
        """A comma-separated list of model names (ModelSpec's merged_from), at most `MAX_PARENTS` of them."""
        names = [s.strip() for s in (self.text(key, MAX_JSON) or "").split(",") if s.strip()]
        long = [n for n in names if len(n) > MAX_NAME]
        if long:
            self.skip_part(key, f"{len(long)} name(s) longer than {MAX_NAME:,} characters were skipped")
            names = [n for n in names if len(n) <= MAX_NAME]
        if len(names) > MAX_PARENTS:
            self.skip_part(key, f"names {len(names):,} models; the first {MAX_PARENTS} were read")
        return names[:MAX_PARENTS]

    def mecha_recipe(self, key: str) -> str | None:
        text = self.text(key)
        if text is not None and any(len(t) > MAX_NAME for t in _MECHA_TOKEN.findall(text)):
            self.skip(key, f"names a model path longer than {MAX_NAME:,} characters")
            return None
        return text


def _json(value: str) -> Any:
    """A JSON value from metadata, parsed strictly: NaN, infinities, overflowing numbers, duplicate keys
    and lone surrogates make it unparsed, so they never reach the registry or our JSON output."""
    try:
        return strict_json.loads(value)
    except strict_json.JSONError as e:
        return {"unparsed": value, "error": f"not valid JSON ({e})"}


def lineage_from_metadata(metadata: Mapping[str, str], where: str = "<metadata>") -> dict[str, Any]:
    """Everything in `metadata` that says where a model came from, keyed by the tool that wrote it;
    `where` (the file) names it in the warnings for what is skipped."""
    read = _Reader(metadata, where)
    found: dict[str, Any] = {}
    modelspec = {k.removeprefix("modelspec."): v for k in metadata if k.startswith("modelspec.")
                 and k != "modelspec.merged_from" and (v := read.text(k)) is not None}
    if "modelspec.merged_from" in metadata:
        modelspec["merged_from"] = read.names("modelspec.merged_from")
    if modelspec:
        found["modelspec"] = modelspec
    a1111 = {}
    if "sd_merge_recipe" in metadata and (recipe := read.json("sd_merge_recipe")) is not None:
        a1111["sd_merge_recipe"] = recipe
    if "sd_merge_models" in metadata and (models := read.ancestry("sd_merge_models")) is not None:
        a1111["sd_merge_models"] = models
    if a1111:
        found["a1111"] = a1111
    if "mecha_recipe" in metadata and (recipe := read.mecha_recipe("mecha_recipe")) is not None:
        found["sd_mecha"] = {"recipe": recipe}
    kohya = {k: v for k in KOHYA_KEYS if k in metadata and (v := read.text(k)) is not None}
    if "ss_network_args" in kohya:
        network_args = read.json("ss_network_args")
        if network_args is None:
            del kohya["ss_network_args"]
        else:
            kohya["ss_network_args"] = network_args
    if kohya:
        found["kohya"] = kohya
    if LINEAGE_RECORD_KEY in metadata and (record := read.json(LINEAGE_RECORD_KEY)) is not None:
        found["lineage"] = record
    return found


# ---------------------------------------------------------------------------------------------
# Writing


def modelspec_metadata(*, architecture: str, implementation: str, title: str, resolution: str, date: str,
                       prediction_type: str | None = None, merged_from: Sequence[str] = (),
                       autov3: str | None = None, description: str | None = None) -> dict[str, str]:
    """ModelSpec 1.0.0 keys: the required ones, and those of the optional ones given. `merged_from`
    names the sources (comma-separated, as read back above); `autov3` is written as `hash_sha256`
    ("0x" + hex: ModelSpec and kohya define it as the sha256 of the data section, our AutoV3)."""
    metadata = {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": architecture,
        "modelspec.implementation": implementation,
        "modelspec.title": title,
        "modelspec.resolution": resolution,
        "modelspec.date": date,
    }
    if merged_from:
        metadata["modelspec.merged_from"] = ", ".join(merged_from)
    if autov3:
        metadata["modelspec.hash_sha256"] = "0x" + autov3
    if description:
        metadata["modelspec.description"] = description
    if prediction_type in MODELSPEC_PREDICTION:
        metadata["modelspec.prediction_type"] = MODELSPEC_PREDICTION[prediction_type]
    return metadata


def a1111_merge_metadata(*, interp_method: str, inputs: Sequence[tuple[str, str | None, str | None]],
                         multiplier: float | None, save_as_half: bool, name: str,
                         input_metadata: Sequence[Mapping[str, str]],
                         per_key: Mapping[str, Any] | None = None) -> dict[str, str]:
    """A1111 / supermerger's keys for a merge of `inputs` ((file name, whole-file sha256, AutoV1), in
    order; a hash not known yet is None), keyed as A1111's own merger keys them:
    `sd_merge_recipe` (what the merge did; the first three inputs' sha256 in A1111's roles) and
    `sd_merge_models` ({sha256: {name, legacy_hash (the AutoV1), sd_merge_recipe}} for every input, with
    each input's own `sd_merge_models` folded in: the flattened ancestry; an input without a hash yet
    is keyed by its name).
    A merge whose parameters vary per key (block weights) has no single `multiplier`: it writes
    `block_weights` ({parameter: its per-key table}) and the caller passes `multiplier=None`."""
    recipe: dict[str, Any] = {"type": "lineage", "interp_method": interp_method}
    for role, (_, sha256, _) in zip(A1111_HASH_ROLES, inputs):
        recipe[role] = sha256
    if multiplier is not None:
        recipe["multiplier"] = multiplier
    if per_key:
        recipe["block_weights"] = dict(per_key)
    recipe.update(save_as_half=save_as_half, custom_name=name)
    models: dict[str, Any] = {}
    for (input_name, sha256, autov1), metadata in zip(inputs, input_metadata):
        found = lineage_from_metadata(metadata).get("a1111", {})
        ancestry = found.get("sd_merge_models")
        if isinstance(ancestry, dict) and "unparsed" not in ancestry:
            models.update(ancestry)
        models[sha256 or input_name] = {"name": input_name, "legacy_hash": autov1,
                                        "sd_merge_recipe": found.get("sd_merge_recipe")}
    return {"sd_merge_recipe": json.dumps(recipe, ensure_ascii=False),
            "sd_merge_models": json.dumps(models, ensure_ascii=False)}
