"""Drawing a lineage graph: a text tree, Mermaid, Graphviz DOT (and SVG/PNG/PDF through `dot`),
JSON and GraphML.

The pictures follow the family charts of the catalog's source articles (docs/catalog.md): top-down,
one box per model, the epsilon models in their pale yellow. Styling is data (tables below): fill by
prediction type, shape by kind, line style by relation; merge edges carry each parent's weight;
catalog facts go into tooltips.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import networkx as nx

from lineage.errors import LineageError
from lineage.graph.interchange import to_graphml, to_json
from lineage.graph.model import AUTOV3_ID, PREDICTION_FAMILY, is_placeholder, roots

TEXT_FORMATS = ("text", "mermaid", "dot", "svg", "json", "graphml")
BINARY_FORMATS = ("png", "pdf")
FORMATS = TEXT_FORMATS + BINARY_FORMATS

# Prediction family -> (fill, border). Epsilon uses the source articles' colours (docs/catalog.md).
PREDICTION_COLOURS: dict[str | None, tuple[str, str]] = {
    "epsilon": ("#FFF9C4", "#FBC02D"),
    "v": ("#E1F5FE", "#0288D1"),
    "edm": ("#F3E5F5", "#8E24AA"),
    "edm-v": ("#F3E5F5", "#8E24AA"),
    None: ("#F5F5F5", "#9E9E9E"),  # not stated
}
PREDICTION_LABELS: dict[str, str] = {"epsilon": "eps", "epsilon+ztsnr": "eps+ztsnr", "v": "v-pred",
                                     "v+ztsnr": "v-pred+ztsnr", "edm": "edm", "edm-v": "edm v-pred"}
LINK_TEXT = "#4051B5"  # the source articles' text colour for models with a link
PLAIN_TEXT = "#212121"
KIND_SHAPES: dict[str, str] = {"checkpoint": "box", "lora": "ellipse", "locon": "ellipse", "lokr": "ellipse",
                               "loha": "ellipse"}

# relation -> DOT edge attributes, Mermaid arrow, and the label shown when there is no weight.
RELATION_STYLES: dict[str, dict[str, Any]] = {
    "finetune": {"dot": {"color": "#616161"}, "mermaid": "-->", "label": None},
    "merge": {"dot": {"color": "#8E24AA", "fontcolor": "#8E24AA", "penwidth": "1.6"}, "mermaid": "-->",
              "label": "merge"},
    "adapter": {"dot": {"color": "#00897B", "fontcolor": "#00897B", "style": "dashed"}, "mermaid": "-.->",
                "label": "adapter"},
    "trained": {"dot": {"color": "#616161", "style": "bold"}, "mermaid": "==>", "label": "trained"},
    "convert": {"dot": {"color": "#9E9E9E", "fontcolor": "#757575", "style": "dotted"}, "mermaid": "-.->",
                "label": "file"},
}

# Facts shown in tooltips, in this order: (attribute, caption).
TOOLTIP_FACTS: tuple[tuple[str, str], ...] = (
    ("maker", "maker"), ("date", "date"), ("prediction_type", "prediction"), ("architecture", "architecture"),
    ("dataset_size", "images"), ("dataset", "dataset"), ("hardware", "hardware"), ("gpu_hours", "GPU hours"),
    ("training_method", "training"), ("text_encoder_trained", "text encoder trained"),
    ("resolution", "resolution"), ("license", "licence"), ("notes", "notes"),
)
PROMPT_FACTS: tuple[tuple[str, str], ...] = (
    ("quality_tags", "quality tags"), ("negative", "negative"), ("sampler", "sampler"), ("steps", "steps"),
    ("cfg", "CFG"),
)
ARCHITECTURE_TITLES: dict[str, str] = {"sdxl": "SDXL", "sd1": "SD 1.x", "sd2": "SD 2.x",
                                       "other": "architecture not known"}
TOOLTIP_TEXT_LIMIT = 300  # characters per fact; notes can be long


def _family(attrs: dict[str, Any]) -> str | None:
    return PREDICTION_FAMILY.get(attrs.get("prediction_type") or "")


def _is_file(attrs: dict[str, Any]) -> bool:
    return "format" in attrs  # set when a file was read (a node only named in metadata has none)


def short_id(node_id: str) -> str:
    """A node id as people read it: AutoV3 ids shortened to Civitai's 12 digits."""
    return node_id[:12] if AUTOV3_ID.match(node_id) else node_id  # also `<AutoV3>+v` (markers)


