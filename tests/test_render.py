"""Rendering (lineage/render.py) and `lmerge tree`: structure of text, DOT, Mermaid, JSON and GraphML."""
import json
import re
import shutil

import networkx as nx
import pytest

from lineage import LineageError, hash_file
from lineage.graph.catalog import catalog_graph
from lineage.graph.interchange import from_graphml
from lineage.graph.model import add_lineage_edge, neighbourhood
from lineage.graph.render import edge_label, render, to_dot, to_image, to_mermaid, to_text

needs_dot = pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot is not installed")


@pytest.fixture
def merge_family():
    """base (eps) -> a, base -> b (v-pred), a + b -> m (merge 0.3 / 0.7), m -> m2; base -> lora (adapter)."""
    g = nx.DiGraph()
    g.add_node("base", name="Base", prediction_type="epsilon", maker="Lab", date="2024-01",
               urls=["https://example.org/base"])
    g.add_node("a", name="Model A")
    g.add_node("b", name="Model B", prediction_type="v")
    g.add_node("m", name="Mix <1>")
    g.add_node("m2", name="Mix 2")
    g.add_node("lora", name="Style", kind="lora")
    add_lineage_edge(g, "base", "a", "finetune")
    add_lineage_edge(g, "base", "b", "finetune")
    add_lineage_edge(g, "a", "m", "merge", weight=0.3, params={"method": "weighted_sum"})
    add_lineage_edge(g, "b", "m", "merge", weight=0.7, params={"method": "weighted_sum"})
    add_lineage_edge(g, "m", "m2", "finetune")
    add_lineage_edge(g, "base", "lora", "adapter")
    return g


def dot_edges(dot: str) -> dict[tuple[str, str], str]:
    return {(p, c): attrs for p, c, attrs in re.findall(r'^\s*"([^"]+)" -> "([^"]+)" \[(.*)\];$', dot, re.M)
            if "invis" not in attrs and not p.startswith("legend:")}


def dot_nodes(dot: str) -> dict[str, str]:
    return {node: attrs for node, attrs in re.findall(r'^\s*"([^"]+)" \[(label=.*)\];$', dot, re.M)
            if not node.startswith("legend:")}


def test_text_tree_shows_a_merge_under_each_parent_once_expanded(merge_family):
    text = to_text(merge_family, focus="b")
    lines = text.splitlines()
    assert lines[0] == "Base  [base]  (eps, Lab, 2024-01)"
    assert "├─ Model A  [a]" in lines
    assert "│  └─ ⊕ Mix <1>  [m]  (weighted sum 0.3)" in lines
    assert "│     └─ Mix 2  [m2]" in lines
    assert "├─ Model B  [b]  (v-pred)  ◀" in lines
    assert "│  └─ ⊕ Mix <1>  [m]  (weighted sum 0.7)  … see above" in lines
    assert "└─ Style  [lora]  (adapter, lora)" in lines
    assert text.count("Mix 2") == 1


def test_dot_structure_labels_and_styles(merge_family):
    dot = to_dot(merge_family, focus="m")
    assert dot.startswith("digraph lineage {") and "rankdir=TB" in dot
    nodes, edges = dot_nodes(dot), dot_edges(dot)
    assert set(nodes) == set(merge_family)
    assert set(edges) == set(merge_family.edges)
    assert 'label=" weighted sum 0.3"' in edges["a", "m"] and 'label=" weighted sum 0.7"' in edges["b", "m"]
    assert "label" not in edges["base", "a"]  # a fine-tune needs no label
    assert 'style="dashed"' in edges["base", "lora"] and 'label=" adapter"' in edges["base", "lora"]
    assert 'fillcolor="#FFF9C4"' in nodes["base"] and 'fillcolor="#E1F5FE"' in nodes["b"]
    assert 'shape="ellipse"' in nodes["lora"] and 'shape="box"' in nodes["a"]
    assert 'URL="https://example.org/base"' in nodes["base"] and "maker: Lab" in nodes["base"]
    assert "<B>Mix &lt;1&gt;</B>" in nodes["m"] and 'color="#D84315"' in nodes["m"]  # escaped; the focus


