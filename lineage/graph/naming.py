"""Which model does a name mean? One matcher for every place a model is named.

Users and tools name models in many ways: a node id (`noobai-xl-vpred-1.0`), a Hugging Face repo id
(`Laxhar/noobai-XL-Vpred-1.0`) or URL, a Civitai URL (a model page `…/models/833294?modelVersionId=1190596`
or a download link `…/api/download/models/1190596`), a hash prefix (6+ hex digits of any hash a node
carries), a display name, the file name a model circulates under on Civitai
(`noobaiXLNAIXL_vPred10Version.safetensors`), or A1111's checkpoint title, a name with its short hash
(`sd_xl_base_1.0.safetensors [31e35c80fc]`: the hash decides when it is known, the name otherwise).
`match` tries these in that order and says how sure it is; `resolve` turns a miss into an error that
offers the closest names ("did you mean …"). The CLI arguments, `lmerge link`, the parents that file metadata names
(kohya's `ss_sd_model_name`, ModelSpec `merged_from`, A1111 names) and model cards' `base_model` all
come through here, so a model is recognised the same way everywhere.

File names are compared by normalised tokens: camelCase and letter/digit boundaries split words,
version numbers lose their dots and trailing zeros (`1.0`, `v1-0`, `10` all read `1`; `0.65s` reads `065s`), and
Civitai's filler words (`Version`, `safetensors`, …) are dropped. A candidate's words must appear in
the name and its version numbers must agree; the confidence is the share of the candidate's tokens
found, less a penalty for version numbers in the name that the candidate does not have. Only display
names are candidates: a file name a model is known under matches exactly or not at all, because a hub's
file name often says less than the model's name (`NoobAI-XL-v1.0` names no prediction type) and would
make a name that does (`noobai vpred 1`) ambiguous.
"""
from __future__ import annotations

import bisect
import difflib
import functools
import re
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any
from urllib.parse import ParseResult, parse_qs, urlparse

import networkx as nx

from lineage.errors import LineageError
from lineage.graph.model import HUB_PREFIX

# A name matched by tokens below this confidence is not taken as that model (only offered as a guess).
MIN_CONFIDENCE = 0.75
# Two candidates closer than this are ambiguous: the name does not decide between them.
AMBIGUITY_MARGIN = 0.1
MIN_HASH_PREFIX = 6
# Hashes a node's `files` may carry (the catalog's published files, the files linked to a node).
FILE_HASH_KINDS = ("sha256", "autov1", "autov2", "autov3", "crc32")
SUGGESTIONS = 3
# The most a name scores against a candidate of another family (whose first word it lacks).
OTHER_FAMILY_MAX = 0.5

_HEX = re.compile(rf"(?:0x)?([0-9a-f]{{{MIN_HASH_PREFIX},64}})")
# A1111's checkpoint title: `name [hash]`, the hash its AutoV2 (10 digits) or its old hash, the AutoV1 (8).
A1111_TITLE = re.compile(r"(?P<name>.+?)\s*\[(?P<hash>[0-9a-f]{10}|[0-9a-f]{8})\]", re.IGNORECASE)
# The paths of civitai.com URLs that name a model or one of its versions, and which id each carries (a
# model page may add the version as `?modelVersionId=`). Version ids are unique across Civitai.
_CIVITAI_PATHS = (
    re.compile(r"/models/(?P<model>\d+)(?:/.*)?"),                # the model page, maybe with its slug
    re.compile(r"/api/download/models/(?P<version>\d+)/?"),       # a version's download link
    re.compile(r"/api/v1/model-versions/(?P<version>\d+)/?"),     # a version in Civitai's API
)
_REPO = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# Words in Civitai file names and titles that say nothing about which model it is.
_FILLER = frozenset({"version", "safetensors", "ckpt", "pt", "bin", "fp16", "fp32", "bf16", "pruned", "emaonly",
                     "model", "final", "sdxl", "checkpoint", "start", "with", "this", "one", "the"})
_EXTENSION = re.compile(r"\.(safetensors|ckpt|pt|bin|pth)$", re.IGNORECASE)
_CAMEL = re.compile(r"(?<=[a-z])(?=[A-Z])")
# A version: digits, maybe dotted or dashed (1.0, 1-0, 0.6.1), maybe one suffix letter (0.65s, 0.9r).
_VERSION = re.compile(r"(\d+(?:[.-]\d+)*)(?:([a-z])(?![a-z]))?")


@dataclass(frozen=True)
class Match:
    """A node a name was matched to: `how` (id, url, repo, civitai, hash, name, file name, tokens)
    and a `confidence` in [0, 1] (1 for exact matches)."""
    node: str
    confidence: float
    how: str


