"""The built-in family catalog (`data/catalog.json`): the known SDXL anime family, as a graph.

The catalog is a read-only base layer under every user's registry, so that `lmerge tree` shows the
real family on a fresh install and a user's files can be linked to the models they are copies of.
Its facts and their sources: docs/catalog.md; `tests/test_catalog_data.py` checks them.
"""
from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any

import networkx as nx

from lineage.errors import LineageError

CATALOG_SCHEMA = 1


@functools.cache
def catalog_document() -> dict[str, Any]:
    """The catalog file as shipped (schema 1: {schema, description, nodes, edges})."""
    source = resources.files("lineage.graph") / "data" / "catalog.json"
    document = json.loads(source.read_text(encoding="utf-8"))
    if document.get("schema") != CATALOG_SCHEMA:
        raise LineageError(f"built-in catalog has schema {document.get('schema')!r}, expected {CATALOG_SCHEMA}",
                           str(source))
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
