"""Drawing a lineage graph: a text tree, Mermaid, Graphviz DOT (and SVG/PNG/PDF through `dot`),
JSON and GraphML.

The pictures follow the family charts of the catalog's source articles (docs/catalog.md): top-down,
one box per model, the epsilon models in their pale yellow. Styling is data (tables below): fill by
prediction type, shape by kind, line style by relation; merge edges say their method and each
parent's weight; a legend explains what the picture uses; catalog facts go into tooltips.
"""
from __future__ import annotations

import base64
import re
from collections.abc import Callable
from typing import Any

import networkx as nx

from lineage.errors import LineageError
from lineage.graph.interchange import to_graphml, to_json
from lineage.graph.model import (
    ADAPTER_KINDS,
    AUTOV3_ID,
    PREDICTION_FAMILY,
    RELATIONS,
    is_placeholder,
    roots,
)

TEXT_FORMATS = ("text", "mermaid", "dot", "svg", "html", "json", "graphml")
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
FAMILY_TITLES: dict[str | None, str] = {"epsilon": "ε-prediction (eps)", "v": "v-prediction", "edm": "EDM",
                                         "edm-v": "EDM v-prediction", None: "prediction type not stated"}
PREDICTION_LABELS: dict[str, str] = {"epsilon": "eps", "epsilon+ztsnr": "eps+ztsnr", "v": "v-pred",
                                     "v+ztsnr": "v-pred+ztsnr", "edm": "edm", "edm-v": "edm v-pred"}
LINK_TEXT = "#4051B5"  # the source articles' text colour for models with a link
PLAIN_TEXT = "#212121"
KIND_SHAPES: dict[str, str] = {"checkpoint": "box", "lora": "ellipse", "locon": "ellipse", "lokr": "ellipse",
                               "loha": "ellipse"}

# relation -> DOT edge attributes and Mermaid arrow. Every picture names a relation by its key in
# model.RELATIONS (the word `--relation` takes), so a tree, `show` and `compat` say the same thing.
RELATION_STYLES: dict[str, dict[str, Any]] = {
    "finetune": {"dot": {"color": "#616161"}, "mermaid": "-->"},
    "merge": {"dot": {"color": "#8E24AA", "fontcolor": "#8E24AA", "penwidth": "1.6"}, "mermaid": "-->"},
    "adapter": {"dot": {"color": "#00897B", "fontcolor": "#00897B", "style": "dashed"}, "mermaid": "-.->"},
    "trained": {"dot": {"color": "#616161", "style": "bold"}, "mermaid": "==>"},
    "convert": {"dot": {"color": "#9E9E9E", "fontcolor": "#757575", "style": "dotted"}, "mermaid": "-.->"},
}
UNLABELLED_RELATIONS = frozenset({"finetune"})  # the plain line; the legend says what it is
# An edge the catalog only assumed (its `assumed` reason): dashed in orange, apart from the teal dashed
# adapter line; its tooltip gives the reason.
ASSUMED_STYLE: dict[str, Any] = {"dot": {"style": "dashed", "color": "#EF6C00", "fontcolor": "#EF6C00"},
                                 "mermaid": "-.->"}
ASSUMED_MEANING = "assumed: no source states this relation"
PICTURE_POINTS = 96  # side of the square a node's preview image is drawn in (tree --previews)
TEXT_WIDTH = 80  # columns of the text tree, unless told (a terminal's width)