@dataclass(frozen=True)
class Tokens:
    words: frozenset[str]     # lower-case words, filler dropped
    numbers: frozenset[str]   # versions without dots and trailing zeros: "1", "065s"
    compact: str              # every letter and digit of the name, lower case, filler words removed
    lead: str                 # the first word: the family name ("noobai", "pony", "kohaku")
    letters: str              # `compact` without its digits, where a candidate's words are looked for


@functools.lru_cache(maxsize=65536)  # the same node names are scored against every name looked up
def tokens(text: str) -> Tokens:
    """The normalised tokens of a model name or file name (see the module doc)."""
    stem = _EXTENSION.sub("", PurePath(text).name)
    spaced = _CAMEL.sub(" ", stem).lower()
    for filler in ("version",):  # glued to the version in Civitai names (vPred065SVersion)
        spaced = spaced.replace(filler, " ")
    numbers = set()
    for m in _VERSION.finditer(spaced):
        digits = m.group(1).replace(".", "").replace("-", "")
        numbers.add((digits.rstrip("0") or "0") + (m.group(2) or ""))  # 1.0 = v10 = 1: trailing zeros say nothing
    words = [w for w in re.split(r"[^a-z]+", _VERSION.sub(" ", spaced)) if len(w) > 1 and w not in _FILLER]
    compact = "".join(ch for ch in spaced if ch.isalnum())
    letters = "".join(ch for ch in compact if not ch.isdigit())
    return Tokens(frozenset(words), frozenset(numbers), compact, words[0] if words else "", letters)


def token_score(query: Tokens, candidate: Tokens) -> float:
    """How well a name's tokens cover a candidate's: 1.0 when every word of the candidate appears in
    the name (as a run of its letters, so `noobaiXLNAIXL` contains `noobai` and `xl`) and the version
    numbers agree."""
    wanted = len(candidate.words) + len(candidate.numbers)
    if not wanted or not candidate.words:
        return 0.0
    found = sum(word in query.letters for word in candidate.words) + len(candidate.numbers & query.numbers)
    score = found / wanted
    if candidate.lead not in query.letters:
        score *= OTHER_FAMILY_MAX  # another family: "kohakuXLEpsilon" is no "NoobAI-XL eps"
    if query.numbers and not query.numbers & candidate.numbers:
        # the name carries a version this candidate does not have (a different one when it has any)
        score -= 0.5 if candidate.numbers else 0.1
    return max(score, 0.0)


# ---------------------------------------------------------------------------------------------
# What a node can be called


def repo_ids(attrs: dict[str, Any]) -> list[str]:
    """Every Hugging Face repo id a node is known by: its `huggingface` list, `repo`, and model URLs."""
    found = [e["repo"] if isinstance(e, dict) else e for e in attrs.get("huggingface", ())]  # catalog: {repo, source}
    found += [attrs["repo"]] if isinstance(attrs.get("repo"), str) else []
    for url in attrs.get("urls", ()):
        repo = huggingface_repo_of_url(url)
        if repo:
            found.append(repo)
    return list(dict.fromkeys(found))


def civitai_versions(attrs: dict[str, Any]) -> list[tuple[int | None, int | None]]:
    """(model id, version id) for each Civitai page a node lists; either may be unknown (None)."""
    found = [(int(c["model_id"]), int(c["version_id"]) if c.get("version_id") is not None else None)
             for c in attrs.get("civitai", ()) if isinstance(c, dict) and c.get("model_id") is not None]
    for url in [*attrs.get("urls", ()), *([attrs["civitai_url"]] if attrs.get("civitai_url") else [])]:
        ids = civitai_ids_of_url(url)
        if ids:
            found.append(ids)
    return list(dict.fromkeys(found))


def file_names(attrs: dict[str, Any]) -> list[str]:
    """The file names a node circulates under: catalog `files`, and the names of its recorded paths."""
    names = [f["name"] for f in attrs.get("files", ()) if isinstance(f, dict) and f.get("name")]
    names += [PurePath(p).name for p in attrs.get("paths", ()) if isinstance(p, str)]
    return list(dict.fromkeys(names))


def node_hashes(attrs: dict[str, Any]) -> list[str]:
    """Every hash a node carries (its `hashes` and those of its catalog `files`), lower case."""
    values = [v for v in (attrs.get("hashes") or {}).values() if isinstance(v, str)]
    for f in attrs.get("files", ()):
        if isinstance(f, dict):
            values += [v for k, v in f.items() if k in FILE_HASH_KINDS and isinstance(v, str)]
    return [v.lower().removeprefix("0x") for v in values]


def display_names(node: str, attrs: dict[str, Any]) -> list[str]:
    names = [attrs["name"]] if isinstance(attrs.get("name"), str) else []
    names += [n for n in attrs.get("names", ()) if isinstance(n, str)]
    return list(dict.fromkeys([*names, node]))