def _count(n: int) -> str:
    return f"{n / 1e6:.3g}M" if n >= 1_000_000 else f"{n / 1e3:.3g}k" if n >= 1000 else str(n)


def summary(attrs: dict[str, Any]) -> list[str]:
    """Short facts for a label: prediction type, maker, date, dataset size, GPU hours."""
    facts = []
    if attrs.get("prediction_type") and attrs.get("prediction_source") != "default":
        facts.append(PREDICTION_LABELS.get(attrs["prediction_type"], attrs["prediction_type"]))
    if attrs.get("kind") and attrs["kind"] != "checkpoint":
        facts.append(attrs["kind"])
    facts += [str(attrs[k]) for k in ("maker", "date") if attrs.get(k)]
    if attrs.get("dataset_size"):
        facts.append(f"{_count(attrs['dataset_size'])} images")
    if attrs.get("gpu_hours"):
        facts.append(f"{_count(attrs['gpu_hours'])} GPU h")
    return facts


def tooltip(node_id: str, attrs: dict[str, Any]) -> str:
    lines = [str(attrs.get("name") or node_id), f"id: {node_id}"]
    for key, caption in TOOLTIP_FACTS:
        if attrs.get(key) not in (None, ""):
            lines.append(f"{caption}: {str(attrs[key])[:TOOLTIP_TEXT_LIMIT]}")
    prompt = attrs.get("prompt") or {}
    lines += [f"{caption}: {prompt[key]}" for key, caption in PROMPT_FACTS if prompt.get(key)]
    lines += [f"file: {p}" for p in attrs.get("paths", [])[:3]]
    return "\n".join(lines)


def edge_label(attrs: dict[str, Any]) -> str | None:
    """A merge edge shows its weight; other relations their name (fine-tunes nothing)."""
    if attrs.get("weight") is not None:
        return f"{attrs['weight']:.3g}"
    return RELATION_STYLES[attrs["relation"]]["label"]


def _natural_key(graph: nx.DiGraph) -> Callable[[str], tuple]:
    """Sort siblings by name with version numbers compared as numbers (0.75 < 0.9 < 1.0)."""
    def key(node: str) -> tuple:
        name = str(graph.nodes[node].get("name") or node).lower()
        return tuple((0, float(part), "") if re.fullmatch(r"\d+(\.\d+)?", part) else (1, 0.0, part)
                     for part in re.findall(r"\d+(?:\.\d+)?|[^\d]+", name))
    return key


# ---------------------------------------------------------------------------------------------
# Text


def to_text(graph: nx.DiGraph, focus: str | None = None) -> str:
    """A tree for terminals: each model under its parents; a merge (several parents) appears under
    each of them marked with ⊕ and its weight, and its own children are shown once."""
    order = _natural_key(graph)
    lines: list[str] = []
    shown: set[str] = set()

    def line(node: str, prefix: str, via: dict[str, Any] | None) -> str:
        attrs = graph.nodes[node]
        name = str(attrs.get("name") or node)
        merge = graph.in_degree(node) > 1 or (via is not None and via["relation"] == "merge")
        parts = [("⊕ " if merge else "") + name]
        if name != node:
            parts.append(f"[{short_id(node)}]")
        facts = summary(attrs)
        how = RELATION_STYLES[via["relation"]]["label"] if via is not None else None
        if how:
            facts.insert(0, how + (f" {via['weight']:.3g}" if via.get("weight") is not None else ""))
        if facts:
            parts.append("(" + ", ".join(facts) + ")")
        if node == focus:
            parts.append("◀")
        if node in shown and graph.out_degree(node):
            parts.append("… see above")
        return prefix + "  ".join(parts)

    def walk(node: str, prefix: str, child_prefix: str, via: dict[str, Any] | None) -> None:
        lines.append(line(node, prefix, via))
        if node in shown:
            return
        shown.add(node)
        children = sorted(graph.successors(node), key=order)
        for i, child in enumerate(children):
            last = i == len(children) - 1
            walk(child, child_prefix + ("└─ " if last else "├─ "), child_prefix + ("   " if last else "│  "),
                 graph.edges[node, child])

    # The biggest family first, then by name.
    for root in sorted(roots(graph), key=lambda r: (-len(nx.descendants(graph, r)), order(r))):
        walk(root, "", "", None)
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Graphviz DOT


