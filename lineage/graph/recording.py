"""Recording files in the registry: `record` (explicit parents), `scan` (parents from metadata).
(`link`, a file that IS a known model, is in editing.py.)

A file's node id is its AutoV3 (the hash of the tensor data, which metadata edits do not change),
with a `+v` / `+v+ztsnr` / ... suffix when root marker tensors make it a v-prediction model.
Files are hashed once: the registry remembers path, size and mtime, and an unchanged file is not
read again. Hashing happens before the registry transaction, so a slow 7 GB file never holds the
write lock.

What other tools leave in a file's metadata (read by `metadata.lineage_from_metadata`) becomes
edges, from the first source that names parents, in this order: our own `lineage.record`, A1111 /
supermerger `sd_merge_recipe` + `sd_merge_models` (which also give the merge steps further up),
sd-mecha `mecha_recipe`, ModelSpec `merged_from`, kohya `ss_new_sd_model_hash` / `ss_sd_model_hash`.
A parent named only by a hash or a name becomes a placeholder node until its file is recorded.
"""
from __future__ import annotations

import json
import math
import os
import re
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx

from lineage.errors import LineageError
from lineage.graph.editing import ALIAS
from lineage.graph.metadata import lineage_from_metadata
from lineage.graph.model import ADAPTER_KINDS, check_relation, is_placeholder, reference_id
from lineage.graph.naming import A1111_TITLE, best_match, nodes_with_hash
from lineage.graph.recognition import Recognition, recognise
from lineage.graph.registry import Batch, Registry, using_registry
from lineage.io.hashing import AUTOV1_RANGE, FileHashes, hash_file
from lineage.io.inputs import check_input
from lineage.io.safetensors import SafetensorsFile
from lineage.sdxl.detection import Detection, detect_file

# Detected format -> node kind.
KIND_OF_FORMAT: dict[str, str] = {
    "sdxl-single-file": "checkpoint", "sdxl-refiner": "checkpoint", "sd1": "checkpoint", "sd2": "checkpoint",
    "lora-kohya": "lora", "lora-peft": "lora", "locon": "locon", "lokr": "lokr", "loha": "loha", "diff": "diff",
}

# ModelSpec key -> node attribute.
MODELSPEC_ATTRIBUTES: dict[str, str] = {
    "author": "maker", "date": "date", "license": "license", "resolution": "resolution", "description": "notes",
}

# kohya training keys kept on the base -> adapter edge.
KOHYA_PARAMS = ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args",
                "ss_base_model_version", "ss_num_train_images", "ss_training_comment", "ss_training_started_at")

# A1111 merge modes: interp_method -> (relation, weight of each parent given the multiplier M).
# Weighted sum: A*(1-M) + B*M.  Add difference: A + (B-C)*M.  No interpolation copies A (e.g. to bake a VAE).
A1111_METHODS: dict[str, tuple[str, Callable[[float], list[float]] | None]] = {
    "Weighted sum": ("merge", lambda m: [1 - m, m]),
    "Add difference": ("merge", lambda m: [1.0, m, -m]),
    "No interpolation": ("convert", lambda m: [1.0]),
}

# Metadata that names parents; each edge it gives carries this as its `source`.
METADATA_SOURCES = ("lineage", "a1111", "sd_mecha", "modelspec", "kohya")

_HEX = re.compile(r"[0-9a-f]+")
# Hash kinds by their length in hex digits, for hashes other tools write without saying which.
_HASH_KIND_BY_LENGTH = {64: "sha256", 10: "autov2", 8: "autov1"}


@dataclass(frozen=True)
class ParentRef:
    """A model as metadata names it: by `kind` "autov3" / "sha256" / "autov2" / "autov1" (a hash),
    "path" (a file, maybe missing) or "name"."""

    kind: str
    value: str
    name: str | None = None


@dataclass
class Origin:
    """What metadata says a model was made from. `child` is None for the file itself (A1111's
    flattened ancestry also describes the merges its parents came from)."""

    relation: str
    parents: list[ParentRef]
    weights: list[float | None]
    params: dict[str, Any]
    source: str
    child: ParentRef | None = None