def _parse_url(url: str) -> ParseResult:
    """`url` parsed, with `https://` assumed when it starts with the host (`civitai.com/models/…`)."""
    url = url.strip()
    return urlparse(url if "://" in url else f"https://{url}")


def huggingface_repo_of_url(url: str) -> str | None:
    """`owner/name` of a huggingface.co model URL (not datasets or spaces)."""
    parsed = _parse_url(url)
    if parsed.netloc.lower() not in ("huggingface.co", "www.huggingface.co", "hf.co"):
        return None
    parts = [p for p in parsed.path.split("/") if p]
    if len(parts) >= 2 and parts[0] not in ("datasets", "spaces"):
        return f"{parts[0]}/{parts[1]}"
    return None


def civitai_ids_of_url(url: str) -> tuple[int | None, int | None] | None:
    """(model id, version id) of a civitai.com URL naming a model or a version (see `_CIVITAI_PATHS`);
    the one it does not say is None."""
    parsed = _parse_url(url)
    if not parsed.netloc.lower().endswith("civitai.com"):
        return None
    for pattern in _CIVITAI_PATHS:
        found = pattern.fullmatch(parsed.path)
        if found:
            ids = found.groupdict()
            version = ids.get("version") or parse_qs(parsed.query).get("modelVersionId", [""])[0]
            return (int(ids["model"]) if ids.get("model") else None,
                    int(version) if version.isdigit() else None)
    return None


# ---------------------------------------------------------------------------------------------
# Matching


class NameIndex:
    """Every way the nodes of one graph can be named, as dictionaries (built once per graph: a scan
    matches thousands of names against the same registry)."""

    def __init__(self, graph: nx.DiGraph):
        self.size = graph.number_of_nodes()
        self.nodes = set(graph)
        self.repos: dict[str, list[str]] = {}
        self.civitai_models: dict[int, list[str]] = {}
        self.civitai_versions: dict[int, list[str]] = {}
        self.names: dict[str, list[str]] = {}
        self.files: dict[str, list[str]] = {}
        self.labels: list[tuple[str, list[Tokens]]] = []
        hashes = []
        for node, attrs in graph.nodes(data=True):
            for repo in repo_ids(attrs):
                self.repos.setdefault(repo.lower(), []).append(node)
            for model_id, version_id in civitai_versions(attrs):
                if model_id is not None:
                    self.civitai_models.setdefault(model_id, []).append(node)
                if version_id is not None:
                    self.civitai_versions.setdefault(version_id, []).append(node)
            hashes += [(h, node) for h in node_hashes(attrs)]
            names = display_names(node, attrs)
            for name in names:
                self.names.setdefault(name.lower(), []).append(node)
            files = file_names(attrs)
            for f in files:
                self.files.setdefault(_EXTENSION.sub("", f.lower()), []).append(node)
            self.labels.append((node, [tokens(label) for label in names]))
        self.hashes = sorted(set(hashes))

    def by_hash_prefix(self, prefix: str) -> list[str]:
        start = bisect.bisect_left(self.hashes, (prefix, ""))
        found = []
        for value, node in self.hashes[start:]:
            if not value.startswith(prefix):
                break
            found.append(node)
        return _unique(found)


_INDEXES: weakref.WeakKeyDictionary[nx.DiGraph, NameIndex] = weakref.WeakKeyDictionary()


def name_index(graph: nx.DiGraph) -> NameIndex:
    """The index of `graph`, rebuilt when nodes were added or removed since."""
    index = _INDEXES.get(graph)
    if index is None or index.size != graph.number_of_nodes():
        index = _INDEXES[graph] = NameIndex(graph)
    return index


def nodes_with_hash(graph: nx.DiGraph, value: str) -> list[str]:
    """The nodes carrying a hash that is, or starts with, `value` (hex, any case, maybe 0x-prefixed)."""
    return name_index(graph).by_hash_prefix(value.lower().removeprefix("0x"))


def _unique(nodes: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(nodes))


def _exact(graph: nx.DiGraph, spec: str) -> list[Match]:
    """Matches that leave no doubt: id, URL, repo id, hash prefix, display name, file name."""
    text = spec.strip()
    low = text.lower()
    if text in graph:
        return [Match(text, 1.0, "id")]
    index = name_index(graph)
    repo = huggingface_repo_of_url(text) or (text if _REPO.fullmatch(text) else None)
    if repo:
        repo = repo.removeprefix(HUB_PREFIX)
        found = _unique(index.repos.get(repo.lower(), []))
        if not found and HUB_PREFIX + repo in graph:
            found = [HUB_PREFIX + repo]
        if found:
            return [Match(n, 1.0, "repo") for n in found]
    civitai = civitai_ids_of_url(text)
    if civitai:
        model_id, version_id = civitai
        # a model page without a version names every version: ambiguous unless it has one
        found = _unique(index.civitai_versions.get(version_id, []) if version_id is not None
                        else index.civitai_models.get(model_id, []) if model_id is not None else [])
        if found:
            return [Match(n, 1.0, "civitai") for n in found]
    hexed = _HEX.fullmatch(low)
    if hexed:
        found = index.by_hash_prefix(hexed.group(1))
        if found:
            return [Match(n, 1.0, "hash") for n in found]
    found = _unique(index.names.get(low, []))
    if found:
        return [Match(n, 1.0, "name") for n in found]
    found = _unique(index.files.get(_EXTENSION.sub("", PurePath(text).name.lower()), []))
    return [Match(n, 1.0, "file name") for n in found]


