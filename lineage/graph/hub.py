"""Hugging Face model cards: read the `base_model` chain into the graph, write it for our nodes.

A model card's YAML front matter names the model(s) it was made from (`base_model`, a repo id or a
list) and how (`base_model_relation`: finetune, merge, adapter, quantized). A repo's prediction type
comes from its diffusers `scheduler/scheduler_config.json` (saved beside the card in `cards_dir`, or
from the hub) or else from the card's tags, so `hf:` nodes carry it and `compat` can use it. `import_card` follows
that chain upwards, card by card, until it reaches a model the catalog knows (matched by its
Hugging Face URL), a card without `base_model`, or a card it cannot fetch; then it writes all nodes
and edges in one registry transaction. Cards are read with huggingface_hub's `ModelCard.load`: a
local file, a folder of saved cards (`cards_dir/<owner>/<name>/README.md`), or the hub itself.
"""
from __future__ import annotations

import json
import os
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx
from huggingface_hub import ModelCard, ModelCardData, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError, HFValidationError

from lineage.errors import LineageError
from lineage.graph.catalog import catalog_node_for_repo, huggingface_repo, is_catalog_node
from lineage.graph.hub_access import check_hub_reachable, hub_quiet
from lineage.graph.model import ADAPTER_KINDS, HUB_PREFIX, display_name
from lineage.graph.registry import Registry, using_registry
from lineage.io.atomic import atomic_write, destination

# Hugging Face `base_model_relation` -> our relation, and back.
RELATION_FROM_HUB: dict[str, str] = {"finetune": "finetune", "merge": "merge", "adapter": "adapter",
                                     "quantized": "convert"}
# `convert` has no hub relation of its own: a converted copy is the same model as its parent (its card is the
# parent's card), unless the hub said the copy is `quantized` (kept on the edge by `import_card`).
RELATION_TO_HUB: dict[str, str] = {"finetune": "finetune", "trained": "finetune", "merge": "merge",
                                   "adapter": "adapter"}
# Card tags that state a prediction type (Hugging Face tags are free text; these are the spellings in use).
V_PREDICTION_TAGS = {"v-prediction", "v_prediction", "v-pred", "vpred", "v-parameterization"}
ZERO_TERMINAL_SNR_TAGS = {"zsnr", "ztsnr", "zero-terminal-snr", "zero_terminal_snr"}
SCHEDULER_CONFIG = "scheduler/scheduler_config.json"
MAX_CHAIN = 32  # cards followed upwards at most (real chains are a handful long)
HUB_URL = "https://huggingface.co/"

# What huggingface_hub raises for a card it cannot get or parse: offline, unknown repo, bad YAML.
CARD_ERRORS = (OSError, HfHubHTTPError, HFValidationError, ValueError)


@dataclass
class HubImport:
    root: str  # the node the first card describes
    nodes: list[str] = field(default_factory=list)
    edges: list[tuple[str, str, str]] = field(default_factory=list)  # (parent, child, relation)
    not_followed: dict[str, str] = field(default_factory=dict)  # repo id -> why its card was not read
    skipped: list[tuple[str, str]] = field(default_factory=list)  # edges the read-only catalog already settles


def node_id_for_repo(repo: str) -> str:
    """The catalog node with this repo's URL, else `hf:<repo>`."""
    return catalog_node_for_repo().get(repo.lower(), HUB_PREFIX + repo)


def repo_of(graph: nx.DiGraph, node: str) -> str | None:
    """The Hugging Face repo id of a node, when it has one."""
    if node.startswith(HUB_PREFIX):
        return node[len(HUB_PREFIX):]
    return huggingface_repo(graph.nodes[node]) if node in graph else None


def load_card(source: str | os.PathLike, cards_dir: str | os.PathLike | None = None) -> ModelCard:
    """A model card from a local file, from `cards_dir/<owner>/<name>/README.md`, or from the hub."""
    if os.path.isfile(source):
        return ModelCard.load(Path(source))
    if cards_dir is not None:
        saved = Path(cards_dir, *str(source).split("/"), "README.md")
        if saved.is_file():
            return ModelCard.load(saved)
    check_hub_reachable()  # offline: one line within a second, not huggingface_hub's ~24 s of retries
    with hub_quiet():
        return ModelCard.load(os.fspath(source))  # downloads the repo's README.md


def _card_error(source: str, error: Exception) -> str:
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"card not read ({type(error).__name__}: {first_line})"


def base_models(card: ModelCard) -> list[str]:
    value = card.data.base_model
    values = [value] if isinstance(value, str) else list(value or [])
    return [v.strip() for v in values if isinstance(v, str) and v.strip()]


