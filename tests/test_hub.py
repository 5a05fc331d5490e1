"""Hugging Face model cards (lineage/hub.py), offline: local card files, and the hub in offline mode."""
import sqlite3

import huggingface_hub.constants
import pytest
import yaml

import lineage
from lineage import LineageError
from lineage.graph.hub import card_data, import_card, write_card
from lineage.graph.registry import Registry


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No test reaches the network: cards not on disk go to huggingface_hub in offline mode."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def write_card_file(directory, repo, front_matter, body="# A model\n\nSome text.\n"):
    path = directory.joinpath(*repo.split("/"), "README.md")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"---\n{yaml.safe_dump(front_matter)}---\n\n{body}")
    return path


@pytest.fixture
def cards(tmp_path):
    """org/child = merge of org/mid-a (fine-tune of Illustrious v0.1, found in the catalog by its URL)
    and org/mid-b (whose base org/gone has no card anywhere)."""
    root = tmp_path / "cards"
    write_card_file(root, "org/child", {"base_model": ["org/mid-a", "org/mid-b"], "base_model_relation": "merge",
                                        "license": "openrail++"})
    write_card_file(root, "org/mid-a", {"base_model": "OnomaAIResearch/Illustrious-xl-early-release-v0"})
    write_card_file(root, "org/mid-b", {"base_model": "org/gone", "base_model_relation": "finetune"})
    return root


def user_edges():
    with Registry() as reg:
        g = reg.user_graph()
    return {(p, c): a["relation"] for p, c, a in g.edges(data=True)}


def test_import_follows_the_base_model_chain_up_to_the_catalog(cards):
    result = import_card("org/child", cards_dir=cards)
    assert result.root == "hf:org/child"
    assert user_edges() == {
        ("hf:org/mid-a", "hf:org/child"): "merge", ("hf:org/mid-b", "hf:org/child"): "merge",
        ("illustrious-xl-v0.1", "hf:org/mid-a"): "finetune",  # relation not stated: inferred
        ("hf:org/gone", "hf:org/mid-b"): "finetune",
    }
    assert set(result.not_followed) == {"org/gone"} and "card not read" in result.not_followed["org/gone"]
    with Registry() as reg:
        child = reg.node("hf:org/child")
        assert child["license"] == "openrail++" and child["urls"] == ["https://huggingface.co/org/child"]
        assert reg.node("hf:org/gone")["source"] == "hub"


def test_importing_again_changes_nothing(cards, isolated_registry):
    import_card("org/child", cards_dir=cards)
    with sqlite3.connect(isolated_registry) as conn:
        before = list(conn.iterdump())
    import_card("org/child", cards_dir=cards)
    with sqlite3.connect(isolated_registry) as conn:
        assert list(conn.iterdump()) == before


def test_a_card_file_describes_the_model_given_with_as(cards, tiny):
    card = write_card_file(cards, "local/model", {"base_model": "org/mid-a", "tags": ["lora"]})
    lora = tiny("style.safetensors", 1, lora=True)
    result = import_card(card, as_node=lora, cards_dir=cards)
    assert result.root == lineage.hash_file(lora).autov3
    assert user_edges()[("hf:org/mid-a", result.root)] == "adapter"  # inferred from the tag
    with pytest.raises(LineageError, match="does not say which model it describes"):
        import_card(card)


def test_unreachable_first_card_and_cycles_are_errors_that_write_nothing(cards):
    with pytest.raises(LineageError, match="card not read"):
        import_card("org/not-anywhere", cards_dir=cards)
    write_card_file(cards, "loop/a", {"base_model": "loop/b"})
    write_card_file(cards, "loop/b", {"base_model": "loop/a"})
    with pytest.raises(LineageError, match="cannot descend from itself"):
        import_card("loop/a", cards_dir=cards)
    assert user_edges() == {}


def test_card_front_matter_of_a_fine_tune_of_a_catalog_model(tiny):
    child = lineage.record(tiny("m.safetensors", 1), parents=["sdxl-1.0-base"])
    with Registry() as reg:
        data, missing = card_data(reg.graph(), child)
    assert (data.base_model, data.base_model_relation, missing) == (
        "stabilityai/stable-diffusion-xl-base-1.0", "finetune", [])


def test_card_of_a_merge_lists_hub_parents_and_reports_the_rest(cards, tiny):
    import_card("org/child", cards_dir=cards)
    merged = lineage.record(tiny("m.safetensors", 1), parents=["hf:org/child", "hf:org/mid-b", "pony-diffusion-v6-xl"],
                            relation="merge", weights=[0.5, 0.3, 0.2])
    with Registry() as reg:
        graph = reg.graph()
    data, missing = card_data(graph, merged)
    assert data.base_model == ["org/child", "org/mid-b"] and data.base_model_relation == "merge"
    assert missing == ["Pony Diffusion V6 XL"]  # on Civitai, not the hub
    with pytest.raises(LineageError, match="no parents"):
        card_data(graph, "sdxl-1.0-base")
    with pytest.raises(LineageError, match="none of the parents"):
        card_data(graph, "autismmix-sdxl")