def _dot_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _html(value: str) -> str:
    return value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def _dot_attrs(attrs: dict[str, str]) -> str:
    """DOT attributes; a label that starts with "<" is an HTML-like label and is written as it is."""
    return ", ".join(f"{k}={v}" if k == "label" and v.startswith("<") else f"{k}={_dot_string(v)}"
                     for k, v in attrs.items())


def _dot_node(node: str, attrs: dict[str, Any], focus: str | None) -> dict[str, str]:
    fill, border = PREDICTION_COLOURS[_family(attrs)]
    name = str(attrs.get("name") or node)
    lines = [f"<B>{_html(name)}</B>"]
    facts = summary(attrs)
    if _is_file(attrs):
        facts.append(f"AutoV3 {short_id(node)}")
    if facts:
        lines.append(f'<FONT POINT-SIZE="9">{_html(" · ".join(facts))}</FONT>')
    style = ["rounded", "filled"] + (["dashed"] if is_placeholder(node) else [])
    dot = {
        "label": "<" + "<BR/>".join(lines) + ">",
        "shape": KIND_SHAPES.get(attrs.get("kind"), "box"),
        "style": ",".join(style),
        "fillcolor": "#FFFFFF" if is_placeholder(node) else fill,
        "color": border,
        "fontcolor": LINK_TEXT if attrs.get("urls") else PLAIN_TEXT,
        "tooltip": tooltip(node, attrs),
    }
    if attrs.get("urls"):
        dot.update(URL=attrs["urls"][0], target="_blank")
    if _is_file(attrs):
        dot["penwidth"] = "2.2"
    if node == focus:
        dot.update(penwidth="3.5", color="#D84315")
    return dot


def to_dot(graph: nx.DiGraph, focus: str | None = None) -> str:
    """Graphviz DOT, laid out top-down; node ids are the graph's ids."""
    order = _natural_key(graph)
    out = [
        "digraph lineage {",
        '  graph [rankdir=TB, fontname="Helvetica", nodesep=0.25, ranksep=0.45, bgcolor="white", tooltip="lineage"];',
        '  node [fontname="Helvetica", fontsize=11, margin="0.15,0.06", height=0.4];',
        '  edge [fontname="Helvetica", fontsize=9, arrowsize=0.7, color="#616161"];',
    ]
    by_architecture: dict[str, list[str]] = {}
    for node in sorted(graph, key=order):
        by_architecture.setdefault(graph.nodes[node].get("architecture") or "other", []).append(node)
    boxed = len(by_architecture) > 1  # architectures never mix: show each in its own box
    for architecture, nodes in sorted(by_architecture.items(), key=lambda item: -len(item[1])):
        indent = "    " if boxed else "  "
        if boxed:
            out.append(f"  subgraph {_dot_string('cluster_' + architecture)} {{")
            out.append(f"    graph [label={_dot_string(ARCHITECTURE_TITLES.get(architecture, architecture))}, "
                       'style="rounded,dashed", color="#BDBDBD", fontcolor="#757575", fontsize=12];')
        for node in nodes:
            out.append(f"{indent}{_dot_string(node)} [{_dot_attrs(_dot_node(node, graph.nodes[node], focus))}];")
        # Models without any relation are stacked in a column rather than spread along the top rank.
        alone = [n for n in nodes if graph.degree(n) == 0]
        out += [f"{indent}{_dot_string(a)} -> {_dot_string(b)} [style=invis];" for a, b in zip(alone, alone[1:])]
        if boxed:
            out.append("  }")
    for parent, child in sorted(graph.edges, key=lambda e: (order(e[0]), order(e[1]))):
        attrs = graph.edges[parent, child]
        dot = dict(RELATION_STYLES[attrs["relation"]]["dot"])
        label = edge_label(attrs)
        if label:
            dot["label"] = " " + label
        note = attrs.get("note") or (attrs.get("params") or {}).get("method")
        dot["tooltip"] = f"{attrs['relation']}" + (f": {note}" if note else "")
        out.append(f"  {_dot_string(parent)} -> {_dot_string(child)} [{_dot_attrs(dot)}];")
    out.append("}")
    return "\n".join(out) + "\n"


