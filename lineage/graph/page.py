"""The family tree as one HTML page people can explore (`lmerge tree -o tree.html`).

The page is a single self-contained file, readable offline: Graphviz lays the graph out (the same DOT
as `render.to_dot`, its SVG inlined), and our own script and stylesheet (data/page.js, data/page.css)
add pan and zoom, search, a panel per node, highlighted ancestors and descendants, filters, a legend
and collapsible subtrees. The graph's facts travel in a JSON block the script reads; nothing is
fetched when the page is viewed. docs/catalog.md describes the page for users.
"""
from __future__ import annotations

import html
import json
import re
from importlib import resources
from pathlib import PurePath
from typing import Any

import networkx as nx

from lineage.graph.editing import edge_text, show, show_fields
from lineage.graph.model import RELATIONS, display_name
from lineage.graph.render import (
    ASSUMED_MEANING,
    ASSUMED_STYLE,
    FAMILY_TITLES,
    PREDICTION_COLOURS,
    RELATION_STYLES,
    data_uri,
    edge_label,
    prediction_family,
    to_image,
)

# Above this many nodes the page opens with the subtrees below COLLAPSED_DEPTH folded away: a
# 2,000-node family laid out at once is a wall of boxes; its upper generations are a map.
COLLAPSE_ABOVE = 400
COLLAPSED_DEPTH = 2

HF_URL = re.compile(r"https://huggingface\.co/([\w.-]+/[\w.-]+)")


def repo_ids(graph: nx.DiGraph, node: str) -> list[str]:
    """The Hugging Face repo ids a node is known under: its `hf:` id, the repo set by `lmerge edit
    --set-repo`, the catalog's `huggingface` entries, and its hub URLs."""
    attrs = graph.nodes[node]
    found = [node[3:]] if node.startswith("hf:") else []
    if isinstance(attrs.get("repo"), str):
        found.append(attrs["repo"])
    for entry in attrs.get("huggingface") or []:
        repo = entry.get("repo") if isinstance(entry, dict) else entry
        if isinstance(repo, str):
            found.append(repo)
    found += [m.group(1) for url in attrs.get("urls", []) if (m := HF_URL.match(str(url)))]
    return list(dict.fromkeys(found))


def search_text(graph: nx.DiGraph, node: str) -> str:
    """Everything a search may match, lowercased: id, names, repo ids, file names, hashes."""
    attrs = graph.nodes[node]
    terms = [node, str(attrs.get("name") or ""), *map(str, attrs.get("names", [])), *repo_ids(graph, node)]
    terms += [PurePath(str(p)).name for p in attrs.get("paths", [])]
    hashes = attrs.get("hashes")
    if isinstance(hashes, dict):
        terms += [str(v) for v in hashes.values()]
    return "\n".join(t for t in terms if t).lower()


def panel(graph: nx.DiGraph, node: str) -> dict[str, Any]:
    """What the page's panel shows for `node`: what `lmerge show` prints (editing.show, the one source of
    a node's facts, and its lines), with the URLs as links and the parents and children as node links."""
    facts = show(graph, node)
    return {
        "name": display_name(graph, node),
        "facts": [("id", node), ("origin", facts["origin"])] + [line for line in show_fields(facts)
                                                                  if line[0] != "url"],
        "urls": [str(u) for u in facts.get("urls", [])],
        "parents": [[e["id"], edge_text(e)] for e in facts.get("parents", [])],
        "children": [e["id"] for e in facts.get("children", [])],
    }