def test_dot_boxes_architectures_and_stacks_lone_models():
    dot = to_dot(catalog_graph())
    assert 'subgraph "cluster_sdxl"' in dot and 'subgraph "cluster_sd1"' in dot and 'label="SD 2.x"' in dot
    assert '"sd-2.0" -> "sd-2.1" [style=invis];' in dot
    assert len(dot_edges(dot)) == catalog_graph().number_of_edges()


def test_mermaid_like_the_seed_flowcharts(merge_family):
    mermaid = to_mermaid(merge_family, focus="m")
    lines = mermaid.splitlines()
    assert lines[0] == "flowchart TD"
    ids = dict(re.findall(r'^(n\d+)[\[(]+"([^"]+)"', mermaid, re.M))
    by_name = {name: node_id for node_id, name in ids.items()}
    assert set(by_name) == {"Base", "Model A", "Model B", "Mix #lt;1#gt;", "Mix 2", "Style"}
    assert f'{by_name["Model A"]} -->|weighted sum 0.3| {by_name["Mix #lt;1#gt;"]}' in lines
    assert f'{by_name["Base"]} -.->|adapter| {by_name["Style"]}' in lines
    assert f'{by_name["Base"]} --> {by_name["Model A"]}' in lines
    assert f'click {by_name["Base"]} "https://example.org/base" "eps, Lab, 2024-01"' in lines
    assert "classDef epsilon fill:#FFF9C4,stroke:#FBC02D" in mermaid
    assert f"class {by_name['Model B']} v;" in lines
    assert f"style {by_name['Mix #lt;1#gt;']} stroke:#D84315,stroke-width:4px" in lines


def test_json_and_graphml_carry_everything(merge_family):
    document = json.loads(render(merge_family, "json"))
    assert document["format"] == "lineage-graph" and document["version"] == 1
    assert {n["id"] for n in document["nodes"]} == set(merge_family)
    merge_edges = {(e["parent"], e["child"]): e for e in document["edges"] if e["relation"] == "merge"}
    assert merge_edges["a", "m"]["weight"] == 0.3 and merge_edges["b", "m"]["params"] == {"method": "weighted_sum"}
    back = from_graphml(render(merge_family, "graphml"))
    assert dict(back.nodes(data=True)) == dict(merge_family.nodes(data=True))
    assert sorted(back.edges(data=True)) == sorted(merge_family.edges(data=True))


@needs_dot
def test_images_are_laid_out_by_dot(merge_family):
    svg = render(merge_family, "svg")
    assert svg.lstrip().startswith("<?xml") and "<title>m</title>" in svg and "Mix &lt;1&gt;" in svg
    assert render(merge_family, "png")[:8] == b"\x89PNG\r\n\x1a\n"
    assert render(merge_family, "pdf")[:5] == b"%PDF-"
    with pytest.raises(LineageError, match="unknown format 'gif'"):
        render(merge_family, "gif")


# ---------------------------------------------------------------- lmerge tree


def test_tree_on_a_fresh_install_prints_the_seed_family(lmerge):
    code, out, _ = lmerge("tree")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("Stable Diffusion XL 1.0 base  [sdxl-1.0-base]")

    def depth(node_id):
        line = next(line for line in lines if f"[{node_id}]" in line)
        return (len(line) - len(line.lstrip("│ ├└─"))) // 3

    chain = ["sdxl-1.0-base", "kohaku-xl-beta5", "illustrious-xl-v0.1", "noobai-xl-eps-0.5", "noobai-xl-eps-0.6",
             "noobai-xl-eps-0.75", "noobai-xl-eps-0.77", "noobai-xl-eps-1.0", "noobai-xl-vpred-0.5"]
    assert [depth(n) for n in chain] == list(range(len(chain)))
    assert depth("rouwei-0.6-eps") == depth("illustrious-xl-v1.0") == 3
    for branch in ("pony-diffusion-v6-xl", "animagine-xl-2.0", "animagine-xl-4.0-zero", "aidxl-model-a"):
        assert depth(branch) == 1
    assert depth("kohaku-xl-gamma") == 2 and depth("illustrious-xl-v2.0") == 5
    assert depth("illustrious-xl-v2.0-aesthetic") == 6
    assert any(line.startswith("Stable Diffusion 1.5  [sd-1.5]") for line in lines)  # its own root


