"""Does an adapter fit a checkpoint? Answered from the lineage graph.

An adapter (LoRA, LoKr, ...) learned a difference to the model it was trained on, its *base*. It
carries over best to that base and to models made from it; less to its relatives; it fails on other
architectures (the tensors do not even line up) and misbehaves across prediction types (an
epsilon LoRA on a v-prediction model). The check finds which of these relationships holds:

| relationship   | verdict            | when                                                             |
|----------------|--------------------|------------------------------------------------------------------|
| architecture   | incompatible       | adapter and checkpoint are for different architectures           |
| prediction     | incompatible       | epsilon vs v-prediction, and no closer kin than a shared root     |
| prediction-in-family | likely compatible | epsilon vs v-prediction within one family (a warning:      |
|                |                    | "trained on ε, used on v-pred"); the base and checkpoint are kin  |
| same-base      | compatible         | the checkpoint is the adapter's base                             |
| descendant     | compatible         | the checkpoint descends from the base (n generations)            |
| ancestor       | likely compatible  | the base descends from the checkpoint                            |
| relative       | likely compatible  | they share an ancestor below the architecture's root model       |
| distant        | uncertain          | they share only a root model (e.g. SDXL 1.0 base)                |
| unrelated      | uncertain          | no shared ancestry is recorded, or the adapter's base is unknown |

A checkpoint where an adapter is expected, or an adapter where a checkpoint is expected, is an error
(LineageError), not a verdict. `lmerge compat` exits 0 for compatible, likely compatible and uncertain,
1 for incompatible and 2 for an error (docs/catalog.md).
"""
from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from typing import Any

import networkx as nx

from lineage.errors import LineageError
from lineage.graph.model import (
    ADAPTER_KINDS,
    PREDICTION_FAMILY,
    display_name,
    lowest_common_ancestors,
    path,
    require_node,
)

BASE_RELATIONS = ("adapter", "trained")  # edges from an adapter's base to the adapter

VERDICTS: dict[str, str] = {
    "architecture": "incompatible", "prediction": "incompatible", "prediction-in-family": "likely compatible",
    "same-base": "compatible", "descendant": "compatible",
    "ancestor": "likely compatible", "relative": "likely compatible",
    "distant": "uncertain", "unrelated": "uncertain",
}
ARCHITECTURE_NAMES = {"sdxl": "SDXL", "sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl-refiner": "the SDXL refiner"}
PREDICTION_NAMES = {"epsilon": "epsilon-prediction", "v": "v-prediction", "edm": "EDM", "edm-v": "EDM v-prediction"}
PREDICTION_SHORT = {"epsilon": "ε", "v": "v-pred", "edm": "EDM", "edm-v": "EDM v-pred"}
# Relationships close enough that a prediction-type difference is only a warning (one family).
KIN = ("same-base", "descendant", "ancestor", "relative")


@dataclass
class Compatibility:
    adapter: str
    checkpoint: str
    relationship: str  # a key of VERDICTS
    reason: str
    base: str | None = None  # the adapter's base model
    common_ancestor: str | None = None
    generations: int | None = None  # between the base and the checkpoint, along the line of descent

    @property
    def verdict(self) -> str:
        return VERDICTS[self.relationship]

    @property
    def compatible(self) -> bool:
        return self.verdict != "incompatible"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "verdict": self.verdict}


def is_adapter(graph: nx.DiGraph, node: str) -> bool:
    return graph.nodes[node].get("kind") in ADAPTER_KINDS or any(
        graph.edges[p, node]["relation"] == "adapter" for p in graph.predecessors(node))


def adapter_bases(graph: nx.DiGraph, adapter: str) -> list[str]:
    """The models an adapter was trained on or extracted from."""
    parents = sorted(graph.predecessors(adapter))
    return [p for p in parents if graph.edges[p, adapter]["relation"] in BASE_RELATIONS] or parents


def _declared(attrs: dict[str, Any], key: str) -> str | None:
    """A declared fact; a prediction type that detection only assumed does not count."""
    if key == "prediction_type" and attrs.get("prediction_source") == "default":
        return None
    return attrs.get(key)


def _first_declared(graph: nx.DiGraph, nodes: list[str], key: str) -> str | None:
    return next((value for n in nodes if (value := _declared(graph.nodes[n], key))), None)


def same_model(graph: nx.DiGraph, node: str) -> str:
    """The model a file is a copy of (following `convert` edges up: same weights), else the node."""
    while True:
        copy_of = [p for p in graph.predecessors(node) if graph.edges[p, node]["relation"] == "convert"]
        if len(copy_of) != 1:
            return node
        node = copy_of[0]


def _generations(line: list[str]) -> str:
    return f"{len(line) - 1} generation{'s' if len(line) != 2 else ''}"