def relation_of(card: ModelCard, bases: int) -> str:
    """Our relation for a card's base models; when the card does not say, inferred like the hub does."""
    declared = card.data.get("base_model_relation")
    if declared in RELATION_FROM_HUB:
        return RELATION_FROM_HUB[declared]
    tags = {str(t).lower() for t in card.data.tags or []}
    if bases > 1:
        return "merge"
    if card.data.library_name == "peft" or tags & ({"lora"} | ADAPTER_KINDS):
        return "adapter"
    return "finetune"


def _scheduler_config(repo: str, cards_dir: str | os.PathLike | None) -> dict[str, Any] | None:
    """The repo's diffusers scheduler config: saved in `cards_dir/<owner>/<name>/`, else from the hub;
    None when it has none (a single-file repo) or it cannot be read (the card's tags may still say)."""
    saved = Path(cards_dir, *repo.split("/"), *SCHEDULER_CONFIG.split("/")) if cards_dir is not None else None
    try:
        if saved is None or not saved.is_file():
            check_hub_reachable()  # offline: None within a second, not after huggingface_hub's retries
            with hub_quiet():
                saved = Path(hf_hub_download(repo, SCHEDULER_CONFIG))
        config = json.loads(saved.read_text(encoding="utf-8"))
    except CARD_ERRORS:
        return None
    return config if isinstance(config, dict) else None


def prediction_of_repo(repo: str, card: ModelCard | None, cards_dir: str | os.PathLike | None
                       ) -> tuple[str, str] | None:
    """(prediction type, where it was read) of a hub repo: its scheduler config, else its card's tags."""
    from lineage.sdxl.detection import scheduler_prediction  # imported here: detection pulls in torch

    config = _scheduler_config(repo, cards_dir)
    if config is not None:
        declared = scheduler_prediction(config)
        if declared or config.get("prediction_type") == "epsilon":
            return declared or "epsilon", "scheduler_config"
    tags = {str(t).lower() for t in (card.data.tags or [])} if card is not None else set()
    if tags & (V_PREDICTION_TAGS | ZERO_TERMINAL_SNR_TAGS):
        v, ztsnr = bool(tags & V_PREDICTION_TAGS), bool(tags & ZERO_TERMINAL_SNR_TAGS)
        return ("v" if v else "epsilon") + ("+ztsnr" if ztsnr else ""), "model card tags"
    return None


def _hub_attrs(repo: str, card: ModelCard | None, cards_dir: str | os.PathLike | None) -> dict[str, Any]:
    attrs: dict[str, Any] = {"name": repo, "urls": [HUB_URL + repo], "source": "hub"}
    if card is not None:
        attrs.update({k: v for k, v in (("license", card.data.license), ("tags", card.data.tags)) if v})
    prediction = prediction_of_repo(repo, card, cards_dir) if card is not None else None
    if prediction:
        attrs["prediction_type"], attrs["prediction_source"] = prediction
    return attrs


def _root(source: str, as_node: str | None, reg: Registry) -> tuple[str, str | None]:
    """(node id, repo id or None) of the model the first card describes."""
    if as_node is None:
        if os.path.isfile(source):
            raise LineageError("a card file does not say which model it describes; give --as with the "
                               "model's file, node or Hugging Face repo id", source)
        return node_id_for_repo(source), source
    if os.path.isfile(as_node):
        from lineage.graph.recording import scan_file  # imported here: reading a checkpoint's header needs torch

        return scan_file(as_node, reg), None
    try:
        return reg.resolve(as_node), None
    except LineageError:
        if as_node.count("/") == 1:
            return node_id_for_repo(as_node), as_node
        raise