def test_tree_of_a_node_up_down_and_depth(lmerge):
    code, out, _ = lmerge("tree", "noobai-xl-vpred-0.65", "--up")
    assert code == 0 and "NoobAI-XL V-pred 0.65  [noobai-xl-vpred-0.65]" in out and "◀" in out
    assert "kohaku-xl-beta5" in out and "noobai-xl-vpred-0.75" not in out and "rouwei" not in out
    code, out, _ = lmerge("tree", "NoobAI-XL V-pred 0.65", "--down", "--depth", "1")
    assert code == 0 and set(re.findall(r"\[([a-z0-9.\-]+)\]", out)) == {
        "noobai-xl-vpred-0.65", "noobai-xl-vpred-0.75", "noobai-xl-vpred-0.75s"}
    code, _, err = lmerge("tree", "--up")
    assert code == 1 and "need a NODE" in err
    code, _, err = lmerge("tree", "no-such-model")
    assert code == 1 and "no node 'no-such-model'" in err


@needs_dot
def test_tree_writes_files_by_extension(lmerge, tmp_path):
    code, out, _ = lmerge("tree", "illustrious-xl-v0.1", "--depth", "2", "-o", tmp_path / "tree.png")
    assert code == 0 and "wrote" in out and (tmp_path / "tree.png").read_bytes()[:4] == b"\x89PNG"
    code, _, _ = lmerge("tree", "-o", tmp_path / "family.mmd")
    assert code == 0 and (tmp_path / "family.mmd").read_text().startswith("flowchart TD")
    code, out, _ = lmerge("tree", "rouwei-0.7-eps", "--format", "dot")
    assert code == 0 and set(dot_nodes(out)) == set(neighbourhood(catalog_graph(), "rouwei-0.7-eps"))
    code, _, err = lmerge("tree", "--format", "png")
    assert code == 1 and "give -o FILE" in err


def test_tree_of_a_recorded_file(lmerge, tiny):
    path = tiny("mine.safetensors", 1)
    code, _, err = lmerge("tree", path)
    assert code == 1 and "is not in the registry yet" in err
    lmerge("add", path, "--parent", "rouwei-0.8-eps")
    code, out, _ = lmerge("tree", path, "--up", "--depth", "1")
    assert code == 0 and out.splitlines() == [
        "RouWei 0.8 epsilon  [rouwei-0.8-eps]  (eps, Minthybasis, 13M images)",
        f"└─ mine  [{hash_file(path).autov3[:12]}]  ◀"]


def test_a_catalog_model_you_downloaded_is_drawn_as_a_file_you_have(lmerge, family):
    code, _, err = lmerge("link", family["base"], "illustrious-xl-v0.1")
    assert code == 0, err
    code, out, _ = lmerge("tree", "--format", "dot")  # the whole tree: no focus, whose border is its own
    line = dot_nodes(out)["illustrious-xl-v0.1"]
    assert f"AutoV3 {hash_file(family['base']).autov3[:12]}" in line and 'penwidth="2.2"' in line
    assert "AutoV3" not in dot_nodes(out)["kohaku-xl-beta5"]
    assert '"legend:file"' in out


# ---------------------------------------------------------------- the tree items of issue 2.3


BLOCKS = {"BASE": 0.5, "IN00": 1.0, "M00": 0.5, "OUT00": 0.0}