def _relationship(graph: nx.DiGraph, base: str, checkpoint: str) -> dict[str, Any]:
    """How `checkpoint` relates to the adapter's `base`: the Compatibility fields after the ids."""
    name = functools.partial(display_name, graph)
    if base == checkpoint:
        return {"relationship": "same-base", "reason": f"{name(base)} is the adapter's base",
                "common_ancestor": base, "generations": 0}
    line = path(graph, base, checkpoint)
    if line and line[0] == base:
        return {"relationship": "descendant", "common_ancestor": base, "generations": len(line) - 1,
                "reason": f"{name(checkpoint)} descends from the adapter's base {name(base)} "
                          f"({_generations(line)}: {' → '.join(map(name, line))})"}
    if line:
        return {"relationship": "ancestor", "common_ancestor": checkpoint, "generations": -(len(line) - 1),
                "reason": f"the adapter's base {name(base)} descends from {name(checkpoint)} "
                          f"({_generations(line)}); what the base added on top may be missing"}
    common = lowest_common_ancestors(graph, base, checkpoint)
    if not common:
        return {"relationship": "unrelated",
                "reason": f"no shared ancestry between {name(base)} and {name(checkpoint)} is recorded"}
    nearest = common[0]
    how_far = (f"{name(base)} is {_generations(path(graph, nearest, base))} and {name(checkpoint)} "
               f"{_generations(path(graph, nearest, checkpoint))} below it")
    if graph.in_degree(nearest) == 0:
        return {"relationship": "distant", "common_ancestor": nearest,
                "reason": f"the nearest common ancestor is the root model {name(nearest)} ({how_far}); "
                          "families that split there rarely share adapters well"}
    return {"relationship": "relative", "common_ancestor": nearest,
            "reason": f"nearest common ancestor {name(nearest)} ({how_far})"}


def check(graph: nx.DiGraph, adapter: str, checkpoint: str) -> Compatibility:
    """How well `adapter` fits `checkpoint` (both node ids of `graph`), with the reason. A file
    linked to a catalog model (a `convert` edge) counts as that model, and an adapter converted from
    another (lmerge convert --to) has that adapter's bases."""
    require_node(graph, adapter)
    require_node(graph, checkpoint)
    if not is_adapter(graph, adapter):
        raise LineageError(f"{display_name(graph, adapter)} is not an adapter (LoRA, LoKr, LoHa, ...)")
    if is_adapter(graph, checkpoint):
        raise LineageError(f"{display_name(graph, checkpoint)} is an adapter "
                           f"({graph.nodes[checkpoint].get('kind', 'adapter')}), not a checkpoint: "
                           "give the checkpoint the adapter would be used on")
    base_files = adapter_bases(graph, same_model(graph, adapter))  # a converted adapter: its source's bases
    bases = [same_model(graph, b) for b in base_files]
    model = same_model(graph, checkpoint)
    # Facts the adapter declares itself win over those of its base (a LoRA's file says little).
    adapter_side, checkpoint_side = [adapter, *base_files, *bases], [checkpoint, model]

    arch_a = _first_declared(graph, adapter_side, "architecture")
    arch_c = _first_declared(graph, checkpoint_side, "architecture")
    if arch_a and arch_c and arch_a != arch_c:
        return Compatibility(adapter, checkpoint, "architecture",
                             f"different architecture: the adapter is for {ARCHITECTURE_NAMES.get(arch_a, arch_a)}, "
                             f"the checkpoint is {ARCHITECTURE_NAMES.get(arch_c, arch_c)}", bases[0] if bases else None)
    pred_a = PREDICTION_FAMILY.get(_first_declared(graph, adapter_side, "prediction_type") or "")
    pred_c = PREDICTION_FAMILY.get(_first_declared(graph, checkpoint_side, "prediction_type") or "")
    closest = _closest(graph, adapter, checkpoint, bases, model)
    if pred_a and pred_c and pred_a != pred_c:
        if closest.relationship in KIN:  # one family: the weights still line up, the sampler setup differs
            closest.reason = (f"trained on {PREDICTION_SHORT[pred_a]}, used on {PREDICTION_SHORT[pred_c]}; "
                              f"{closest.reason}")
            closest.relationship = "prediction-in-family"
            return closest
        return Compatibility(adapter, checkpoint, "prediction",
                             f"prediction-type mismatch: the adapter is for {PREDICTION_NAMES[pred_a]}, "
                             f"the checkpoint is a {PREDICTION_NAMES[pred_c]} model", bases[0] if bases else None)
    return closest


def _closest(graph: nx.DiGraph, adapter: str, checkpoint: str, bases: list[str], model: str) -> Compatibility:
    """The closest relationship between any of the adapter's bases and the checkpoint's model."""
    if not bases:
        return Compatibility(adapter, checkpoint, "unrelated", "the adapter's base model is not recorded")
    ranking = list(VERDICTS)
    found = [Compatibility(adapter, checkpoint, base=b, **_relationship(graph, b, model)) for b in bases]
    return min(found, key=lambda c: (ranking.index(c.relationship), abs(c.generations or 0)))