@dataclass
class FileFacts:
    """Everything known about a file before touching the registry."""

    path: str
    hashes: FileHashes
    stat: os.stat_result
    attrs: dict[str, Any]
    origins: list[Origin]

    @property
    def node_id(self) -> str:
        """The AutoV3; `<AutoV3>+<type>` when root marker tensors make it a v-prediction (or EDM) model:
        markers are empty tensors, so the same tensor bytes with and without them are different models."""
        marked = self.attrs.get("prediction_type") if self.attrs.get("prediction_source") == "markers" else None
        autov3: str = self.hashes.autov3  # type: ignore[assignment]  # describe() guarantees safetensors
        return autov3 if marked in (None, "epsilon") else f"{autov3}+{marked}"


@dataclass
class ScanResult:
    recorded: list[tuple[str, str]] = field(default_factory=list)  # (path, node id)
    edges: int = 0  # edges read from metadata
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, problem)
    recognised: list[Recognition] = field(default_factory=list)  # files taken as (or like) catalog models


# ---------------------------------------------------------------------------------------------
# What a file says about itself


def describe(path: str | os.PathLike, registry: Registry | None = None, hashes: FileHashes | None = None) -> FileFacts:
    """Hashes, detected attributes and metadata lineage of a safetensors file (its header only,
    plus one hashing pass unless `hashes` is given or the registry has seen the unchanged file)."""
    path = os.fspath(path)
    with SafetensorsFile(path) as f:
        detection = detect_file(f)
        metadata = f.metadata
    stat = os.stat(path)
    if hashes is None and registry is not None:
        known = registry.known_file(path)
        if known:
            stored = known[1]
            hashes = FileHashes(path, stored.get("sha256"), stored.get("autov1"), stored.get("autov2"),
                                stored.get("autov3"), stored.get("crc32"))
    if hashes is None:
        hashes = hash_file(path)
    if not hashes.autov3:
        raise LineageError("has no safetensors data section, so no AutoV3 to identify it", path)
    found = lineage_from_metadata(metadata, path)  # bounded: what is out of bounds is skipped with a warning
    attrs = file_attributes(path, detection, found, hashes, stat)
    return FileFacts(path, hashes, stat, attrs, origins_from_metadata(found, attrs["kind"]))


def file_attributes(path: str, detection: Detection, found: dict[str, Any], hashes: FileHashes,
                    stat: os.stat_result) -> dict[str, Any]:
    """Node attributes detected from the file and its metadata (`found`, as `lineage_from_metadata` reads
    it): name, kind, architecture, prediction type, hashes, ..."""
    modelspec = found.get("modelspec", {})
    attrs: dict[str, Any] = {
        "name": modelspec.get("title") or found.get("kohya", {}).get("ss_output_name") or Path(path).stem,
        "kind": KIND_OF_FORMAT.get(detection.format, detection.format),
        "format": detection.format,
        "architecture": detection.architecture,
        "prediction_type": detection.prediction_type,
        "prediction_source": detection.prediction_source,
        "size": stat.st_size,
        "hashes": {k: v for k, v in hashes.to_dict().items() if k != "path" and v},
    }
    if stat.st_size <= AUTOV1_RANGE[0]:  # AutoV1 of a file this short hashes no bytes: it would match any other
        attrs["hashes"].pop("autov1", None)
    for key, attr in MODELSPEC_ATTRIBUTES.items():
        if modelspec.get(key):
            attrs[attr] = modelspec[key]
    return {k: v for k, v in attrs.items() if v is not None}


def _hash_ref(value: object, name: str | None = None, full_kind: str = "sha256") -> ParentRef | None:
    """A reference by a hash whose kind is told by its length (A1111, kohya and ModelSpec conventions);
    `full_kind` says what a full 64-digit hash is when the writer said so."""
    if not isinstance(value, str):
        return None
    digits = value.lower()
    if digits.startswith("0x") and len(digits) == 66:  # ModelSpec writes the AutoV3 as 0x + hex
        return ParentRef("autov3", digits[2:], name) if _HEX.fullmatch(digits[2:]) else None
    kind = full_kind if len(digits) == 64 else _HASH_KIND_BY_LENGTH.get(len(digits))
    return ParentRef(kind, digits, name) if kind and _HEX.fullmatch(digits) else None


