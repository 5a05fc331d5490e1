"""The built-in family catalog (`data/catalog.json`): the known SDXL anime family, as a graph.

The catalog is a read-only base layer under every user's registry, so that `lmerge tree` shows the
real family on a fresh install and a user's files can be linked to the models they are copies of.
Its facts and their sources: docs/catalog.md; `tests/test_catalog_data.py` checks them.
"""
from __future__ import annotations

import functools
import json
import re
from importlib import resources
from typing import Any

import networkx as nx

from lineage.errors import LineageError

CATALOG_SCHEMA = 1
# The seeds of docs/catalog.md's source table; any other source is the https URL of the page a fact was read on.
SEED_SOURCES = frozenset({"000", "001", "002", "003", "004", "handbook"})
_URL = re.compile(r"https://[\w.-]+(/\S*)?")
IDENTITY_KEYS = ("huggingface", "civitai", "files")  # the node keys whose entries each carry their own `source`


def is_source(value: object) -> bool:
    """Whether `value` can stand as a catalog source: a seed id or an https URL."""
    return isinstance(value, str) and (value in SEED_SOURCES or _URL.fullmatch(value) is not None)


def source_problems(document: dict[str, Any]) -> list[str]:
    """Every node, edge and identity fact whose sources are missing or not sources (see `is_source`)."""
    problems = []
    items = [(f"node {n.get('id')!r}", n) for n in document["nodes"]]
    items += [(f"edge {e.get('parent')!r} -> {e.get('child')!r}", e) for e in document["edges"]]
    for what, item in items:
        sources = item.get("sources")
        if not isinstance(sources, list) or not sources:
            problems.append(f"{what} lists no sources")
        else:
            problems += [f"{what} has source {s!r}" for s in sources if not is_source(s)]
    for node in document["nodes"]:
        for key in IDENTITY_KEYS:
            problems += [f"node {node.get('id')!r} has a {key} fact with source {fact.get('source')!r}"
                         for fact in node.get(key, ()) if not is_source(fact.get("source"))]
    return problems


@functools.cache
def catalog_document() -> dict[str, Any]:
    """The catalog file as shipped (schema 1: {schema, description, nodes, edges})."""
    source = resources.files("lineage.graph") / "data" / "catalog.json"
    document = json.loads(source.read_text(encoding="utf-8"))
    if document.get("schema") != CATALOG_SCHEMA:
        raise LineageError(f"built-in catalog has schema {document.get('schema')!r}, expected {CATALOG_SCHEMA}",
                           str(source))
    problems = source_problems(document)
    if problems:  # a source is a seed id or an https URL: anything else is a broken build of the package
        raise LineageError(f"built-in catalog: {problems[0]} (a source is a seed id or an https URL)"
                           + (f", and {len(problems) - 1} more" if len(problems) > 1 else ""), str(source))
    return document


@functools.cache
def catalog_graph() -> nx.DiGraph:
    """The catalog as a frozen lineage graph; every node and edge has `source: "catalog"`."""
    document = catalog_document()
    graph = nx.DiGraph()
    for node in document["nodes"]:
        attrs = {k: v for k, v in node.items() if k != "id"}
        graph.add_node(node["id"], **attrs, source="catalog")
    for edge in document["edges"]:
        attrs = {k: v for k, v in edge.items() if k not in ("parent", "child")}
        graph.add_edge(edge["parent"], edge["child"], **attrs, source="catalog")
    return nx.freeze(graph)


def is_catalog_node(node_id: str) -> bool:
    return node_id in catalog_graph()


def huggingface_repo(attrs: dict[str, Any]) -> str | None:
    """The main Hugging Face repo id of a node (its first `huggingface` entry or model URL), if any."""
    from lineage.graph.naming import repo_ids

    repos = repo_ids(attrs)
    return repos[0] if repos else None


@functools.cache
def catalog_node_for_repo() -> dict[str, str]:
    """Hugging Face repo id (lower case) -> catalog node id, for every repo a catalog node is published under."""
    from lineage.graph.naming import repo_ids

    found = {}
    for node_id, attrs in catalog_graph().nodes(data=True):
        for repo in repo_ids(attrs):
            found[repo.lower()] = node_id
    return found