def _scored(graph: nx.DiGraph, spec: str, floor: float = 0.0) -> list[Match]:
    """The nodes scored by tokens against their display names, best first. With a `floor` that
    names of another family (their first word not in `spec`) cannot reach, nor come within
    AMBIGUITY_MARGIN of, they are not scored (a scan matches thousands of names against every node)."""
    query = tokens(spec)
    same_family_only = floor >= OTHER_FAMILY_MAX + AMBIGUITY_MARGIN
    scored = []
    for node, labels in name_index(graph).labels:
        best = max((token_score(query, label) for label in labels
                    if not same_family_only or label.lead in query.letters), default=0.0)
        if best > 0:
            scored.append(Match(node, round(best, 3), "tokens"))
    scored.sort(key=lambda m: (-m.confidence, m.node))
    return scored


def _a1111_title(graph: nx.DiGraph, title: re.Match[str], floor: float) -> list[Match]:
    """An A1111 checkpoint title `name [hash]`: the node carrying that hash, else what the name matches."""
    by_hash = name_index(graph).by_hash_prefix(title["hash"].lower())
    return [Match(n, 1.0, "hash") for n in by_hash] if by_hash else match(graph, title["name"], floor)


def match(graph: nx.DiGraph, spec: str, floor: float = 0.0) -> list[Match]:
    """The nodes `spec` may name, best first: exact matches (confidence 1), else token matches (those
    below `floor` may be left out)."""
    title = A1111_TITLE.fullmatch(spec.strip())
    if title:
        return _a1111_title(graph, title, floor)
    exact = _exact(graph, spec)
    return exact if exact else _scored(graph, spec, floor)


def decisive(found: list[Match], min_confidence: float = MIN_CONFIDENCE) -> Match | None:
    """The first of `found` (best first) when it has at least `min_confidence` and no other comes
    within AMBIGUITY_MARGIN of it; else None."""
    if not found or found[0].confidence < min_confidence:
        return None
    if len(found) > 1 and found[0].confidence - found[1].confidence < AMBIGUITY_MARGIN:
        return None
    return found[0]


def best_match(graph: nx.DiGraph, spec: str, min_confidence: float = MIN_CONFIDENCE) -> Match | None:
    """The one node `spec` names with at least `min_confidence`, or None when nothing does or two
    candidates are too close to tell apart."""
    return decisive(match(graph, spec, floor=min_confidence), min_confidence)


def suggestions(graph: nx.DiGraph, spec: str, count: int = SUGGESTIONS) -> list[str]:
    """The closest names for a miss: each node scored by its tokens or by spelling (difflib), best first."""
    query, low = tokens(spec), spec.lower()
    scored = []
    for node, attrs in graph.nodes(data=True):
        labels = display_names(node, attrs)
        spelling = max(difflib.SequenceMatcher(None, low, label.lower()).ratio() for label in labels)
        by_tokens = max(token_score(query, tokens(label)) for label in [*labels, *file_names(attrs)])
        scored.append((-max(spelling, by_tokens), node))
    return [node for score, node in sorted(scored)[:count] if score < -0.4]


def describe_node(graph: nx.DiGraph, node: str) -> str:
    name = graph.nodes[node].get("name") if node in graph else None
    return node if not name or name == node else f"{name} [{node}]"


def resolve(graph: nx.DiGraph, spec: str, min_confidence: float = MIN_CONFIDENCE) -> Match:
    """The node `spec` names; an unknown or ambiguous name is an error listing the closest names."""
    found = match(graph, spec)
    good = [m for m in found if m.confidence >= min_confidence]
    if good and (len(good) == 1 or good[0].confidence - good[1].confidence >= AMBIGUITY_MARGIN):
        return good[0]
    if len(good) > 1:
        names = ", ".join(describe_node(graph, m.node) for m in good[:8])
        raise LineageError(f"{spec!r} is ambiguous: it names {names}; give a node id")
    hint = suggestions(graph, spec)
    did_you_mean = f"; did you mean {', '.join(describe_node(graph, n) for n in hint)}?" if hint else ""
    raise LineageError(f"no node {spec!r}: not a file, node id, hash, Hugging Face repo, Civitai URL or name "
                       f"known to the registry or the catalog{did_you_mean}")