def _named_ref(text: str) -> ParentRef:
    """A reference by hash if `text` is one, else by path (when it looks like one) or name."""
    text = text.strip()
    by_hash = _hash_ref(text)
    if by_hash:
        return by_hash
    if A1111_TITLE.fullmatch(text):  # `name [hash]`: matched by its hash first (naming.py), not a path
        return ParentRef("name", text, text)
    if text.endswith((".safetensors", ".ckpt")) or os.sep in text or "/" in text:
        return ParentRef("path", text, Path(text).stem)
    return ParentRef("name", text, text)


def _weights(values: object, count: int) -> list[float | None]:
    if isinstance(values, list) and len(values) == count:
        return [float(w) if isinstance(w, (int, float)) and not isinstance(w, bool) else None for w in values]
    return [None] * count


def _from_own_record(record: Any, kind: str) -> list[Origin]:
    if not isinstance(record, dict) or not isinstance(record.get("inputs"), list):
        return []
    parents = []
    adapters = record["adapters"] if isinstance(record.get("adapters"), list) else []
    for item in [*record["inputs"], *adapters]:  # a merge's adapters are parents too, weighted by strength
        if not isinstance(item, dict):
            continue
        name = item.get("name") or (Path(item["path"]).stem if isinstance(item.get("path"), str) else None)
        by_hash = _hash_ref(item.get("autov3"), name)
        if by_hash and len(by_hash.value) == 64:
            parents.append(ParentRef("autov3", by_hash.value, name))
        elif isinstance(item.get("path"), str):
            parents.append(ParentRef("path", item["path"], name))
    if not parents:
        return []
    relation = record.get("relation") or ("merge" if len(parents) > 1 or record.get("method") else "finetune")
    weights = _weights(record.get("weights"), len(parents))
    on_edges = ("inputs", "relation", "weights") if None not in weights else ("inputs", "relation")
    params = {k: v for k, v in record.items() if k not in on_edges}
    return [Origin(relation, parents, weights, params, "lineage")]


def _a1111_hash_kind(recipe: Any) -> str:
    """What A1111's 64-digit hashes are: the whole-file sha256, unless the writer says AutoV3 (our merges)."""
    return "autov3" if isinstance(recipe, dict) and recipe.get("hash_kind") == "autov3" else "sha256"


def _a1111_origin(recipe: dict[str, Any], models: dict[str, Any], child: ParentRef | None) -> Origin | None:
    parents = []
    for key in ("primary_model_hash", "secondary_model_hash", "tertiary_model_hash"):
        value = recipe.get(key)
        entry = models.get(value) if isinstance(value, str) else None
        ref = _hash_ref(recipe.get(key), entry.get("name") if isinstance(entry, dict) else None,
                        _a1111_hash_kind(recipe))
        if ref:
            parents.append(ref)
    if not parents:
        return None
    method = recipe.get("interp_method") or recipe.get("merge_method") or recipe.get("merge_mode")
    relation, weights_of = A1111_METHODS.get(method, ("merge", None)) if isinstance(method, str) else ("merge", None)
    multiplier = recipe.get("multiplier", recipe.get("alpha"))
    weights = weights_of(float(multiplier)) if weights_of is not None and isinstance(multiplier, (int, float)) else None
    return Origin(relation, parents, _weights(weights, len(parents)), {"method": method, "recipe": recipe},
                  "a1111", child)


def _from_a1111(found: dict[str, Any], kind: str) -> list[Origin]:
    recipe = found.get("sd_merge_recipe")
    models = found.get("sd_merge_models")
    models = models if isinstance(models, dict) else {}
    origins = [_a1111_origin(recipe, models, None)] if isinstance(recipe, dict) else []
    for model_hash, entry in models.items():  # the flattened ancestry: how each parent was merged
        if isinstance(entry, dict) and isinstance(entry.get("sd_merge_recipe"), dict):
            child = _hash_ref(model_hash, entry.get("name"), _a1111_hash_kind(recipe))
            if child:
                origins.append(_a1111_origin(entry["sd_merge_recipe"], models, child))
    return [o for o in origins if o is not None]


