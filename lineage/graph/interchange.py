"""Lineage graphs as files: a versioned JSON document and GraphML, both ways.

JSON (`lmerge registry export`, `lmerge tree --format json`):

    {"format": "lineage-graph", "version": 1,
     "nodes": [{"id": "...", "name": "...", ...attributes}],
     "edges": [{"parent": "...", "child": "...", "relation": "merge", "weight": 0.5, "params": {...}}]}

Every node an edge names is listed (the catalog nodes a user's edges hang from too, with their
catalog attributes; an import skips those). GraphML keeps the same attributes: text as text, everything else
(numbers, lists, objects) as JSON text under the attribute name + ".json", so it reads back exactly.
Reading validates everything first (each attribute the registry gives a meaning to has its type
checked: a `paths` that is one text is refused, not read as one path per character) and raises one
clear error, so a bad file changes nothing.
"""
from __future__ import annotations

import io
import os
from typing import Any

import networkx as nx

from lineage.errors import LineageError
from lineage.graph.model import RELATIONS
from lineage.io import strict_json
from lineage.io.inputs import read_input

FORMAT = "lineage-graph"
VERSION = 1
_JSON_SUFFIX = ".json"


def to_document(graph: nx.DiGraph) -> dict[str, Any]:
    """The JSON document of a graph (nodes and edges in a stable order)."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "nodes": [{"id": n, **graph.nodes[n]} for n in sorted(graph)],
        "edges": [{"parent": u, "child": v, **graph.edges[u, v]} for u, v in sorted(graph.edges)],
    }


def to_json(graph: nx.DiGraph) -> str:
    """The document as JSON text; a NaN or infinity (which no JSON reader accepts) is an error naming it."""
    try:
        return strict_json.dumps(to_document(graph), indent=2, ensure_ascii=False) + "\n"
    except strict_json.JSONError as e:
        raise LineageError(f"cannot write the graph as JSON: {e}") from None


def _text(value: Any) -> bool:
    return isinstance(value, str)


def _texts(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _text_map(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(v, str) for v in value.values())


def _object(value: Any) -> bool:
    return isinstance(value, dict)


def _objects(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, dict) for v in value)


def _repo_list(value: Any) -> bool:  # catalog `huggingface`: repo ids, or {"repo": id, "source": ...}
    return isinstance(value, list) and all(isinstance(v, str) or (isinstance(v, dict) and _text(v.get("repo")))
                                           for v in value)


def _files(value: Any) -> bool:  # the files folded into a model: {"name", "linked": alias id, hashes...}
    return _objects(value) and all(v.get("linked") is None or _text(v["linked"]) for v in value)


# The attributes the registry gives a meaning to -> (check, what it must be). Others may hold any JSON.
NODE_FIELDS: dict[str, tuple[Any, str]] = {
    "name": (_text, "text"), "names": (_texts, "a list of texts"), "paths": (_texts, "a list of texts"),
    "hashes": (_text_map, "an object of texts"), "size": (_count, "a whole number >= 0"), "kind": (_text, "text"),
    "format": (_text, "text"), "architecture": (_text, "text"), "prediction_type": (_text, "text"),
    "prediction_source": (_text, "text"), "source": (_text, "text"), "notes": (_text, "text"),
    "maker": (_text, "text"), "license": (_text, "text"),
    # `repo` is what `lmerge edit --set-repo` stores (page.repo_ids reads it and the catalog's `huggingface`).
    "repo": (_text, "text"), "civitai_url": (_text, "text"),
    "same_as": (_text, "text"), "urls": (_texts, "a list of texts"), "date": (_text, "text"),
    "huggingface": (_repo_list, "a list of repo ids"), "civitai": (_objects, "a list of objects"),
    "files": (_files, "a list of objects whose \"linked\" is text"),
}
EDGE_FIELDS: dict[str, tuple[Any, str]] = {
    "weight": (_number, "a number"), "params": (_object, "an object"), "source": (_text, "text"),
    "via": (_text, "text"), "note": (_text, "text"),
}


def _check_fields(entry: dict[str, Any], fields: dict[str, tuple[Any, str]], name: str, where: str,
                  which: str) -> None:
    for field, (check, expected) in fields.items():
        if entry.get(field) is not None and not check(entry[field]):
            raise _fail(where, f"{name}.{field} is {entry[field]!r:.80}, not {expected} ({which})")


def _fail(where: str, problem: str) -> LineageError:
    return LineageError(f"{problem}; nothing was imported", where)


def _refuse_nonfinite(entry: dict[str, Any], name: str, where: str) -> None:
    """NaN and infinities (GraphML's "NaN"/"INF" doubles, or an export made by hand) have no place in a
    registry: every later command would carry them into JSON that nothing can read."""
    found = strict_json.nonfinite_path(entry)
    if found is not None:
        raise _fail(where, f"{name}.{found} is not a finite number")


def from_document(document: Any, where: str = "<document>") -> nx.DiGraph:
    """The graph a document describes, after checking all of it."""
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise _fail(where, f"not a {FORMAT} document (expected an object with \"format\": \"{FORMAT}\")")
    version = document.get("version")
    if not isinstance(version, int):
        raise _fail(where, "has no integer \"version\"")
    if version > VERSION:
        raise _fail(where, f"document version {version} is newer than this lineage reads ({VERSION}); upgrade lineage")
    nodes, edges = document.get("nodes"), document.get("edges")
    if not isinstance(nodes, list) or not isinstance(edges, list):
        raise _fail(where, "\"nodes\" and \"edges\" must be lists")
    graph = nx.DiGraph()
    for i, node in enumerate(nodes):
        if not isinstance(node, dict) or not isinstance(node.get("id"), str) or not node["id"]:
            raise _fail(where, f"nodes[{i}] needs a non-empty string \"id\"")
        if node["id"] in graph:
            raise _fail(where, f"nodes[{i}]: node {node['id']!r} is listed twice")
        _refuse_nonfinite(node, f"nodes[{i}]", where)
        _check_fields(node, NODE_FIELDS, f"nodes[{i}]", where, f"node {node['id']!r}")
        graph.add_node(node["id"], **{k: v for k, v in node.items() if k != "id"})
    for i, edge in enumerate(edges):
        if not isinstance(edge, dict) or not all(isinstance(edge.get(k), str) and edge[k] for k in ("parent", "child")):
            raise _fail(where, f"edges[{i}] needs string \"parent\" and \"child\"")
        if edge.get("relation") not in RELATIONS:
            raise _fail(where, f"edges[{i}] has relation {edge.get('relation')!r}; "
                               f"expected one of {', '.join(RELATIONS)}")
        _refuse_nonfinite(edge, f"edges[{i}]", where)
        _check_fields(edge, EDGE_FIELDS, f"edges[{i}]", where, f"edge {edge['parent']} -> {edge['child']}")
        for end in ("parent", "child"):
            if edge[end] not in graph:
                raise _fail(where, f"edges[{i}]: {end} {edge[end]!r} is not listed in \"nodes\"")
        if graph.has_edge(edge["parent"], edge["child"]):
            raise _fail(where, f"edges[{i}]: {edge['parent']} -> {edge['child']} is listed twice")
        graph.add_edge(edge["parent"], edge["child"], **{k: v for k, v in edge.items() if k not in ("parent", "child")})
    return graph


def _flat(attrs: dict[str, Any]) -> dict[str, str]:
    """GraphML attributes: text as it is, anything else as JSON text under name + ".json"."""
    flat = {}
    for key, value in attrs.items():
        if isinstance(value, str):
            flat[key] = value
        elif value is not None:
            flat[key + _JSON_SUFFIX] = strict_json.dumps(value, ensure_ascii=False)
    return flat


def _unflat(attrs: dict[str, Any], where: str) -> dict[str, Any]:
    out = {}
    for k, v in attrs.items():
        if k.endswith(_JSON_SUFFIX):
            if not isinstance(v, str):
                raise _fail(where, f"attribute {k!r} is not JSON text: {v!r}")
            try:
                out[k[:-len(_JSON_SUFFIX)]] = strict_json.loads(v)
            except strict_json.JSONError as e:
                raise _fail(where, f"attribute {k!r} is not valid JSON ({e}): {v[:80]!r}") from None
        else:
            out[k] = v
    return out


def to_graphml(graph: nx.DiGraph) -> str:
    flat = nx.DiGraph(format=FORMAT, version=VERSION)
    try:
        flat.add_nodes_from((n, _flat(a)) for n, a in graph.nodes(data=True))
        flat.add_edges_from((u, v, _flat(a)) for u, v, a in graph.edges(data=True))
    except strict_json.JSONError as e:
        raise LineageError(f"cannot write the graph as GraphML: {e}") from None
    buffer = io.BytesIO()
    nx.write_graphml(flat, buffer, encoding="utf-8")
    return buffer.getvalue().decode("utf-8")


def from_graphml(text: str, where: str = "<graphml>") -> nx.DiGraph:
    try:
        flat = nx.parse_graphml(text)
    except Exception as e:  # networkx raises several types (ParseError, NetworkXError, KeyError) for bad input
        raise _fail(where, f"is not valid GraphML ({e})") from None
    if not flat.is_directed():
        raise _fail(where, "is an undirected GraphML graph; lineage edges point from parent to child")
    document = {
        "format": flat.graph.get("format"),
        "version": flat.graph.get("version"),
        "nodes": [{"id": str(n), **_unflat(a, where)} for n, a in flat.nodes(data=True)],
        "edges": [{"parent": str(u), "child": str(v), **_unflat(a, where)} for u, v, a in flat.edges(data=True)],
    }
    return from_document(document, where)


def read_graph_file(path: str | os.PathLike) -> nx.DiGraph:
    """A graph from a JSON document or a GraphML file (told apart by their first character)."""
    where = os.fspath(path)
    try:
        text = read_input(where).decode("utf-8")  # a FIFO or device is refused, not waited on
    except UnicodeDecodeError as e:
        raise LineageError(f"cannot read ({e})", where) from None
    if text.lstrip().startswith("<"):
        return from_graphml(text, where)
    try:
        document = strict_json.loads(text)
    except strict_json.JSONError as e:
        raise _fail(where, f"is not valid JSON ({e})") from None
    return from_document(document, where)