@pytest.mark.parametrize(("attrs", "label"), [
    ({"relation": "merge", "weight": 0.7, "params": {"method": "weighted_sum"}}, "weighted sum 0.7"),
    ({"relation": "merge", "params": {"method": "ties"}}, "TIES"),
    ({"relation": "merge", "weight": 0.5, "params": {"method": "dare_linear"}}, "DARE 0.5"),
    ({"relation": "merge", "weight": -1.0, "params": {"method": "add_difference"}}, "add difference -1"),
    ({"relation": "merge", "weight": 1.0, "params": {"method": "Add difference"}}, "add difference 1"),  # A1111
    ({"relation": "merge", "weight": 0.3, "params": {"method": "weighted_sum",
                                                       "recipe": {"per_key": {"alpha": {"blocks": BLOCKS}}}}},
     "block weighted sum"),
    ({"relation": "merge", "weight": 0.3}, "merge 0.3"),
    ({"relation": "merge"}, "merge"),
    ({"relation": "finetune"}, None),
    ({"relation": "convert"}, "convert"),  # the relation's own name, as `--relation` and `show` say it
    ({"relation": "adapter"}, "adapter"),
])
def test_edges_say_their_method_and_weight(attrs, label):
    assert edge_label(attrs) == label


def test_block_merge_tooltip_lists_the_blocks():
    g = nx.DiGraph()
    add_lineage_edge(g, "a", "m", "merge", params={"method": "weighted_sum",
                                                    "recipe": {"per_key": {"alpha": {"blocks": BLOCKS}}}})
    edge = dot_edges(to_dot(g))["a", "m"]
    assert 'label=" block weighted sum"' in edge
    assert "alpha by block: BASE 0.5, IN00 1, M00 0.5, OUT00 0" in edge


def test_legend_explains_only_what_the_picture_uses(merge_family):
    dot = to_dot(merge_family)
    legend = dot[dot.index('subgraph "cluster_legend"'):]
    assert 'label="ε-prediction (eps)"' in legend and 'label="v-prediction"' in legend
    assert 'label="prediction type not stated"' in legend and "EDM" not in legend
    assert 'label=" merge"' in legend and 'label=" adapter"' in legend and 'label=" convert"' not in legend
    assert "an adapter (LoRA" in legend and "a file you have" not in legend
    assert "cluster_legend" not in to_dot(merge_family, legend=False)


@needs_dot
def test_legend_is_one_row_under_the_tree(merge_family):
    """The legend lies in one row below the deepest model (not in a column beside the tree, which made the
    picture as tall as the legend), and pulls no other model down to its row."""
    plain = to_image(merge_family, "plain").decode()
    y = {name.strip('"'): float(y) for name, y in re.findall(r'^node ("[^"]*"|\S+) \S+ (\S+) ', plain, re.M)}
    legend = {y[n] for n in y if n.startswith("legend:")}
    models = {n: y[n] for n in merge_family}
    assert len(legend) == 1 and len(y) - len(models) > 4  # every entry, side by side (plain's y grows upwards)
    assert max(legend) < min(models.values())
    assert models["lora"] > models["m2"] and models["a"] > models["m2"]  # the shallow ones stay up


def test_own_roots_stand_apart_from_the_catalog():
    g = nx.DiGraph(catalog_graph())
    g.add_node("mine", name="My own base", architecture="sdxl", source="user")
    g.add_node("mine-child", name="My child", architecture="sdxl", source="user")
    add_lineage_edge(g, "mine", "mine-child", "finetune")
    g.add_node("under", name="Under Pony", architecture="sdxl", source="user")
    add_lineage_edge(g, "pony-diffusion-v6-xl", "under", "finetune")
    lines = to_text(g).splitlines()
    heading = lines.index("your models without a catalog parent:")
    assert lines[heading + 1:heading + 3] == ["My own base  [mine]", "└─ My child  [mine-child]"]
    assert all("[under]" not in line for line in lines[heading:])  # under a catalog model: not apart
    dot = to_dot(g)
    own = dot[dot.index('subgraph "cluster_own_sdxl"'):]
    own = own[:own.index("}")]
    assert '"mine" [' in own and '"mine-child"' not in own and '"under"' not in own
    alone = nx.DiGraph()
    alone.add_node("x", name="X", source="user")
    assert "your models without" not in to_text(alone)  # no catalog: nothing to stand apart from


