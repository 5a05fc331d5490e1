"""Identity and editing: which file is which model, and undoing mistakes in the family tree.

Identity. `link(FILE, NODE)` says that a file IS that model (a download of a catalog model, a
second copy of one of your own): the file's node becomes an alias (`same_as: NODE`). The alias keeps
its hashes and paths in the registry, so the file is still recognised by hash and path, but the
lineage graph (`Registry.graph()`, through `fold_aliases`) shows one node: the model, carrying the
file's hashes and paths in its `files`, with the file's children as its own children. Catalog nodes
stay read-only: what a link adds lives in the user's registry. A file and a model of different kinds
(a LoRA and a checkpoint), architectures or prediction types are never the same model. `merge_nodes`
is the same operation for two nodes recorded separately.

Editing. Everything a user may change on their own nodes: rename, repo id, Civitai URL, licence,
notes (`set_attributes`); a parent edge removed (`remove_parent`) or the parents replaced
(`set_parents`); a node removed (`remove_node`). `show` gathers what is known about one node.
Every change is one registry transaction; a catalog node is refused with a pointer to what can be
done instead.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import PurePath
from typing import Any

import networkx as nx

from lineage.errors import LineageError
from lineage.graph.catalog import is_catalog_node
from lineage.graph.model import ADAPTER_KINDS, PREDICTION_FAMILY, RELATIONS, display_name
from lineage.graph.naming import civitai_ids_of_url, civitai_versions, huggingface_repo_of_url, repo_ids
from lineage.graph.registry import Batch, Registry, using_registry
from lineage.graph.render import block_weights, merge_method

ALIAS = "same_as"  # node attribute: this node (a file) is that model
MAX_ALIAS_CHAIN = 16  # a file linked to a file linked to a model ...; longer chains are a damaged registry
# What `set_attributes` may change on a user's node: option name -> node attribute.
EDITABLE = {"name": "name", "repo": "repo", "civitai_url": "civitai_url", "license": "license", "notes": "notes"}


# ---------------------------------------------------------------------------------------------
# Identity


def alias_target(graph: nx.DiGraph, node: str) -> str:
    """The model `node` is (following `same_as` links), or `node` itself."""
    return _follow_links(node, lambda n: graph.nodes[n].get(ALIAS) if n in graph else None, graph.__contains__)


def _follow_links(node: str, link_of: Callable[[str], str | None], exists: Callable[[str], bool]) -> str:
    """Where the `same_as` links from `node` lead (`link_of`: a node's link, `exists`: is that a node):
    the last node, or an error naming the links when they go round in a circle."""
    seen = [node]
    while (target := link_of(node)) and exists(target):
        if target in seen or len(seen) > MAX_ALIAS_CHAIN:
            raise LineageError(f"the links {' -> '.join(seen)} go round in a circle; "
                               "remove one with `lmerge edit NODE --unlink`")
        seen.append(target)
        node = target
    return node


def fold_aliases(graph: nx.DiGraph) -> nx.DiGraph:
    """Replace every alias node by its model, in place: the alias's file (name, hashes, paths) joins
    the model's `files` and `paths`, its children become the model's children, and its parents the
    model's parents unless the model is a catalog node (whose ancestry the catalog settles)."""
    aliases = [n for n, target in graph.nodes(data=ALIAS) if target]
    for alias in aliases:
        target = alias_target(graph, alias)
        if target == alias:
            continue  # linked to a node that is gone: it stays a node of its own
        attrs, model = graph.nodes[alias], graph.nodes[target]
        paths = attrs.get("paths", [])
        model["files"] = [*model.get("files", []), {
            "name": PurePath(paths[0]).name if paths else attrs.get("name"), "linked": alias,
            **{k: v for k, v in attrs.get("hashes", {}).items()}}]
        model["paths"] = [*model.get("paths", []), *paths]
        model["names"] = sorted({*model.get("names", []), *attrs.get("names", []), *([attrs["name"]] if attrs.get(
            "name") else [])} - {model.get("name")})
        for child in list(graph.successors(alias)):
            if child != target:
                graph.add_edge(target, child, **graph.edges[alias, child])
        if not is_catalog_node(target):
            for parent in list(graph.predecessors(alias)):
                if parent != target and not graph.has_edge(target, parent):
                    graph.add_edge(parent, target, **graph.edges[parent, alias])
        graph.remove_node(alias)
    return graph


def canonical(reg: Registry, node_id: str) -> str:
    """The model a node id stands for: itself, or the model it is linked to."""
    return _follow_links(node_id, lambda n: reg.node(n).get(ALIAS), reg.has_node)


# What two things must share to be one model, each fact compared by its family of values (a LoRA and
# a LoKr are both adapters; "v" and "v+ztsnr" are both v-prediction).
IDENTITY_FACTS: tuple[tuple[str, Callable[[str], str]], ...] = (
    ("kind", lambda k: "adapter" if k in ADAPTER_KINDS else k), ("architecture", lambda a: a),
    ("prediction_type", lambda p: PREDICTION_FAMILY.get(p, p)),
)


def identity_conflict(alias: dict[str, Any], model: dict[str, Any]) -> tuple[str, str, str] | None:
    """(fact, alias's value, model's value) of the first fact that makes `alias` (a file's node) and
    `model` different models, or None when nothing known tells them apart."""
    for key, family in IDENTITY_FACTS:
        mine, theirs = alias.get(key), model.get(key)
        if key == "prediction_type" and alias.get("prediction_source") == "default":
            mine = None  # detection assumed it; nothing in the file says so
        if mine and theirs and family(mine) != family(theirs):
            return key, mine, theirs
    return None


def _same_kind(reg: Registry, alias: dict[str, Any], alias_label: str, target: str) -> None:
    """Refuse to make two things one model when their kind, architecture or prediction type differ."""
    conflict = identity_conflict(alias, reg.graph().nodes[target])
    if conflict:
        key, mine, theirs = conflict
        raise LineageError(f"{alias_label} is a {key.replace('_', ' ')} {mine} model and "
                           f"{display_name(reg.graph(), target)} a {theirs} one: they cannot be the same model")


def link(path: str | os.PathLike, node: str, registry: str | os.PathLike | Registry | None = None) -> str:
    """The file at `path` IS the model `node` (e.g. a catalog entry): record it (if new) as an alias
    of the model. Returns the model's node id."""
    from lineage.graph.recording import describe, record  # recording builds on the registry, as this does

    with using_registry(registry) as reg:
        facts = describe(path, reg)
        target = reg.resolve(node)
        if target == facts.node_id or (reg.has_node(facts.node_id) and canonical(reg, facts.node_id) == target):
            return target
        if canonical(reg, target) == facts.node_id:
            raise LineageError(f"{display_name(reg.graph(), target)} is already linked to this file", path)
        _same_kind(reg, facts.attrs, os.fspath(path), target)
        record(path, attrs={ALIAS: target}, registry=reg, hashes=facts.hashes)
        return target


def unlink(node: str, registry: str | os.PathLike | Registry | None = None) -> str:
    """Undo `link` / `merge_nodes`: the alias `node` (a file, hash or name of it) is its own node again."""
    with using_registry(registry) as reg:
        alias = _own_alias(reg, node)
        with reg.batch() as b:
            b.put_node(alias, {ALIAS: None})  # None clears an attribute
        return alias


def _own_alias(reg: Registry, spec: str) -> str:
    """The alias node `spec` names (a path or hash of a linked file, or an alias id)."""
    node_id = spec if reg.has_node(spec) else _raw_id(reg, spec)
    if not reg.node(node_id).get(ALIAS):
        raise LineageError(f"{spec!r} is not linked to another model")
    return node_id


def _raw_id(reg: Registry, spec: str) -> str:
    """The node `spec` names before links are followed (a file's own node)."""
    if os.path.isfile(spec):
        known = reg.known_file(spec)
        if known:
            return known[0]
    found = reg.find_by_hash(spec) if spec.strip() else []
    if len(found) == 1:
        return found[0]
    raise LineageError(f"no recorded file or hash {spec!r}")


def merge_nodes(keep: str, duplicate: str, registry: str | os.PathLike | Registry | None = None) -> str:
    """`duplicate` is the same model as `keep`: it becomes an alias of `keep` (its names, hashes,
    paths and children are `keep`'s from now on). Returns `keep`'s id."""
    with using_registry(registry) as reg:
        kept, gone = reg.resolve(keep), reg.resolve(duplicate)
        if kept == gone:
            raise LineageError(f"{keep!r} and {duplicate!r} are already the same model")
        _require_own(gone, "merged into another node; merge the other node into it instead")
        graph = reg.graph()
        if nx.has_path(graph, kept, gone) or nx.has_path(graph, gone, kept):
            raise LineageError(f"{display_name(graph, gone)} and {display_name(graph, kept)} descend from one "
                               "another, so they are not the same model")
        _same_kind(reg, reg.node(gone), display_name(graph, gone), kept)
        with reg.batch() as b:
            b.put_node(gone, {ALIAS: kept})
        return kept


# ---------------------------------------------------------------------------------------------
# Editing


def _require_own(node_id: str, what: str) -> None:
    if is_catalog_node(node_id):
        raise LineageError(f"{node_id!r} is a built-in catalog node and cannot be {what}; "
                           "your registry can add files and children to it (lmerge link, lmerge add --parent)")


def set_attributes(node: str, values: dict[str, str | None],
                   registry: str | os.PathLike | Registry | None = None) -> str:
    """Set (or, with None/"", clear) editable attributes of one of the user's nodes: name, repo
    (a Hugging Face repo id), civitai_url, license, notes. Returns the node id."""
    unknown = set(values) - set(EDITABLE)
    if unknown:
        raise LineageError(f"cannot set {', '.join(sorted(unknown))}; editable: {', '.join(EDITABLE)}")
    if values.get("repo") and not huggingface_repo_of_url(f"https://huggingface.co/{values['repo']}"):
        raise LineageError(f"{values['repo']!r} is not a Hugging Face repo id (owner/name)")
    if values.get("civitai_url") and not civitai_ids_of_url(values["civitai_url"]):
        raise LineageError(f"{values['civitai_url']!r} is not a Civitai model URL (https://civitai.com/models/ID... "
                           "or a download link https://civitai.com/api/download/models/VERSION)")
    if "name" in values and not values["name"]:
        raise LineageError("a node's name cannot be empty")
    with using_registry(registry) as reg:
        node_id = reg.resolve(node)
        _require_own(node_id, "edited")
        with reg.batch() as b:
            b.put_node(node_id, {EDITABLE[key]: value or None for key, value in values.items()})  # None clears
        return node_id


def remove_parent(node: str, parent: str, registry: str | os.PathLike | Registry | None = None) -> str:
    """Remove the edge parent -> node. Returns the node id."""
    with using_registry(registry) as reg:
        node_id, parent_id = reg.resolve(node), reg.resolve(parent)
        _require_own(node_id, "given other parents")
        graph = reg.graph()
        if not graph.has_edge(parent_id, node_id):
            parents = ", ".join(display_name(graph, p) for p in graph.predecessors(node_id)) or "none"
            raise LineageError(f"{display_name(graph, parent_id)} is not a parent of {display_name(graph, node_id)} "
                               f"(its parents: {parents})")
        with reg.batch() as b:
            b.delete_edge(_stored_parent(b, parent_id, node_id), node_id)
        return node_id


def _stored_parent(b: Batch, parent: str, child: str) -> str:
    """The parent as the edge is stored (a file linked to `parent` may be the stored end)."""
    for stored in b.parents(child):
        if stored == parent or (b.node_attrs(stored) or {}).get(ALIAS) == parent:
            return stored
    return parent


def _model_of(reg: Registry, spec: str) -> str:
    """The model `spec` names; a file not recorded yet is recorded first (as `lmerge add` does)."""
    from lineage.graph.recording import record

    if os.path.isfile(spec) and not reg.known_file(spec):
        return reg.resolve(record(spec, registry=reg))
    return reg.resolve(spec)


def set_parents(node: str, parents: Sequence[str], relation: str, weights: Sequence[float] | None = None,
                registry: str | os.PathLike | Registry | None = None) -> str:
    """Replace every parent of `node` by `parents` (with `relation`, and `weights` for a merge)."""
    if relation not in RELATIONS:
        raise LineageError(f"unknown relation {relation!r}; choose one of {', '.join(RELATIONS)}")
    if weights is not None and len(weights) != len(parents):
        raise LineageError(f"{len(weights)} weights for {len(parents)} parents; give one weight per parent")
    with using_registry(registry) as reg:
        node_id = reg.resolve(node)
        _require_own(node_id, "given other parents")
        parent_ids = [_model_of(reg, p) for p in parents]
        with reg.batch() as b:
            for old in b.parents(node_id):
                b.delete_edge(old, node_id)
            for i, parent_id in enumerate(parent_ids):
                b.put_edge(parent_id, node_id, relation, weight=None if weights is None else float(weights[i]),
                           source="user")
        return node_id


def drop_other_parents(node: str, keep: Sequence[str],
                       registry: str | os.PathLike | Registry | None = None) -> list[str]:
    """Remove every parent edge of `node` whose parent is not one of `keep` (ids of models; a stored
    edge from a file linked to one of them counts as that model). Returns the parents removed."""
    with using_registry(registry) as reg:
        node_id = reg.resolve(node)
        _require_own(node_id, "given other parents")
        kept = set(keep)
        with reg.batch() as b:
            dropped = [p for p in b.parents(node_id) if canonical(reg, p) not in kept]
            for parent in dropped:
                b.delete_edge(parent, node_id)
        return dropped


def remove_node(node: str, registry: str | os.PathLike | Registry | None = None) -> list[str]:
    """Remove one of the user's nodes with its edges, hashes, paths and the files linked to it.
    Its children keep their other parents. Returns the ids removed."""
    with using_registry(registry) as reg:
        node_id = reg.resolve(node)
        _require_own(node_id, "removed")
        user = reg.user_graph()
        linked = [n for n, target in user.nodes(data=ALIAS) if target == node_id]
        with reg.batch() as b:
            for gone in [node_id, *linked]:
                b.delete_node(gone)
        return [node_id, *linked]


# ---------------------------------------------------------------------------------------------
# Showing


def show(graph: nx.DiGraph, node: str) -> dict[str, Any]:
    """Everything known about `node` in `graph` (a folded registry graph): its facts, files,
    parents (relation, weight, method) and children."""
    attrs = dict(graph.nodes[node])

    def edge(parent: str, child: str, other: str) -> dict[str, Any]:
        e = graph.edges[parent, child]
        params = e.get("params") or {}
        return {k: v for k, v in {"id": other, "name": display_name(graph, other), "relation": e.get("relation"),
                                  "weight": e.get("weight"), "method": merge_method(e) or params.get("method"),
                                  "blocks": block_weights(e) or None, "source": e.get("source"),
                                  "note": e.get("note")}.items() if v is not None}

    civitai = civitai_versions(attrs)
    facts = {
        "id": node, "name": attrs.get("name", node), "names": attrs.get("names", []),
        "origin": "catalog" if is_catalog_node(node) else attrs.get("source", "user"),
        "kind": attrs.get("kind"), "architecture": attrs.get("architecture"),
        "prediction_type": attrs.get("prediction_type"), "license": attrs.get("license"),
        "repo_ids": repo_ids(attrs), "civitai": [{"model_id": m, "version_id": v} for m, v in civitai],
        "urls": [*attrs.get("urls", []), *([attrs["civitai_url"]] if attrs.get("civitai_url") else [])],
        "hashes": attrs.get("hashes", {}), "files": attrs.get("files", []), "paths": attrs.get("paths", []),
        "notes": attrs.get("notes"),
        "parents": [edge(p, node, p) for p in sorted(graph.predecessors(node))],
        "children": [edge(node, c, c) for c in sorted(graph.successors(node))],
    }
    shown = set(facts) | {"urls", "civitai_url", "repo", "huggingface", "civitai", "source", "hashes"}
    facts["other"] = {k: v for k, v in attrs.items() if k not in shown}
    return {k: v for k, v in facts.items() if v not in (None, [], {})}


# What `lmerge show` prints besides its first line and the parents / children, in order: (fact, caption).
# The page's panel (page.py) shows the same lines.
SHOWN_FACTS: tuple[tuple[str, str], ...] = (
    ("kind", "kind"), ("architecture", "architecture"), ("prediction_type", "prediction type"),
    ("license", "licence"),
)


def show_fields(facts: dict[str, Any]) -> list[tuple[str, str]]:
    """`show`'s facts as the (caption, text) lines `lmerge show` prints (and the page's panel shows),
    without the first line (name, id, origin) and the parents and children (see `edge_text`)."""
    lines = [(caption, str(facts[key])) for key, caption in SHOWN_FACTS if facts.get(key)]
    if facts.get("names"):
        lines.append(("also named", ", ".join(map(str, facts["names"]))))
    lines += [("Hugging Face", repo) for repo in facts.get("repo_ids", [])]
    ids = (("model_id", "model"), ("version_id", "version"))  # a download link names only the version
    lines += [("Civitai", ", ".join(f"{what} {c[key]}" for key, what in ids if c.get(key) is not None))
              for c in facts.get("civitai", [])]
    lines += [("url", str(url)) for url in facts.get("urls", [])]
    lines += [(kind, str(value)) for kind, value in facts.get("hashes", {}).items()]
    for f in facts.get("files", []):
        hashes = ", ".join(f"{k} {v[:12]}" for k, v in f.items() if k in ("sha256", "autov3") and v)
        lines.append(("file", str(f.get("name")) + (f" ({hashes})" if hashes else "")))
    lines += [("path", str(p)) for p in facts.get("paths", [])]
    lines += [line for key, value in facts.get("other", {}).items() for line in _fact_lines(key, value)]
    if facts.get("notes"):
        lines.append(("notes", str(facts["notes"])))
    return lines


def _fact_lines(caption: str, value: Any) -> list[tuple[str, str]]:
    """Any other fact as `show` lines: a list on one line, a mapping a line per entry ("prompt notes")."""
    if isinstance(value, dict):
        return [line for key, item in value.items() for line in _fact_lines(f"{caption} {key}", item)]
    return [(caption, ", ".join(map(str, value)) if isinstance(value, list) else str(value))]


def edge_text(edge: dict[str, Any]) -> str:
    """How a parent or child in `show` is related: relation, weight, method, per-block values."""
    details = [edge.get("relation", "?")]
    if edge.get("weight") is not None:
        details.append(f"weight {edge['weight']:.3g}")
    if edge.get("method"):
        details.append(f"method {edge['method']}")
    details += [f"{name} by block: " + ", ".join(f"{b} {v:.3g}" for b, v in blocks.items())
                for name, blocks in edge.get("blocks", {}).items()]
    return ", ".join(details)