def test_write_card_updates_an_existing_readme_and_keeps_its_text(cards, tiny, tmp_path):
    child = lineage.record(tiny("c.safetensors", 1), parents=["noobai-xl-vpred-0.75"])
    readme = write_card_file(tmp_path, "mine", {"license": "mit", "base_model": "someone/else"},
                             body="# Mine\n\nHand-written notes.\n")
    with Registry() as reg:
        write_card(reg.graph(), child, readme)
    text = readme.read_text()
    front = yaml.safe_load(text.split("---")[1])
    assert front == {"license": "mit", "base_model": "Laxhar/noobai-XL-Vpred-0.75", "base_model_relation": "finetune"}
    assert text.endswith("Hand-written notes.\n")
    fresh = tmp_path / "new" / "README.md"
    fresh.parent.mkdir()
    with Registry() as reg:
        write_card(reg.graph(), child, fresh)
    assert yaml.safe_load(fresh.read_text().split("---")[1])["base_model"] == "Laxhar/noobai-XL-Vpred-0.75"


def test_cli_hub_import_and_card(lmerge, cards, tmp_path):
    code, out, err = lmerge("hub", "import", "org/child", "--cards", cards)
    assert code == 0 and "imported 4 model(s), 4 relation(s) starting at hf:org/child" in out
    assert "hf:org/mid-a -> hf:org/child (merge)" in out and "not followed: org/gone" in err
    code, out, _ = lmerge("hub", "card", "hf:org/child")
    assert code == 0 and yaml.safe_load(out.split("---")[1]) == {
        "base_model": ["org/mid-a", "org/mid-b"], "base_model_relation": "merge"}
    code, out, _ = lmerge("hub", "card", "org/mid-a", "-o", tmp_path / "README.md")
    written = (tmp_path / "README.md").read_text()
    assert code == 0 and "base_model: OnomaAIResearch/Illustrious-xl-early-release-v0" in written


def test_hub_import_offline_fails_within_a_second_with_one_line(lmerge, monkeypatch):
    """No network (the connection refused at once, as offline): one line, no huggingface_hub retries."""
    import errno
    import socket
    import time

    from lineage.graph import hub_access

    def unreachable(*args, **kwargs):
        raise OSError(errno.ENETUNREACH, "Network is unreachable")

    hub_access._probe.cache_clear()
    monkeypatch.setattr(socket, "create_connection", unreachable)
    for variable in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(hub_access.constants, "HF_HUB_OFFLINE", False)
    start = time.monotonic()
    code, out, err = lmerge("hub", "import", "Laxhar/noobai-XL-1.0")
    hub_access._probe.cache_clear()
    assert time.monotonic() - start < 2
    assert code == 1 and err.strip().count("\n") == 0 and "cannot reach the Hugging Face Hub" in err
    assert "Network is unreachable" in err


def test_offline_a_parent_card_not_saved_is_listed_as_not_followed(lmerge, monkeypatch, tmp_path):
    import errno
    import socket
    import time

    from lineage.graph import hub_access

    def unreachable(*args, **kwargs):
        raise OSError(errno.ENETUNREACH, "Network is unreachable")

    hub_access._probe.cache_clear()
    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.setattr(hub_access.constants, "HF_HUB_OFFLINE", False)
    for variable in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(variable, raising=False)
    saved = tmp_path / "cards" / "me" / "child"
    saved.mkdir(parents=True)
    (saved / "README.md").write_text("---\nbase_model: someone/parent\nbase_model_relation: finetune\n---\n")
    start = time.monotonic()
    code, out, err = lmerge("hub", "import", "me/child", "--cards", tmp_path / "cards")
    hub_access._probe.cache_clear()
    assert code == 0 and "someone/parent" in out
    assert "not followed: someone/parent" in err and "cannot reach the Hugging Face Hub" in err
    # nor does the saved card's repo wait on huggingface_hub's retries for its scheduler config (~24 s)
    assert time.monotonic() - start < 3


def test_hub_nodes_keep_the_prediction_type_of_their_scheduler_config_or_card_tags(cards, tiny):
    """A repo's scheduler_config (saved beside its card) or its card's tags say v-prediction: the `hf:` node
    carries it, the tree shows it, and compat uses it (an ε LoRA of the family on it is a warning)."""
    import json

    from lineage.graph.compat import check
    from lineage.graph.render import render

    write_card_file(cards, "org/vpred", {"base_model": "OnomaAIResearch/Illustrious-xl-early-release-v0"})
    scheduler = cards / "org" / "vpred" / "scheduler" / "scheduler_config.json"
    scheduler.parent.mkdir(parents=True)
    scheduler.write_text(json.dumps({"prediction_type": "v_prediction", "rescale_betas_zero_snr": True}))
    write_card_file(cards, "org/tagged", {"base_model": "org/vpred", "tags": ["v-prediction", "anime"]})
    import_card("org/tagged", cards_dir=cards)
    with Registry() as reg:
        assert reg.node("hf:org/vpred")["prediction_type"] == "v+ztsnr"
        assert reg.node("hf:org/vpred")["prediction_source"] == "scheduler_config"
        assert reg.node("hf:org/tagged")["prediction_type"] == "v"
    lora = lineage.record(tiny("lora.safetensors", 1, lora=True), parents=["illustrious-xl-v0.1"], relation="adapter")
    with Registry() as reg:
        graph = reg.graph()
        result = check(graph, lora, "hf:org/vpred")
        assert (result.relationship, result.verdict) == ("prediction-in-family", "likely compatible")
        assert result.reason.startswith("trained on ε, used on v-pred")
        assert "v-pred" in render(graph.subgraph({"hf:org/vpred", "hf:org/tagged"}), "text")