def page_data(graph: nx.DiGraph, ids: dict[str, str], focus: str | None,
              pictures: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """The JSON the page's script reads: nodes by SVG element id, edges, legend and start state;
    a node with `pictures` (image files) carries them as data URIs for its panel."""
    pictures = pictures or {}
    nodes = {}
    for node in graph:
        info = panel(graph, node)
        nodes[ids[node]] = {
            "key": node, "name": info["name"], "family": prediction_family(graph.nodes[node]) or "none",
            "search": search_text(graph, node), "facts": info["facts"], "urls": info["urls"],
            "parents": [[ids[p], line] for p, line in info["parents"]],
            "children": [ids[c] for c in info["children"]],
        }
        if pictures.get(node):
            nodes[ids[node]]["previews"] = [data_uri(path) for path in pictures[node]]
    edges = [{"id": f"{ids[p]}_{ids[c]}", "from": ids[p], "to": ids[c], "relation": attrs["relation"],
              "label": edge_label(attrs) or ""} for p, c, attrs in graph.edges(data=True)]
    depth = {ids[n]: d for n, d in _generations(graph).items()}
    collapsed = [ids[n] for n in graph if graph.number_of_nodes() > COLLAPSE_ABOVE
                 and depth[ids[n]] == COLLAPSED_DEPTH and graph.out_degree(n)]
    families = {prediction_family(attrs) for _, attrs in graph.nodes(data=True)}
    relations = {attrs["relation"] for *_, attrs in graph.edges(data=True)}
    return {
        "nodes": nodes, "edges": edges, "focus": ids.get(focus) if focus else None, "collapsed": collapsed,
        "families": [{"key": family or "none", "title": FAMILY_TITLES[family], "fill": fill, "border": border}
                     for family, (fill, border) in PREDICTION_COLOURS.items() if family in families],
        "relations": [{"key": r, "meaning": RELATIONS[r], "colour": RELATION_STYLES[r]["dot"].get("color", "#616161"),
                       "style": RELATION_STYLES[r]["dot"].get("style", "solid")} for r in RELATIONS if r in relations],
        # the legend's line for edges the catalog only assumed, when the picture has any
        "assumed": {"meaning": ASSUMED_MEANING, "colour": ASSUMED_STYLE["dot"]["color"],
                    "style": ASSUMED_STYLE["dot"]["style"]}
        if any(attrs.get("assumed") for *_, attrs in graph.edges(data=True)) else None,
    }


def _generations(graph: nx.DiGraph) -> dict[str, int]:
    """node -> its fewest generations below a root."""
    depth = {n: 0 for n in graph if graph.in_degree(n) == 0}
    frontier = list(depth)
    while frontier:
        below = []
        for node in frontier:
            for child in graph.successors(node):
                if child not in depth:
                    depth[child] = depth[node] + 1
                    below.append(child)
        frontier = below
    return depth


def _asset(name: str) -> str:
    return (resources.files("lineage.graph") / "data" / name).read_text(encoding="utf-8")


def _inline_json(data: Any) -> str:
    """JSON safe inside a <script> element: no "</" can end it early."""
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).replace("</", "<\\/")


def to_html(graph: nx.DiGraph, focus: str | None = None, title: str = "lineage family tree",
            pictures: dict[str, list[str]] | None = None) -> str:
    """The page: one HTML document with the SVG layout, our script and stylesheet, and the data.
    `pictures` (node -> image files): the first in the node's box, all of them in its panel."""
    ids = {node: f"n{i}" for i, node in enumerate(sorted(graph))}
    svg = to_image(graph, "svg", focus, legend=False, element_ids=ids, links=False,
                   pictures=pictures).decode("utf-8")
    svg = svg[svg.index("<svg"):]  # drop the XML declaration and doctype: the SVG sits inside HTML
    data = _inline_json(page_data(graph, ids, focus, pictures))
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title>",
        f"<style>\n{_asset('page.css')}</style>",
        "</head><body>",
        '<header><input id="search" type="search" placeholder="Search: name, repo id, file name, hash prefix" '
        'autocomplete="off"><ul id="results"></ul>'
        '<span id="zoom"><button id="zoom-in" title="zoom in">+</button><button id="zoom-out" title="zoom out">'
        '−</button><button id="fit" title="show everything">fit</button></span>'
        f'<span id="count">{graph.number_of_nodes()} models, {graph.number_of_edges()} relations</span></header>',
        '<aside id="side"><section id="panel" hidden></section>'
        '<section id="filters"><h2>Show</h2><div id="relation-filters"></div><div id="family-filters"></div></section>'
        '<section id="legend"><h2>Legend</h2></section></aside>',
        f'<main id="view">{svg}</main>',
        f'<script type="application/json" id="lineage-data">{data}</script>',
        f"<script>\n{_asset('page.js')}</script>",
        "</body></html>",
    ]) + "\n"