# Merge methods as people write them (our registry's names, and A1111's "Weighted sum" lowered).
METHOD_TITLES: dict[str, str] = {
    "weighted_sum": "weighted sum", "add_difference": "add difference", "train_difference": "train difference",
    "slerp": "slerp", "linear": "linear", "geometric_median": "geometric median",
    "task_arithmetic": "task arithmetic", "ties": "TIES", "dare_linear": "DARE", "dare_ties": "DARE-TIES",
    "della": "DELLA", "breadcrumbs": "breadcrumbs", "model_stock": "model stock",
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
OWN_ROOTS_TITLE = "your models without a catalog parent"
TOOLTIP_TEXT_LIMIT = 300  # characters per fact; notes can be long


def prediction_family(attrs: dict[str, Any]) -> str | None:
    """The prediction family (PREDICTION_FAMILY) of a node's attributes; None when not stated."""
    return PREDICTION_FAMILY.get(attrs.get("prediction_type") or "")


def files_you_have(node: str, attrs: dict[str, Any]) -> list[str]:
    """The ids (AutoV3) of the files a node stands for: its own when a file was read for it (`format` is
    set then; a node only named in metadata has none), else the files linked to it (a catalog model
    you downloaded: `files` entries with `linked`, folded in by fold_aliases)."""
    if "format" in attrs:
        return [node]
    return [f["linked"] for f in attrs.get("files", ()) if isinstance(f, dict) and f.get("linked")]


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


def merge_method(attrs: dict[str, Any]) -> str | None:
    """The method of a merge edge as people write it ("TIES", "add difference"), "block " before it
    when the recipe gives the blocks their own weights; None when the metadata does not say."""
    params = attrs.get("params") or {}
    method = params.get("method") if isinstance(params, dict) else None
    if not isinstance(method, str) or not method:
        return None
    title = METHOD_TITLES.get(method.strip().lower().replace(" ", "_"), method)
    return f"block {title}" if block_weights(attrs) else title


def block_weights(attrs: dict[str, Any]) -> dict[str, dict[str, float]]:
    """A block merge's per-block values from our recipe: parameter -> {block: value}."""
    params = attrs.get("params") or {}
    recipe = params.get("recipe") if isinstance(params, dict) else None
    per_key = recipe.get("per_key") if isinstance(recipe, dict) else None
    if not isinstance(per_key, dict):
        return {}
    return {name: spec["blocks"] for name, spec in per_key.items()
            if isinstance(spec, dict) and isinstance(spec.get("blocks"), dict)}


def edge_label(attrs: dict[str, Any]) -> str | None:
    """What an edge says: a merge its method and this parent's weight ("TIES", "weighted sum 0.7";
    a block merge's weight varies by block, so it shows none), other relations their name, a
    fine-tune nothing."""
    relation = attrs["relation"]
    method = merge_method(attrs) if relation == "merge" else None
    weight = attrs.get("weight")
    parts = [method or ("" if relation in UNLABELLED_RELATIONS and weight is None else relation)]
    if weight is not None and not (method and method.startswith("block ")):
        parts.append(f"{weight:.3g}")
    return " ".join(p for p in parts if p) or None


def edge_dot_style(attrs: dict[str, Any]) -> dict[str, str]:
    """The DOT line of an edge: its relation's, or the assumed one when the catalog only assumed it."""
    dot = dict(RELATION_STYLES[attrs["relation"]]["dot"])
    if attrs.get("assumed"):
        dot.update(ASSUMED_STYLE["dot"])
    return dot


def assumed_label(attrs: dict[str, Any]) -> str | None:
    """An edge's label with "assumed" after it when the catalog only assumed it ("finetune, assumed")."""
    label = edge_label(attrs)
    if not attrs.get("assumed"):
        return label
    return f"{label or attrs['relation']}, assumed"


def edge_tooltip(attrs: dict[str, Any]) -> str:
    """The edge's relation, meaning, why it is assumed, method, weight, block weights and note, one per line."""
    lines = [f"{attrs['relation']}: {RELATIONS[attrs['relation']]}"]
    if attrs.get("assumed"):
        lines.append(f"assumed: {str(attrs['assumed'])[:TOOLTIP_TEXT_LIMIT]}")
    if merge_method(attrs):
        lines.append(f"method: {merge_method(attrs)}")
    if attrs.get("weight") is not None:
        lines.append(f"weight: {attrs['weight']:.3g}")
    for name, blocks in block_weights(attrs).items():
        lines.append(f"{name} by block: " + ", ".join(f"{b} {v:.3g}" for b, v in blocks.items()))
    if attrs.get("note"):
        lines.append(str(attrs["note"])[:TOOLTIP_TEXT_LIMIT])
    return "\n".join(lines)


def _natural_key(graph: nx.DiGraph) -> Callable[[str], tuple]:
    """Sort siblings by name with version numbers compared as numbers (0.75 < 0.9 < 1.0)."""
    def key(node: str) -> tuple:
        name = str(graph.nodes[node].get("name") or node).lower()
        return tuple((0, float(part), "") if re.fullmatch(r"\d+(\.\d+)?", part) else (1, 0.0, part)
                     for part in re.findall(r"\d+(?:\.\d+)?|[^\d]+", name))
    return key


# ---------------------------------------------------------------------------------------------
# Text


def to_text(graph: nx.DiGraph, focus: str | None = None, width: int | None = TEXT_WIDTH) -> str:
    """A tree for terminals: each model under its parents; a merge (several parents) appears under
    each of them marked with ⊕ and its weight, and its own children are shown once. Each line fits
    `width` characters (None: no limit): the model's last facts go first, then the name is shortened
    with "…"; the relation (how it came from the parent) and the node id are never cut."""
    order = _natural_key(graph)
    lines: list[str] = []
    shown: set[str] = set()

    def line(node: str, prefix: str, via: dict[str, Any] | None) -> str:
        attrs = graph.nodes[node]
        name = str(attrs.get("name") or node)
        mark = "⊕ " if graph.in_degree(node) > 1 or (via is not None and via["relation"] == "merge") else ""
        how = assumed_label(via) if via is not None else None
        facts = summary(attrs)  # most important first: the last ones go first when the line is too long
        tail = (["◀"] if node == focus else []) + (["… see above"] if node in shown and graph.out_degree(node) else [])

        shown_id = name != node  # the id in brackets; else the name is the id

        def compose(name: str, facts: list[str], how: str | None) -> str:
            parts = [mark + name] + ([f"[{short_id(node)}]"] if shown_id else [])
            told = ([how] if how else []) + facts
            if told:
                parts.append("(" + ", ".join(told) + ")")
            return prefix + "  ".join(parts + tail)

        text = compose(name, facts, how)
        while width is not None and len(text) > width and facts:
            facts = facts[:-1]
            text = compose(name, facts, how)
        if width is not None and len(text) > width and shown_id and len(name) > 1:
            name = name[:max(1, len(name) - (len(text) - width) - 1)].rstrip() + "…"
            text = compose(name, facts, how)
        return text

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

    # The biggest family first, then by name; beside the catalog, the user's own roots under a heading.
    ranked = sorted(roots(graph), key=lambda r: (-len(nx.descendants(graph, r)), order(r)))
    own = [r for r in ranked if is_own_root(graph, r)]
    apart = bool(own) and any(attrs.get("source") == "catalog" for _, attrs in graph.nodes(data=True))
    for root in ranked:
        if not (apart and root in own):
            walk(root, "", "", None)
    if apart:
        lines += ["", OWN_ROOTS_TITLE + ":"]
        for root in own:
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


def _dot_node(node: str, attrs: dict[str, Any], focus: str | None, links: bool,
              picture: str | None = None) -> dict[str, str]:
    fill, border = PREDICTION_COLOURS[prediction_family(attrs)]
    name = str(attrs.get("name") or node)
    lines = [f"<B>{_html(name)}</B>"]
    facts = summary(attrs)
    files = files_you_have(node, attrs)
    if files:
        facts.append(f"AutoV3 {', '.join(short_id(f) for f in files)}")
    if facts:
        lines.append(f'<FONT POINT-SIZE="9">{_html(" · ".join(facts))}</FONT>')
    text = "<BR/>".join(lines)
    if picture:  # the image above the text, scaled into a fixed square (a picture of any shape fits)
        text = ('<TABLE BORDER="0" CELLBORDER="0" CELLSPACING="0" CELLPADDING="1"><TR><TD FIXEDSIZE="TRUE" '
                f'WIDTH="{PICTURE_POINTS}" HEIGHT="{PICTURE_POINTS}"><IMG SRC="{_html(picture)}" SCALE="TRUE"/>'
                f"</TD></TR><TR><TD>{text}</TD></TR></TABLE>")
    style = ["rounded", "filled"] + (["dashed"] if is_placeholder(node) else [])
    dot = {
        "label": "<" + text + ">",
        "shape": KIND_SHAPES.get(attrs.get("kind"), "box"),
        "style": ",".join(style),
        "fillcolor": "#FFFFFF" if is_placeholder(node) else fill,
        "color": border,
        "fontcolor": LINK_TEXT if attrs.get("urls") else PLAIN_TEXT,
        "tooltip": tooltip(node, attrs),
    }
    if attrs.get("urls") and links:
        dot.update(URL=attrs["urls"][0], target="_blank")
    if files:
        dot["penwidth"] = "2.2"
    if node == focus:
        dot.update(penwidth="3.5", color="#D84315")
    return dot


def is_own_root(graph: nx.DiGraph, node: str) -> bool:
    """A model of the user's (not the built-in catalog's) without any parent in the graph."""
    return graph.in_degree(node) == 0 and graph.nodes[node].get("source") != "catalog"


def _legend(graph: nx.DiGraph) -> list[str]:
    """A DOT cluster explaining the colours, shapes and lines this graph uses (only those)."""
    out = ['  subgraph "cluster_legend" {',
           '    graph [label="legend", style="rounded", color="#BDBDBD", fontcolor="#757575", fontsize=12];',
           '    node [fontsize=9, height=0.3, margin="0.1,0.03"];']
    families = {prediction_family(attrs) for _, attrs in graph.nodes(data=True)}
    entries = [(f"legend:{family}",) * 2 for family in PREDICTION_COLOURS if family in families]  # (top, bottom)
    for family in PREDICTION_COLOURS:
        if family in families:
            fill, border = PREDICTION_COLOURS[family]
            out.append(f"    {_dot_string(f'legend:{family}')} [label={_dot_string(FAMILY_TITLES[family])}, "
                       f'shape="box", style="rounded,filled", fillcolor="{fill}", color="{border}"];')
    if any(files_you_have(node, attrs) for node, attrs in graph.nodes(data=True)):
        entries.append(("legend:file",) * 2)
        out.append('    "legend:file" [label="a file you have (AutoV3)", shape="box", style="rounded", '
                   'penwidth="2.2"];')
    if any(is_placeholder(node) for node in graph):
        entries.append(("legend:placeholder",) * 2)
        out.append('    "legend:placeholder" [label="named in metadata, not seen yet", shape="box", '
                   'style="rounded,dashed"];')
    if any(attrs.get("kind") in ADAPTER_KINDS for _, attrs in graph.nodes(data=True)):
        entries.append(("legend:adapter",) * 2)
        out.append('    "legend:adapter" [label="an adapter (LoRA, LoKr, ...)", shape="ellipse"];')
    relations = {attrs["relation"] for *_, attrs in graph.edges(data=True)}
    for relation in RELATIONS:
        if relation in relations:
            a, b = f"legend:{relation}:from", f"legend:{relation}:to"
            out.append(f'    {_dot_string(a)} [label="", shape="point", width=0.05];')
            out.append(f'    {_dot_string(b)} [label="", shape="point", width=0.05];')
            style = {**RELATION_STYLES[relation]["dot"], "label": " " + relation, "tooltip": RELATIONS[relation]}
            out.append(f"    {_dot_string(a)} -> {_dot_string(b)} [{_dot_attrs(style)}];")
            entries.append((a, b))
    if any(attrs.get("assumed") for *_, attrs in graph.edges(data=True)):
        a, b = "legend:assumed:from", "legend:assumed:to"
        out.append(f'    {_dot_string(a)} [label="", shape="point", width=0.05];')
        out.append(f'    {_dot_string(b)} [label="", shape="point", width=0.05];')
        style = {**ASSUMED_STYLE["dot"], "label": " assumed", "tooltip": ASSUMED_MEANING}
        out.append(f"    {_dot_string(a)} -> {_dot_string(b)} [{_dot_attrs(style)}];")
        entries.append((a, b))
    # One row under the tree, not a column beside it, so that the picture keeps the tree's own shape: every
    # entry in one rank, in this order, each edge sample drawn across; the row hangs from the deepest models.
    row = list(dict.fromkeys(end for entry in entries for end in entry))
    out.append("    { rank=same; " + " ".join(f"{_dot_string(n)};" for n in row) + " }")
    out += [f"    {_dot_string(a[1])} -> {_dot_string(b[0])} [style=invis];" for a, b in zip(entries, entries[1:])]
    out.append("  }")
    out += [f"  {_dot_string(node)} -> {_dot_string(row[0])} [style=invis];" for node in _deepest(graph)]
    return out


def _deepest(graph: nx.DiGraph) -> list[str]:
    """The models the most generations below a root: the bottom rank of the tree (every childless model,
    should the graph hold a cycle). Only they point at the legend, so that no other model is pulled down."""
    try:
        order = list(nx.topological_sort(graph))
    except nx.NetworkXUnfeasible:
        return [node for node in graph if graph.out_degree(node) == 0]
    depth: dict[str, int] = {}
    for node in order:
        depth[node] = max((depth[parent] + 1 for parent in graph.predecessors(node)), default=0)
    return [node for node in order if depth[node] == max(depth.values())]


def to_dot(graph: nx.DiGraph, focus: str | None = None, *, legend: bool = True,
           element_ids: dict[str, str] | None = None, links: bool = True,
           pictures: dict[str, list[str]] | None = None) -> str:
    """Graphviz DOT, laid out top-down; node ids are the graph's ids. `legend` adds a box explaining
    colours and lines; `element_ids` (node -> id) names the SVG elements (edges: "<parent id>_<child
    id>"), for a page that scripts them; `links=False` leaves out the nodes' hyperlinks; `pictures`
    (node -> image files) puts a node's first image in its box (lineage/graph/previews.py)."""
    pictures = pictures or {}
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
    has_catalog = any(attrs.get("source") == "catalog" for _, attrs in graph.nodes(data=True))

    def node_line(node: str, indent: str) -> str:
        attrs = _dot_node(node, graph.nodes[node], focus, links, (pictures.get(node) or [None])[0])
        if element_ids:
            attrs["id"] = element_ids[node]
        return f"{indent}{_dot_string(node)} [{_dot_attrs(attrs)}];"

    for architecture, nodes in sorted(by_architecture.items(), key=lambda item: -len(item[1])):
        indent = "    " if boxed else "  "
        if boxed:
            out.append(f"  subgraph {_dot_string('cluster_' + architecture)} {{")
            out.append(f"    graph [label={_dot_string(ARCHITECTURE_TITLES.get(architecture, architecture))}, "
                       'style="rounded,dashed", color="#BDBDBD", fontcolor="#757575", fontsize=12];')
        # Beside the catalog, the user's own roots sit in a box of their own: not mistaken for its families.
        own_roots = [n for n in nodes if has_catalog and is_own_root(graph, n)]
        if own_roots:
            out.append(f"{indent}subgraph {_dot_string('cluster_own_' + architecture)} {{")
            out.append(f'{indent}  graph [label="{OWN_ROOTS_TITLE}", style="rounded", '
                       'color="#D84315", fontcolor="#D84315", fontsize=11];')
            out += [node_line(node, indent + "  ") for node in own_roots]
            out.append(f"{indent}}}")
        out += [node_line(node, indent) for node in nodes if node not in own_roots]
        # Models without any relation are stacked in a column rather than spread along the top rank.
        alone = [n for n in nodes if graph.degree(n) == 0]
        out += [f"{indent}{_dot_string(a)} -> {_dot_string(b)} [style=invis];" for a, b in zip(alone, alone[1:])]
        if boxed:
            out.append("  }")
    for parent, child in sorted(graph.edges, key=lambda e: (order(e[0]), order(e[1]))):
        attrs = graph.edges[parent, child]
        dot = edge_dot_style(attrs)
        label = edge_label(attrs)
        if label:
            dot["label"] = " " + label
        dot["tooltip"] = edge_tooltip(attrs)
        if element_ids:
            dot["id"] = f"{element_ids[parent]}_{element_ids[child]}"
        out.append(f"  {_dot_string(parent)} -> {_dot_string(child)} [{_dot_attrs(dot)}];")
    if legend and graph.number_of_nodes():
        out += _legend(graph)
    out.append("}")
    return "\n".join(out) + "\n"


def to_image(graph: nx.DiGraph, fmt: str, focus: str | None = None, **dot_options: Any) -> bytes:
    """SVG, PNG or PDF laid out by Graphviz's `dot` program (`dot_options` go to `to_dot`). An SVG
    carries its pictures inside (data URIs), so it still shows them when moved or sent."""
    import graphviz  # imported here: only image output needs it

    try:
        image = graphviz.Source(to_dot(graph, focus, **dot_options)).pipe(format=fmt)
    except graphviz.ExecutableNotFound:
        raise LineageError("Graphviz's `dot` program is not installed (Debian/Ubuntu: apt-get install graphviz); "
                           "--format dot, mermaid and text work without it") from None
    except graphviz.CalledProcessError as e:
        first_lines = e.stderr.decode(errors="replace").strip().splitlines()[:3]
        raise LineageError(f"Graphviz's dot failed: {' / '.join(first_lines)}") from None
    if fmt == "svg":
        image = _embed_pictures(image, [p for paths in (dot_options.get("pictures") or {}).values() for p in paths[:1]])
    return image


def data_uri(path: str) -> str:
    """A PNG file as a `data:` URI: a picture that does not depend on where the file is."""
    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode("ascii")


def _embed_pictures(svg: bytes, paths: list[str]) -> bytes:
    """Graphviz's SVG links each picture by its path; the picture's bytes go in its place."""
    for path in paths:
        svg = svg.replace(f'xlink:href="{_html(path)}"'.encode(), f'xlink:href="{data_uri(path)}"'.encode())
    return svg


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
        arrow = (ASSUMED_STYLE if attrs.get("assumed") else RELATION_STYLES[attrs["relation"]])["mermaid"]
        label = assumed_label(attrs)
        out.append(f"{ids[parent]} {arrow}{f'|{_mermaid_text(label)}|' if label else ''} {ids[child]}")
    links = [(node, graph.nodes[node]["urls"][0]) for node in nodes if graph.nodes[node].get("urls")]
    if links:
        out += ["", "%% Clickable links"]
        out += [f'click {ids[node]} "{url}" "{_mermaid_text(", ".join(summary(graph.nodes[node])) or node)}"'
                for node, url in links]
    out += ["", "%% Styling"]
    by_class: dict[str, list[str]] = {}
    for node in nodes:
        by_class.setdefault(prediction_family(graph.nodes[node]) or "unknown", []).append(ids[node])
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


PICTURE_FORMATS = ("svg", "html") + BINARY_FORMATS  # the formats that can show preview images


def render(graph: nx.DiGraph, fmt: str, focus: str | None = None,
           pictures: dict[str, list[str]] | None = None) -> str | bytes:
    """The graph in `fmt` (one of FORMATS); png and pdf are bytes, the rest text. `pictures` (node ->
    image files) are drawn in the PICTURE_FORMATS."""
    if fmt in RENDERERS:
        return RENDERERS[fmt](graph, focus)
    if fmt == "html":
        from lineage.graph.page import to_html  # the page builds on this module

        return to_html(graph, focus, pictures=pictures)
    if fmt in ("svg",) + BINARY_FORMATS:
        image = to_image(graph, fmt, focus, pictures=pictures)
        return image.decode("utf-8") if fmt == "svg" else image
    raise LineageError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")


def format_for_path(path: str, default: str = "text") -> str:
    """The format an output file's extension asks for (.svg, .png, .mmd, .gv, ...)."""
    extensions = {"svg": "svg", "png": "png", "pdf": "pdf", "dot": "dot", "gv": "dot", "mmd": "mermaid",
                  "mermaid": "mermaid", "json": "json", "graphml": "graphml", "txt": "text",
                  "html": "html", "htm": "html"}
    return extensions.get(path.rsplit(".", 1)[-1].lower(), default) if "." in path else default

