"""The graph model and its algorithms (lineage/graph.py) and the catalog loader (lineage/catalog.py)."""
import networkx as nx
import pytest

from lineage import LineageError
from lineage.graph.catalog import catalog_graph, catalog_node_for_repo, huggingface_repo
from lineage.graph.model import (
    add_lineage_edge,
    ancestors,
    descendants,
    is_placeholder,
    lowest_common_ancestors,
    neighbourhood,
    path,
    reference_id,
    roots,
    siblings,
)


@pytest.fixture
def family():
    """base -> a -> a1 -> a2;  base -> b;  a1 + b -> m (merge);  other (unrelated root)."""
    g = nx.DiGraph()
    g.add_nodes_from(["base", "a", "a1", "a2", "b", "m", "other"])
    for parent, child in [("base", "a"), ("a", "a1"), ("a1", "a2"), ("base", "b")]:
        add_lineage_edge(g, parent, child, "finetune")
    add_lineage_edge(g, "a1", "m", "merge", weight=0.3)
    add_lineage_edge(g, "b", "m", "merge", weight=0.7)
    return g


def test_ancestors_and_descendants(family):
    assert ancestors(family, "m") == {"a1", "a", "b", "base"}
    assert ancestors(family, "m", depth=1) == {"a1", "b"}
    assert ancestors(family, "m", depth=2) == {"a1", "b", "a", "base"}
    assert ancestors(family, "base") == set()
    assert descendants(family, "a") == {"a1", "a2", "m"}
    assert descendants(family, "base", depth=1) == {"a", "b"}
    with pytest.raises(LineageError, match="no node 'nope'"):
        ancestors(family, "nope")


def test_path_follows_descent_in_either_order(family):
    assert path(family, "base", "a2") == ["base", "a", "a1", "a2"]
    assert path(family, "a2", "base") == ["base", "a", "a1", "a2"]
    assert path(family, "a2", "b") is None  # cousins: neither descends from the other
    assert path(family, "base", "other") is None


def test_lowest_common_ancestors(family):
    assert lowest_common_ancestors(family, "a2", "b") == ["base"]
    assert lowest_common_ancestors(family, "a2", "m") == ["a1"]  # not a or base: a1 is lower
    assert lowest_common_ancestors(family, "a1", "a2") == ["a1"]  # a node counts as its own ancestor
    assert lowest_common_ancestors(family, "a2", "other") == []


def test_roots_and_siblings(family):
    assert roots(family) == ["base", "other"]
    assert siblings(family, "a") == {"b"}
    assert siblings(family, "m") == {"a2"}  # a1's other child; b has no other
    assert siblings(family, "base") == set()


def test_cycles_self_loops_and_unknown_relations_are_refused(family):
    with pytest.raises(LineageError, match="cannot descend from itself"):
        add_lineage_edge(family, "m", "base", "finetune")
    with pytest.raises(LineageError, match="cannot descend from itself"):
        add_lineage_edge(family, "a", "a", "finetune")
    with pytest.raises(LineageError, match="unknown relation 'blend'"):
        add_lineage_edge(family, "other", "a", "blend")
    assert not family.has_edge("m", "base") and nx.is_directed_acyclic_graph(family)


def test_neighbourhood(family):
    assert set(neighbourhood(family, "a1")) == {"base", "a", "a1", "a2", "m"}
    assert set(neighbourhood(family, "a1", down=False)) == {"base", "a", "a1"}
    assert set(neighbourhood(family, "a1", up=False, depth=1)) == {"a1", "a2", "m"}


def test_placeholder_ids():
    assert reference_id("sha256", "ABCD") == "sha256:abcd"
    assert reference_id("name", "My Model") == "name:My Model"
    assert is_placeholder("autov1:deadbeef") and not is_placeholder("hf:org/model")
    assert not is_placeholder("illustrious-xl-v0.1")


def test_catalog_graph_is_the_seed_family():
    g = catalog_graph()
    assert nx.is_frozen(g)
    assert g.number_of_nodes() >= 60
    assert all(a["source"] == "catalog" for _, a in g.nodes(data=True))
    assert path(g, "sdxl-1.0-base", "noobai-xl-vpred-1.0")[:4] == [
        "sdxl-1.0-base", "kohaku-xl-beta5", "illustrious-xl-v0.1", "noobai-xl-eps-0.5"]
    assert lowest_common_ancestors(g, "rouwei-0.8-vpred", "noobai-xl-vpred-1.0") == ["illustrious-xl-v0.1"]
    assert lowest_common_ancestors(g, "pony-diffusion-v6-xl", "animagine-xl-3.1") == ["sdxl-1.0-base"]
    assert lowest_common_ancestors(g, "sd-1.5", "sdxl-1.0-base") == []


def test_catalog_hugging_face_repos():
    assert huggingface_repo({"urls": ["https://civitai.com/x", "https://huggingface.co/Linaqruf/animagine-xl"]}) \
        == "Linaqruf/animagine-xl"
    assert huggingface_repo({"urls": ["https://huggingface.co/datasets/nyanko7/danbooru2023"]}) is None
    repos = catalog_node_for_repo()
    assert repos["stabilityai/stable-diffusion-xl-base-1.0"] == "sdxl-1.0-base"
    assert repos["laxhar/noobai-xl-vpred-0.75"] == "noobai-xl-vpred-0.75"