def _from_mecha(found: dict[str, Any], kind: str) -> list[Origin]:
    """sd-mecha's text recipe: `model "path" ...` lines name the inputs, `merge`/`call` lines the methods."""
    text = found.get("recipe", "")
    parents, methods = [], []
    for line in text.splitlines():
        try:
            tokens = shlex.split(line)
        except ValueError:
            continue
        if len(tokens) >= 2 and tokens[0] == "model":
            parents.append(_named_ref(tokens[1]))
        elif len(tokens) >= 2 and tokens[0] in ("merge", "call"):
            methods.append(tokens[1])
    if not parents:
        return []
    relation = "merge" if len(parents) > 1 else "convert"
    params = {"method": methods[-1] if methods else None, "recipe": text}
    return [Origin(relation, parents, [None] * len(parents), params, "sd_mecha")]


def _from_modelspec(found: dict[str, Any], kind: str) -> list[Origin]:
    sources = [s for s in found.get("merged_from", []) if s]
    if not sources:
        return []
    parents = [_named_ref(s) for s in sources]  # the names stay on the parents, not repeated on every edge
    return [Origin("merge", parents, [None] * len(parents), {}, "modelspec")]


def _from_kohya(found: dict[str, Any], kind: str) -> list[Origin]:
    base_name = Path(found["ss_sd_model_name"]).stem if found.get("ss_sd_model_name") else None
    # ss_new_sd_model_hash: sha256 of the base file; ss_sd_model_hash: its legacy AutoV1.
    base = _hash_ref(found.get("ss_new_sd_model_hash"), base_name) or _hash_ref(found.get("ss_sd_model_hash"),
                                                                                 base_name)
    if base is None and base_name:  # no hash (other trainers, edited metadata): the base's file name alone
        base = ParentRef("name", base_name, base_name)
    if base is None:
        return []
    relation = "adapter" if kind in ADAPTER_KINDS else "trained"
    params = {k: found[k] for k in KOHYA_PARAMS if k in found}
    return [Origin(relation, [base], [None], params, "kohya")]


# Readers in priority order: the first that names parents wins (several tools write overlapping keys).
_ORIGIN_READERS: tuple[tuple[str, Callable[[Any, str], list[Origin]]], ...] = (
    ("lineage", _from_own_record), ("a1111", _from_a1111), ("sd_mecha", _from_mecha),
    ("modelspec", _from_modelspec), ("kohya", _from_kohya),
)


def origins_from_metadata(found: dict[str, Any], kind: str) -> list[Origin]:
    """The parents that metadata (as parsed by `lineage_from_metadata`) names, from its best source."""
    for key, reader in _ORIGIN_READERS:
        if key in found:
            origins = reader(found[key], kind)
            if origins:
                return origins
    return []


# ---------------------------------------------------------------------------------------------
# Writing to the registry


def _put_file(b: Batch, facts: FileFacts, attrs: dict[str, Any] | None, source: str) -> str:
    """The file's node (detected attributes fill gaps, `attrs` win) and where it was seen."""
    node_id = facts.node_id
    stored = b.node_attrs(node_id)
    if stored is None or "format" not in stored:  # new, or so far only named in some metadata
        b.put_node(node_id, {**facts.attrs, "source": source, **(attrs or {})})
    else:
        b.put_node(node_id, attrs or {}, defaults=facts.attrs)
    b.put_path(node_id, facts.path, facts.stat)
    b.absorb_placeholders(node_id, facts.attrs["hashes"])
    return node_id


def _is_file(spec: str | os.PathLike) -> bool:
    return os.path.isfile(os.fspath(spec))


def record(path: str | os.PathLike, *, parents: Sequence[str | os.PathLike] = (), relation: str = "finetune",
           weights: Sequence[float] | None = None, params: dict[str, Any] | None = None,
           attrs: dict[str, Any] | None = None, registry: str | os.PathLike | Registry | None = None,
           hashes: FileHashes | None = None, parent_hashes: Sequence[FileHashes] | None = None) -> str:
    """Register a file as a node (id = its AutoV3 hex, computed unless `hashes` is given) and edges
    from each parent (a parent is a file path, registered on the fly by hash, `parent_hashes[i]` when
    the caller has it, or an existing node id, catalog id, hash prefix or name). `weights[i]` is the
    weight of parents[i] on the edge (merges); `params` (method, recipe, trainer config ...) is
    stored on each edge; `attrs` on the node (kind, prediction_type, name, ...; detected from the
    file when absent).
    Idempotent: recording the same file/edges again changes nothing. Returns the node id."""
    check_relation(relation)
    if weights is not None and len(weights) != len(parents):
        raise LineageError(f"{len(weights)} weights for {len(parents)} parents; give one weight per parent")
    for weight in weights or ():
        if not math.isfinite(weight):
            raise LineageError(f"weight {weight} is not a finite number (a parent's weight in a merge must be finite)")
    with using_registry(registry) as reg:
        facts = describe(path, reg, hashes)
        parent_files = {i: describe(p, reg, parent_hashes[i] if parent_hashes else None)  # hashed outside the lock
                        for i, p in enumerate(parents) if _is_file(p)}
        with reg.batch() as b:
            node_id = _put_file(b, facts, attrs, "user")
            for i, spec in enumerate(parents):
                if i in parent_files:
                    parent_id = _put_file(b, parent_files[i], None, "user")
                else:
                    parent_id = reg.resolve(os.fspath(spec))
                given = {"weight": None if weights is None else float(weights[i]), "params": params or None}
                b.put_edge(parent_id, node_id, relation, **_restated(b.edge_attrs(parent_id, node_id), relation, given))
        return node_id