def to_image(graph: nx.DiGraph, fmt: str, focus: str | None = None) -> bytes:
    """SVG, PNG or PDF laid out by Graphviz's `dot` program."""
    import graphviz  # imported here: only image output needs it

    try:
        return graphviz.Source(to_dot(graph, focus)).pipe(format=fmt)
    except graphviz.ExecutableNotFound:
        raise LineageError("Graphviz's `dot` program is not installed (Debian/Ubuntu: apt-get install graphviz); "
                           "--format dot, mermaid and text work without it") from None
    except graphviz.CalledProcessError as e:
        first_lines = e.stderr.decode(errors="replace").strip().splitlines()[:3]
        raise LineageError(f"Graphviz's dot failed: {' / '.join(first_lines)}") from None


# ---------------------------------------------------------------------------------------------
# Mermaid


def _mermaid_text(value: str) -> str:
    """Text inside a Mermaid label: quotes and angle brackets as Mermaid's entity codes."""
    return value.replace('"', "#quot;").replace("<", "#lt;").replace(">", "#gt;").replace("\n", " ")


MERMAID_CLASSES: dict[str, str] = {
    family or "unknown": f"fill:{fill},stroke:{border},stroke-width:2px,color:{PLAIN_TEXT}"
    for family, (fill, border) in PREDICTION_COLOURS.items()
}


def to_mermaid(graph: nx.DiGraph, focus: str | None = None) -> str:
    """A Mermaid flowchart like the source articles' charts (renders on GitHub and in MkDocs)."""
    order = _natural_key(graph)
    nodes = sorted(graph, key=order)
    ids = {node: f"n{i}" for i, node in enumerate(nodes)}
    out = ["flowchart TD", "", "%% Nodes"]
    for node in nodes:
        attrs = graph.nodes[node]
        name = _mermaid_text(str(attrs.get("name") or node))
        shape = ('(["', '"])') if KIND_SHAPES.get(attrs.get("kind"), "box") == "ellipse" else ('["', '"]')
        out.append(f"{ids[node]}{shape[0]}{name}{shape[1]}")
    out += ["", "%% Relationships between models"]
    for parent, child in sorted(graph.edges, key=lambda e: (order(e[0]), order(e[1]))):
        attrs = graph.edges[parent, child]
        arrow = RELATION_STYLES[attrs["relation"]]["mermaid"]
        label = edge_label(attrs)
        out.append(f"{ids[parent]} {arrow}{f'|{_mermaid_text(label)}|' if label else ''} {ids[child]}")
    links = [(node, graph.nodes[node]["urls"][0]) for node in nodes if graph.nodes[node].get("urls")]
    if links:
        out += ["", "%% Clickable links"]
        out += [f'click {ids[node]} "{url}" "{_mermaid_text(", ".join(summary(graph.nodes[node])) or node)}"'
                for node, url in links]
    out += ["", "%% Styling"]
    by_class: dict[str, list[str]] = {}
    for node in nodes:
        by_class.setdefault(_family(graph.nodes[node]) or "unknown", []).append(ids[node])
    out += [f"classDef {name} {MERMAID_CLASSES[name]};" for name in by_class]
    out += [f"class {','.join(members)} {name};" for name, members in by_class.items()]
    linked = [ids[node] for node, _ in links]
    if linked:
        out.append(f"classDef link color:{LINK_TEXT};")
        out.append(f"class {','.join(linked)} link;")
    if focus in ids:
        out.append(f"style {ids[focus]} stroke:#D84315,stroke-width:4px")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------

RENDERERS: dict[str, Callable[[nx.DiGraph, str | None], str]] = {
    "text": to_text, "mermaid": to_mermaid, "dot": to_dot,
    "json": lambda graph, focus: to_json(graph), "graphml": lambda graph, focus: to_graphml(graph),
}


def render(graph: nx.DiGraph, fmt: str, focus: str | None = None) -> str | bytes:
    """The graph in `fmt` (one of FORMATS); png and pdf are bytes, the rest text."""
    if fmt in RENDERERS:
        return RENDERERS[fmt](graph, focus)
    if fmt in ("svg",) + BINARY_FORMATS:
        image = to_image(graph, fmt, focus)
        return image.decode("utf-8") if fmt == "svg" else image
    raise LineageError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")


def format_for_path(path: str, default: str = "text") -> str:
    """The format an output file's extension asks for (.svg, .png, .mmd, .gv, ...)."""
    extensions = {"svg": "svg", "png": "png", "pdf": "pdf", "dot": "dot", "gv": "dot", "mmd": "mermaid",
                  "mermaid": "mermaid", "json": "json", "graphml": "graphml", "txt": "text"}
    return extensions.get(path.rsplit(".", 1)[-1].lower(), default) if "." in path else default

