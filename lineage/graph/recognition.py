"""Which catalog model a scanned file is: by its hash, else by the name it was downloaded under.

A download of a catalog model rarely has a hash the catalog knows (few publishers give one), but it
usually keeps the name Civitai serves it under (`noobaiXLNAIXL_vPred10Version.safetensors`). When
`lmerge scan` first records a file, `recognise` looks for the catalog model it is:

- a catalog model that carries the file's SHA256 or AutoV3 is that file, whatever its name;
- else a file name that names one catalog model surely (naming.py: confidence at least
  `naming.MIN_CONFIDENCE` and no other candidate close to it) is taken as that model;
- a name that only resembles one or a few (confidence at least SUGGEST_CONFIDENCE) is a suggestion,
  which the user confirms with `lmerge link FILE NODE`.

Taking a file as a model is `lmerge link`'s operation (editing.py): the file's node becomes an alias
of the model. A file whose metadata names its parents (a merge, a LoRA) says what it was made from,
so its name does not make it a catalog model; nor is any file taken for a model of another kind,
architecture or prediction type (`editing.identity_conflict`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePath
from typing import TYPE_CHECKING

import networkx as nx

from lineage.graph.catalog import catalog_graph
from lineage.graph.editing import identity_conflict
from lineage.graph.naming import AMBIGUITY_MARGIN, SUGGESTIONS, Match, decisive, match, nodes_with_hash

if TYPE_CHECKING:
    from lineage.graph.recording import FileFacts

# A file name that matches a catalog model at least this well (but not surely) is offered as a suggestion.
SUGGEST_CONFIDENCE = 0.6
# How each kind of match is told in scan's output.
HOW_TOLD = {"hash": "by its hash", "file name": "by its file name", "tokens": "by its file name",
            "name": "by its name"}


@dataclass(frozen=True)
class Recognition:
    """The catalog model `node` a file at `path` is (`linked`), or may be (a suggestion), with the
    confidence and kind of the match (naming.Match.how)."""
    path: str
    node: str
    confidence: float
    how: str
    linked: bool

    @property
    def told(self) -> str:
        return HOW_TOLD.get(self.how, f"by {self.how}")


def _by_hash(catalog: nx.DiGraph, facts: FileFacts) -> list[Match]:
    whole = [value for value in (facts.hashes.sha256, facts.hashes.autov3) if value]
    return [Match(node, 1.0, "hash") for value in whole for node in nodes_with_hash(catalog, value)]


def recognise(facts: FileFacts, catalog: nx.DiGraph | None = None) -> list[Recognition]:
    """The catalog model the described file is (one Recognition, linked), or the ones it may be
    (suggestions, best first), or nothing (see the module doc)."""
    catalog = catalog_graph() if catalog is None else catalog
    found = _by_hash(catalog, facts)
    if not found and not facts.origins:
        found = match(catalog, PurePath(facts.path).name, floor=SUGGEST_CONFIDENCE)
    found = [m for m in found if identity_conflict(facts.attrs, catalog.nodes[m.node]) is None]
    sure = decisive(found)
    if sure:
        return [Recognition(facts.path, sure.node, sure.confidence, sure.how, linked=True)]
    close = [m for m in found[:SUGGESTIONS]
             if m.confidence >= SUGGEST_CONFIDENCE and found[0].confidence - m.confidence < AMBIGUITY_MARGIN]
    return [Recognition(facts.path, m.node, m.confidence, m.how, linked=False) for m in close]