def _restated(earlier: dict[str, Any] | None, relation: str, given: dict[str, Any]) -> dict[str, Any]:
    """The attributes of an edge the user states (again): what they give over what was recorded. An edge
    of the same relation keeps what they leave out (a merge's method, its weights when none are given)
    and, when nothing changes, where it was read from; a new or re-typed edge is the user's alone."""
    if earlier is None or earlier.get("relation") != relation:
        return {**given, "source": "user"}
    kept = {k: v for k, v in earlier.items() if k != "relation"}
    stated = {k: v for k, v in given.items() if v is not None}
    if all(kept.get(k) == v for k, v in stated.items()):
        return kept
    kept.pop("via", None)  # which file's metadata told us: the user tells us now
    return {**kept, **stated, "source": "user"}


def record_written(output: str, autov3: str, parents: Sequence[str], parent_autov3: Sequence[str], relation: str,
                   params: dict[str, Any], registry: str | os.PathLike | Registry | None,
                   weights: Sequence[float] | None = None) -> tuple[str | None, str | None]:
    """Register the file `output` a command just wrote, with an edge from each parent, by the AutoV3s the
    write computed (nothing is hashed again): (node, None), or (None, why) when the registry cannot be
    written (the written file stays; the command says so instead of failing)."""
    def hashes(path: str, value: str) -> FileHashes:
        return FileHashes(path, None, None, None, value, None)

    try:
        node = record(output, parents=list(parents), relation=relation, weights=weights,
                      params=json.loads(json.dumps(params)), registry=registry, hashes=hashes(output, autov3),
                      parent_hashes=[hashes(p, h) for p, h in zip(parents, parent_autov3)])
    except (LineageError, OSError) as e:
        return None, str(e)
    return node, None


def _resolve_ref(b: Batch, graph: nx.DiGraph, ref: ParentRef, files: dict[str, FileFacts]) -> str:
    """The node a metadata reference names (`graph`: the registry as the scan found it), creating a
    placeholder when nothing matches yet. Hashes and names are matched as everywhere (naming.py):
    a kohya LoRA's `ss_sd_model_name` of a Civitai download lands on the catalog model."""
    if ref.kind == "autov3":
        marked = [n for n in graph.nodes if n.startswith(ref.value + "+")] if not b.has_node(ref.value) else []
        if len(marked) == 1:
            return marked[0]  # the file with prediction markers that has these tensor bytes
        if not b.has_node(ref.value):  # known by content hash: the node id is settled already
            b.put_node(ref.value, {"name": ref.name, "hashes": {"autov3": ref.value}, "source": "file metadata"})
        return ref.value
    if ref.kind == "path" and ref.value in files:
        return _put_file(b, files[ref.value], None, "scan")
    if ref.kind in ("sha256", "autov2", "autov1"):
        by_hash = [n for n in nodes_with_hash(graph, ref.value) if not is_placeholder(n)]
        if len(by_hash) == 1:
            return by_hash[0]
        by_name = best_match(graph, ref.name) if ref.name and not by_hash else None
        if by_name and not is_placeholder(by_name.node):
            return by_name.node  # a base we know by the name it was downloaded under, not (yet) by hash
        placeholder, attrs = reference_id(ref.kind, ref.value), {"hashes": {ref.kind: ref.value}}
    else:
        name = ref.name or ref.value
        found = best_match(graph, name)  # a recorded file, hub repo or catalog model of that name
        if found:
            return found.node
        placeholder, attrs = reference_id("name", name), {}
    b.put_node(placeholder, {**attrs, "name": ref.name or ref.value, "source": "file metadata"})
    return placeholder