def import_card(source: str | os.PathLike, registry: str | os.PathLike | Registry | None = None, *,
                as_node: str | None = None, cards_dir: str | os.PathLike | None = None,
                max_depth: int = MAX_CHAIN) -> HubImport:
    """Read the card of `source` (repo id or card file) and the cards of its base models upwards,
    adding their nodes and edges. `as_node` says which model a card file describes."""
    source = os.fspath(source)
    with using_registry(registry) as reg:
        root, root_repo = _root(source, as_node, reg)
        try:
            first = load_card(source, cards_dir)
        except CARD_ERRORS as e:
            raise LineageError(_card_error(source, e), source) from None
        result = HubImport(root)
        hub_nodes: dict[str, dict[str, Any]] = {}
        if root_repo and not is_catalog_node(root):
            hub_nodes[root] = _hub_attrs(root_repo, first, cards_dir)
        planned: list[tuple[str, str, str, dict[str, Any]]] = []
        queue = deque([(root, first, 0)])
        seen = {root}
        while queue:  # fetch every card first: the registry transaction below stays short
            child, card, depth = queue.popleft()
            bases = base_models(card)
            relation = relation_of(card, len(bases))
            for repo in bases:
                parent = node_id_for_repo(repo)
                planned.append((parent, child, relation, {"base_model_relation": card.data.get("base_model_relation")}))
                if parent in seen or is_catalog_node(parent):
                    continue  # the catalog knows its own ancestry
                seen.add(parent)
                parent_card = None
                if depth + 1 >= max_depth:
                    result.not_followed[repo] = f"more than {max_depth} cards up the chain"
                else:
                    try:
                        parent_card = load_card(repo, cards_dir)
                        queue.append((parent, parent_card, depth + 1))
                    except CARD_ERRORS as e:
                        result.not_followed[repo] = _card_error(repo, e)
                hub_nodes[parent] = _hub_attrs(repo, parent_card, cards_dir)
        with reg.batch() as b:
            for node, attrs in hub_nodes.items():
                b.put_node(node, attrs)
                result.nodes.append(node)
            for parent, child, relation, params in planned:
                if is_catalog_node(child):
                    result.skipped.append((parent, child))
                    continue
                b.put_edge(parent, child, relation, params={k: v for k, v in params.items() if v} or None,
                           source="hub")
                result.edges.append((parent, child, relation))
        return result


def card_data(graph: nx.DiGraph, node: str) -> tuple[ModelCardData, list[str]]:
    """The `base_model` / `base_model_relation` front matter for `node`, and the parents left out
    because they have no Hugging Face repo id. A copy (a `convert` edge that is not a hub `quantized`
    relation) has the card of the model it copies."""
    node = _model_copied(graph, node)
    parents = sorted(graph.predecessors(node))
    if not parents:
        raise LineageError(f"{display_name(graph, node)} has no parents in the lineage graph: no base_model to write")
    repos = [repo_of(graph, p) for p in parents]
    missing = [display_name(graph, p) for p, r in zip(parents, repos) if r is None]
    found = [r for r in repos if r]
    if not found:
        raise LineageError(f"none of the parents of {display_name(graph, node)} has a Hugging Face repo id "
                           f"({', '.join(missing)}); base_model must name hub repos")
    relations = {_hub_relation(graph.edges[p, node]) for p, r in zip(parents, repos) if r}
    relation = "merge" if "merge" in relations or len(found) > 1 else relations.pop()
    data = ModelCardData(base_model=found[0] if len(found) == 1 else found, base_model_relation=relation)
    return data, missing


def _hub_relation(edge: dict[str, Any]) -> str:
    if edge["relation"] == "convert":
        return "quantized"  # only a hub-declared quantization reaches here (see _model_copied)
    return RELATION_TO_HUB[edge["relation"]]


def _is_copy_edge(edge: dict[str, Any]) -> bool:
    return edge["relation"] == "convert" and (edge.get("params") or {}).get("base_model_relation") != "quantized"


def _model_copied(graph: nx.DiGraph, node: str) -> str:
    """The model `node` is a copy of (following plain `convert` edges up), else `node`."""
    seen = {node}
    while True:
        parents = list(graph.predecessors(node))
        if len(parents) != 1 or not _is_copy_edge(graph.edges[parents[0], node]) or parents[0] in seen:
            return node
        node = parents[0]
        seen.add(node)


def front_matter(data: ModelCardData) -> str:
    return f"---\n{data.to_yaml()}\n---\n"


def write_card(graph: nx.DiGraph, node: str, path: str | os.PathLike,
               inputs: Sequence[str | os.PathLike] = ()) -> list[str]:
    """Set `base_model` / `base_model_relation` in the card at `path` (its text is kept), or write a
    new card there; `inputs` are files the card must not replace (the registry). Returns the parents
    left out (no repo id)."""
    found = destination(path, inputs)
    data, missing = card_data(graph, node)
    if found.target is not None and os.path.isfile(found.target):  # a card to update (not /dev/stdout)
        try:
            card = ModelCard.load(Path(found.target))
        except CARD_ERRORS as e:
            raise LineageError(_card_error(os.fspath(path), e), path) from None
        card.data.base_model = data.base_model
        card.data.base_model_relation = data.base_model_relation
        text = str(card)
    else:
        text = front_matter(data) + f"\n# {display_name(graph, node)}\n"
    atomic_write(path, text, inputs)
    return missing
