"""`lmerge hub card` writes base_model_relation for every relation; a card's base_model lands on catalog nodes."""
import networkx as nx
import pytest

import lineage
from lineage.graph.editing import link
from lineage.graph.hub import card_data, import_card, node_id_for_repo
from lineage.graph.registry import Registry


def card_of(node):
    with Registry() as reg:
        data, _ = card_data(reg.graph(), reg.resolve(node))
    return data.base_model, data.base_model_relation


@pytest.mark.parametrize("relation, hub", [("finetune", "finetune"), ("trained", "finetune"),
                                           ("adapter", "adapter")])
def test_each_single_parent_relation(tiny, relation, hub):
    node = lineage.record(tiny("m.safetensors", 1, lora=relation == "adapter"), parents=["noobai-xl-vpred-0.75"],
                          relation=relation)
    assert card_of(node) == ("Laxhar/noobai-XL-Vpred-0.75", hub)


def test_merge_of_two_hub_models(tiny):
    node = lineage.record(tiny("m.safetensors", 1), parents=["noobai-xl-vpred-0.75", "noobai-xl-eps-1.0"],
                          relation="merge", weights=[0.5, 0.5])
    assert card_of(node) == (["Laxhar/noobai-XL-1.0", "Laxhar/noobai-XL-Vpred-0.75"], "merge")


def test_a_linked_copy_has_the_models_card_not_quantized(tiny):
    path = tiny("noob.safetensors", 1)
    link(path, "noobai-xl-vpred-0.9r")
    assert card_of(path) == ("Laxhar/noobai-XL-Vpred-0.75", "finetune")  # the card of 0.9r itself


def test_a_converted_copy_has_its_models_card_and_a_hub_quantization_stays_quantized(tiny):
    copy = lineage.record(tiny("fp8.safetensors", 1), parents=["noobai-xl-vpred-0.9r"], relation="convert")
    assert card_of(copy) == ("Laxhar/noobai-XL-Vpred-0.75", "finetune")
    graph = nx.DiGraph()
    graph.add_node("hf:me/noob-q", name="q")
    graph.add_node("noobai-xl-vpred-0.9r", huggingface=[{"repo": "Laxhar/noobai-XL-Vpred-0.9r"}])
    graph.add_edge("noobai-xl-vpred-0.9r", "hf:me/noob-q", relation="convert",
                   params={"base_model_relation": "quantized"})
    data, _ = card_data(graph, "hf:me/noob-q")
    assert (data.base_model, data.base_model_relation) == ("Laxhar/noobai-XL-Vpred-0.9r", "quantized")


def test_card_base_model_lands_on_the_catalog_node_not_an_hf_twin(tmp_path):
    assert node_id_for_repo("Laxhar/noobai-XL-Vpred-0.75") == "noobai-xl-vpred-0.75"
    assert node_id_for_repo("laxhar/NOOBAI-xl-vpred-0.65") == "noobai-xl-vpred-0.65"
    card = tmp_path / "README.md"
    card.write_text("---\nbase_model: Laxhar/noobai-XL-Vpred-0.9r\nbase_model_relation: finetune\n---\n# mine\n")
    result = import_card(str(card), as_node="me/my-finetune")
    assert result.edges == [("noobai-xl-vpred-0.9r", "hf:me/my-finetune", "finetune")]
    with Registry() as reg:
        assert not [n for n in reg.graph() if n.lower().startswith("hf:laxhar/")]


def test_the_issues_example_card_base_model_is_the_catalog_node(tmp_path):
    card = tmp_path / "README.md"
    card.write_text("---\nbase_model: Laxhar/noobai-XL-Vpred-1.0\n---\n# mine\n")
    result = import_card(str(card), as_node="me/my-vpred-finetune")
    assert result.edges == [("noobai-xl-vpred-1.0", "hf:me/my-vpred-finetune", "finetune")]