def _existing_input(ref: ParentRef, near: str) -> str | None:
    """The file a path reference points to, as written or next to the file that names it."""
    if ref.kind != "path":
        return None
    for candidate in (Path(ref.value), Path(near).parent / ref.value):
        try:
            if candidate.is_file():
                return os.fspath(candidate)
        except (OSError, ValueError):  # a name too long for the file system, or holding a NUL: no such file
            continue
    return None


def _link_origins(reg: Registry, facts: FileFacts) -> int:
    """Edges from the parents the file's metadata names; a re-scan replaces what an earlier scan read."""
    files = {}
    for origin in facts.origins:  # inputs present on disk are hashed before taking the lock
        for ref in origin.parents:
            found = _existing_input(ref, facts.path)
            if found:
                files[ref.value] = describe(found, reg)
    count = 0
    graph = reg.graph() if facts.origins else None
    with reg.batch() as b:
        direct_parents = set()
        for origin in facts.origins:
            child = facts.node_id if origin.child is None else _resolve_ref(b, graph, origin.child, files)
            for ref, weight in zip(origin.parents, origin.weights):
                parent = _resolve_ref(b, graph, ref, files)
                if parent == child:
                    continue  # e.g. an A1111 "No interpolation" copy that kept the same tensors
                # An edge above this file (from A1111's ancestry) says `via` which file told us.
                b.put_edge(parent, child, origin.relation, weight=weight, params=origin.params or None,
                           source=origin.source, via=None if origin.child is None else facts.node_id)
                count += 1
                if origin.child is None:
                    direct_parents.add(parent)
        b.drop_parents(facts.node_id, METADATA_SOURCES, keep=direct_parents)
    return count


def scan_file(path: str | os.PathLike, registry: str | os.PathLike | Registry | None = None) -> str:
    """Record one file with the parents its metadata names (as `scan` does); returns its node id."""
    with using_registry(registry) as reg:
        facts = describe(path, reg)
        with reg.batch() as b:
            _put_file(b, facts, None, "scan")
        _link_origins(reg, facts)
        return facts.node_id


def _put_recognised(b: Batch, facts: FileFacts) -> list[Recognition]:
    """Record a scanned file; the first time it is seen, as the catalog model it is (recognition.py).
    Only the first time: a link the user undid (`lmerge edit FILE --unlink`) is not made again."""
    stored = b.node_attrs(facts.node_id)
    found = recognise(facts) if stored is None or "format" not in stored else []
    model = next((r.node for r in found if r.linked), None)
    _put_file(b, facts, {ALIAS: model} if model else None, "scan")  # a link, as `lmerge link` makes it
    return found


def scan(directory: str | os.PathLike, registry: str | os.PathLike | Registry | None = None,
         on_file: Callable[[str], None] | None = None) -> ScanResult:
    """Record every .safetensors file under `directory` (or the one file given) and link the parents
    their metadata names. A file seen for the first time whose hash or download name says which
    catalog model it is becomes that model (`recognised`, recognition.py). All files are registered
    before any edge, so the order does not matter; a broken file is reported in `failed` and the
    others are still recorded."""
    root = Path(directory)
    if not root.is_dir():
        check_input(root)  # one file: refused up front unless it is a regular file
    # Every *.safetensors that is not a folder is read: a pipe or broken link among them is reported, not skipped.
    files = [root] if not root.is_dir() else sorted(p for p in root.rglob("*.safetensors") if not p.is_dir())
    result = ScanResult()
    with using_registry(registry) as reg:
        described = []
        for path in files:
            if on_file:
                on_file(os.fspath(path))
            try:
                facts = describe(path, reg)
                with reg.batch() as b:
                    result.recognised += _put_recognised(b, facts)
            except LineageError as e:
                result.failed.append((os.fspath(path), str(e)))
                continue
            described.append(facts)
            result.recorded.append((facts.path, facts.node_id))
        for facts in described:
            try:
                result.edges += _link_origins(reg, facts)
            except LineageError as e:
                result.failed.append((facts.path, str(e)))
    return result