def aidxl_up():
    return neighbourhood(catalog_graph(), "aidxl-v0.8", up=True, down=False)


ASSUMED_EDGES = {("aidxl-v0.1", "aidxl-v0.5"), ("aidxl-v0.51", "aidxl-v0.52"), ("aidxl-v0.6", "aidxl-v0.7"),
                 ("aidxl-v0.7", "aidxl-v0.8")}


def test_assumed_catalog_edges_are_drawn_as_assumed_with_the_reason():
    g = aidxl_up()
    assert {(p, c) for p, c, a in g.edges(data=True) if a.get("assumed")} == ASSUMED_EDGES
    dot = to_dot(g)
    edges = dot_edges(dot)
    for edge, attrs in edges.items():
        if edge in ASSUMED_EDGES:
            assert 'style="dashed"' in attrs and 'color="#EF6C00"' in attrs
            assert "\\nassumed: AIDXL's versions are one training line" in attrs
        else:
            assert "#EF6C00" not in attrs and "assumed" not in attrs
    assert 'style="bold"' not in edges["aidxl-v0.5", "aidxl-v0.51"]  # stated: the plain finetune line
    legend = dot[dot.index('subgraph "cluster_legend"'):]
    assert 'label=" assumed"' in legend
    text = to_text(g)
    assert "(finetune, assumed)" in text
    for _parent, child in ASSUMED_EDGES:
        line = next(line for line in text.splitlines() if f"[{child}]" in line)
        assert "finetune, assumed" in line
    assert "assumed" not in next(line for line in text.splitlines() if "[aidxl-v0.51]" in line)
    mermaid = to_mermaid(g)
    assert mermaid.count("-.->|finetune, assumed|") == 4 and mermaid.count("assumed") == 4


def test_adapter_lines_stay_and_the_legend_names_assumed_only_when_drawn(merge_family):
    dot = to_dot(merge_family)
    assert "assumed" not in dot
    assert dot_edges(dot)["base", "lora"].startswith('color="#00897B", fontcolor="#00897B", style="dashed"')
    assert "assumed" not in to_mermaid(merge_family) and "assumed" not in to_text(merge_family)


def test_text_tree_fits_80_columns_and_keeps_every_id():
    g = catalog_graph()
    lines = to_text(g).splitlines()  # width 80 unless told
    assert max(len(line) for line in lines) <= 80  # characters, not bytes
    assert any(len(line) > 80 for line in to_text(g, width=None).splitlines())  # it needed fitting
    text = "\n".join(lines)
    for node in g:
        assert f"[{node}]" in text or node == str(g.nodes[node].get("name") or node), node
    noob = next(line for line in lines if "[noobai-xl-eps-1.1]" in line)
    assert noob.startswith(noob[:noob.index("NoobAI")] + "NoobAI-XL Epsilon-pred 1.1  [noobai-xl-eps-1.1]  (eps")
    assert "12.7M images" not in noob  # the last facts go first, the name stays whole when that suffices


def test_text_tree_shortens_the_name_last_and_never_the_id():
    g = nx.DiGraph()
    g.add_node("base-model-id", name="A very long model name " * 3, maker="Someone", dataset_size=5_000_000)
    g.add_node("child-id", name="Child")
    add_lineage_edge(g, "base-model-id", "child-id", "finetune", assumed="a guess")
    lines = to_text(g, width=42).splitlines()
    assert all(len(line) <= 42 for line in lines)
    assert lines[0].endswith("…  [base-model-id]") and lines[1] == "└─ Child  [child-id]  (finetune, assumed)"
    assert to_text(g, width=None).splitlines()[0].endswith("(Someone, 5M images)")
