"""The lineage graph: which model was made from which (docs/catalog.md for the built-in family).

The graph is a plain networkx `DiGraph` with edges pointing from parent to child. Storage lives in
`registry.py`, the built-in family in `catalog.py`; this module holds the conventions every graph
follows and the algorithms, as functions over any such graph.

Node ids say where a node comes from:
- a file's node is its full AutoV3 hex (64 characters: the content hash that ignores metadata);
- a catalog node keeps its slug (`illustrious-xl-v0.1`);
- a Hugging Face repository is `hf:<owner>/<name>`;
- a parent that a file's metadata names but that has not been seen yet is `<hash kind>:<hex>`
  (`sha256:…`, `autov1:…`) or `name:<name>`; recording the file later absorbs it.
Display names, hashes, file paths, prediction type and the other facts are node attributes.

Edge attributes: `relation` (one of RELATIONS), and where known `weight` (the weight of this parent
in a merge), `params` (merge method and recipe, trainer or extraction settings), `source`, `note`.
"""
from __future__ import annotations

import re

import networkx as nx

from lineage.errors import LineageError

# relation -> what it means (shown in `--help` and error messages).
RELATIONS: dict[str, str] = {
    "finetune": "the child continued training the parent",
    "merge": "the child mixes several parents (weights, method and recipe on each edge)",
    "adapter": "an adapter (LoRA, LoKr, ...) trained on or extracted from the parent",
    "trained": "trained by a trainer from the parent (trainer config, dataset hash)",
    "convert": "the same weights in another dtype or layout (or a file of a catalog model)",
}

# Prediction types that need the same sampler setup; a LoRA trained for one family misbehaves on the other.
PREDICTION_FAMILY: dict[str, str] = {
    "epsilon": "epsilon", "epsilon+ztsnr": "epsilon",
    "v": "v", "v+ztsnr": "v",
    "edm": "edm", "edm-v": "edm-v",
}

# Node kinds that are adapters (an adapter's parent is its base model).
ADAPTER_KINDS = frozenset({"lora", "locon", "lokr", "loha", "diff"})

AUTOV3_ID = re.compile(r"[0-9a-f]{64}")
HUB_PREFIX = "hf:"
REFERENCE_KINDS = ("sha256", "autov1", "autov2", "name")


def reference_id(kind: str, value: str) -> str:
    """Id of a placeholder for a parent known only by a hash of its file or by a name."""
    if kind not in REFERENCE_KINDS:
        raise ValueError(f"unknown reference kind {kind!r}")
    return f"{kind}:{value.lower() if kind != 'name' else value}"


def is_placeholder(node_id: str) -> bool:
    return node_id.split(":", 1)[0] in REFERENCE_KINDS and ":" in node_id


def check_relation(relation: str) -> None:
    if relation not in RELATIONS:
        raise LineageError(f"unknown relation {relation!r}; choose one of {', '.join(RELATIONS)}")


def add_lineage_edge(graph: nx.DiGraph, parent: str, child: str, relation: str, **attrs: object) -> None:
    """Add parent -> child, refusing unknown relations and anything that would close a cycle."""
    check_relation(relation)
    if parent == child or (parent in graph and child in graph and nx.has_path(graph, child, parent)):
        raise LineageError(f"refusing edge {parent} -> {child}: {display_name(graph, child)} is already "
                           f"an ancestor of {display_name(graph, parent)} (a model cannot descend from itself)")
    graph.add_edge(parent, child, relation=relation, **{k: v for k, v in attrs.items() if v is not None})


def display_name(graph: nx.DiGraph, node: str) -> str:
    return str(graph.nodes[node].get("name") or node) if node in graph else node


def require_node(graph: nx.DiGraph, node: str) -> None:
    if node not in graph:
        raise LineageError(f"no node {node!r} in the lineage graph")


def _within(graph: nx.DiGraph, node: str, depth: int | None) -> dict[str, int]:
    """node -> generations from `node` following edges forward (node itself excluded)."""
    lengths = nx.single_source_shortest_path_length(graph, node, cutoff=depth)
    lengths.pop(node)
    return lengths


def ancestors(graph: nx.DiGraph, node: str, depth: int | None = None) -> set[str]:
    """Every node `node` descends from (at most `depth` generations up)."""
    require_node(graph, node)
    if depth is None:
        return nx.ancestors(graph, node)
    return set(_within(graph.reverse(copy=False), node, depth))


def descendants(graph: nx.DiGraph, node: str, depth: int | None = None) -> set[str]:
    """Every node made from `node` (at most `depth` generations down)."""
    require_node(graph, node)
    if depth is None:
        return nx.descendants(graph, node)
    return set(_within(graph, node, depth))


def path(graph: nx.DiGraph, a: str, b: str) -> list[str] | None:
    """The shortest line of descent between `a` and `b`, from the older to the younger, or None
    when neither descends from the other."""
    require_node(graph, a)
    require_node(graph, b)
    for source, target in ((a, b), (b, a)):
        try:
            return nx.shortest_path(graph, source, target)
        except nx.NetworkXNoPath:
            continue
    return None


def lowest_common_ancestors(graph: nx.DiGraph, a: str, b: str) -> list[str]:
    """The nearest nodes both `a` and `b` descend from (a node counts as its own ancestor), nearest
    first by the number of generations down to `a` and `b` together."""
    up_a = nx.single_source_shortest_path_length(graph.reverse(copy=False), a)
    up_b = nx.single_source_shortest_path_length(graph.reverse(copy=False), b)
    common = up_a.keys() & up_b.keys()
    lowest = [c for c in common if not any(s in common for s in graph.successors(c))]
    return sorted(lowest, key=lambda c: (up_a[c] + up_b[c], c))


def roots(graph: nx.DiGraph) -> list[str]:
    """Nodes without parents, sorted."""
    return sorted(n for n in graph if graph.in_degree(n) == 0)


def siblings(graph: nx.DiGraph, node: str) -> set[str]:
    """Other children of `node`'s parents."""
    require_node(graph, node)
    return {s for p in graph.predecessors(node) for s in graph.successors(p)} - {node}


def neighbourhood(graph: nx.DiGraph, node: str, *, up: bool = True, down: bool = True,
                  depth: int | None = None) -> nx.DiGraph:
    """The part of the graph to show for `node`: itself, its ancestors (`up`) and descendants (`down`)."""
    keep = {node}
    if up:
        keep |= ancestors(graph, node, depth)
    if down:
        keep |= descendants(graph, node, depth)
    return graph.subgraph(keep)

