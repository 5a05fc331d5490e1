"""The user's registry: nodes, edges, hashes and file paths, kept in one SQLite file.

Where: `--registry PATH`, else `$LINEAGE_HOME/registry.sqlite`, else the user data directory
(`~/.local/share/lineage` on Linux). The built-in catalog is a read-only layer under it: `graph()`
returns both, user edges may hang under catalog nodes, and nothing can change a catalog node.

Every change happens in one SQLite transaction (`with registry.batch() as b: ...`) that takes the
write lock up front and waits for other writers, so concurrent processes never lose a write and an
error leaves the registry as it was. A file that is not a registry, is damaged, or has a newer
schema is reported and left untouched, never reset. A damaged row inside a healthy file (attributes
that are not JSON, a path or edge naming no node) is skipped with a warning that names it, so the rest
keeps working; `lmerge registry check --repair` (lineage/graph/repair.py) removes such rows. A full or
read-only disk is reported as that.

Tables: `nodes` (id, name, JSON attributes), `edges` (parent, child, relation, JSON attributes;
the parent may be a catalog node), `hashes` (every known hash of a node, to resolve the hashes other
tools write into metadata) and `paths` (where a node's file was seen, with size and mtime so an
unchanged file is not hashed again).
"""
from __future__ import annotations

import gc
import json
import logging
import os
import re
import sqlite3
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import networkx as nx

from lineage.errors import LineageError
from lineage.graph.catalog import catalog_graph, is_catalog_node
from lineage.graph.model import check_relation, is_placeholder, reference_id
from lineage.io import strict_json
from lineage.io.inputs import check_input

SCHEMA_VERSION = 1
APPLICATION_ID = 0x4C4E4752  # "LNGR" in SQLite's header: tells our registries from other databases
REGISTRY_FILE = "registry.sqlite"
LOCK_TIMEOUT_S = 60.0
HASH_KINDS = ("autov3", "sha256", "autov1", "autov2", "crc32")
_HASH_PREFIX = re.compile(r"[0-9a-f]{8,64}")

SCHEMA = """
CREATE TABLE nodes (id TEXT PRIMARY KEY, name TEXT COLLATE NOCASE, attrs TEXT NOT NULL);
CREATE INDEX nodes_by_name ON nodes (name);
CREATE TABLE edges (parent TEXT NOT NULL, child TEXT NOT NULL, relation TEXT NOT NULL, attrs TEXT NOT NULL,
                    PRIMARY KEY (parent, child));
CREATE INDEX edges_by_child ON edges (child);
CREATE TABLE hashes (kind TEXT NOT NULL, value TEXT NOT NULL, node_id TEXT NOT NULL,
                     PRIMARY KEY (kind, value, node_id));
CREATE INDEX hashes_by_value ON hashes (value);
CREATE INDEX hashes_by_node ON hashes (node_id);
CREATE TABLE paths (path TEXT PRIMARY KEY, node_id TEXT NOT NULL, size INTEGER, mtime_ns INTEGER,
                    seen_at REAL NOT NULL);
CREATE INDEX paths_by_node ON paths (node_id);
"""

# Is `target` among the ancestors of `start` along user edges? (Catalog edges never lead back into user
# nodes.) Walked upwards: a model's ancestry is bounded by what its metadata may name, while a popular
# base's descendants can be the whole registry.
_IS_ANCESTOR = """
WITH RECURSIVE above(id) AS (SELECT ? UNION SELECT edges.parent FROM edges JOIN above ON edges.child = above.id)
SELECT 1 FROM above WHERE id = ? LIMIT 1
"""


log = logging.getLogger(__name__)

# SQLite's messages for a write the disk refused -> what we tell the user.
_DISK_PROBLEMS = (
    ("disk is full", "the disk holding the registry is full; nothing was changed (free some space and retry)"),
    ("readonly", "the registry is on a read-only disk or in a folder this user cannot write to; nothing was "
                 "changed (choose a writable place with --registry or LINEAGE_HOME)"),
    ("disk i/o error", "the disk failed a read or write of the registry (it may be full or failing); "
                       "nothing was changed"),
)

# Every node as one JSON object {id: attrs} and every edge as one JSON array [[parent, child, attrs]].
_ALL_NODES = "SELECT '{' || coalesce(group_concat(json_quote(id) || ':' || attrs, ','), '') || '}' FROM nodes"
_ALL_EDGES = ("SELECT '[' || coalesce(group_concat('[' || json_quote(parent) || ',' || json_quote(child) || ',' "
              "|| attrs || ']', ','), '') || ']' FROM edges")


def user_data_dir() -> Path:
    """The per-user data directory of this platform, for lineage."""
    home = Path.home()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or home / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = home / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_DATA_HOME") or home / ".local" / "share")
    return base / "lineage"


def default_registry_path() -> Path:
    """`$LINEAGE_HOME/registry.sqlite`, else the registry in the user data directory."""
    home = os.environ.get("LINEAGE_HOME")
    return (Path(home) if home else user_data_dir()) / REGISTRY_FILE


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while building a big graph: its passes over the hundreds of
    thousands of new dicts (none of them garbage) would otherwise take half the time."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _dumps(value: Any, what: str) -> str:
    """A row's attributes as JSON text; NaN and infinities are refused (SQLite's JSON functions, other
    JSON readers and our own exports could not read them back), naming `what` would have held one."""
    try:
        return strict_json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    except strict_json.JSONError as e:
        raise LineageError(f"refusing to record {what}: {e} (NaN and infinities cannot be stored)") from None


def _loads(text: str) -> Any:
    """A stored row's attributes. Versions before the refusal in `_dumps` stored NaN and infinities (as
    `json.dumps` writes them: NaN, Infinity, -Infinity); they read as null, an unknown value, so that
    one such row cannot make the whole registry unreadable."""
    return json.loads(text, parse_constant=lambda _: None)


_SHORTEN_HASHES = re.compile(r"\b([0-9a-f]{12})[0-9a-f]{52}\b")
_DAMAGED_ROW = "its attributes are not a JSON object (lmerge registry check --repair removes the row)"


@dataclass(frozen=True)
class Damage:
    """One damaged row: which table, which row (its key) and what is wrong with it."""

    table: str
    key: str
    problem: str

    def __str__(self) -> str:
        """The row for people: full-length hashes shortened to 12 digits (the key itself stays whole)."""
        return _SHORTEN_HASHES.sub(r"\1…", f"{self.table} row {self.key!r}: {self.problem}")


def _attrs_of(text: Any) -> dict[str, Any] | None:
    """A stored row's attributes, or None when they are not a JSON object (a damaged row)."""
    try:
        value = _loads(text) if isinstance(text, str) else None
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


# How each table's rows are named in a `Damage` -> the statement that deletes exactly that row.
_DELETE_ROW = {
    "nodes": ("DELETE FROM nodes WHERE id = ?", lambda key: (key,)),
    "paths": ("DELETE FROM paths WHERE path = ?", lambda key: (key,)),
    "edges": ("DELETE FROM edges WHERE parent = ? AND child = ?", lambda key: tuple(key.split(" -> ", 1))),
    "hashes": ("DELETE FROM hashes WHERE kind = ? AND value = ? AND node_id = ?", lambda key: tuple(key.split(":", 2))),
}


class Registry:
    """A registry file, opened (and created on first use).

    >>> reg = Registry()                      # $LINEAGE_HOME or the user data dir
    >>> g = reg.graph()                       # networkx DiGraph: catalog + the user's nodes and edges
    >>> reg.find_paths(autov3)                # where files with this content were seen
    """

    def __init__(self, path: str | os.PathLike | None = None):
        chosen = Path(path) if path is not None else default_registry_path()
        self.path = chosen / REGISTRY_FILE if chosen.is_dir() else chosen
        if path is not None and not self.path.parent.is_dir():  # a typo must not create an empty registry
            raise LineageError(f"the folder {os.fspath(self.path.parent)!r} does not exist; create it first or "
                               "fix the --registry path", self.path)
        self.damage: list[Damage] = []  # damaged rows met by the last read of the whole user layer
        self._reported: set[Damage] = set()  # damaged rows already warned about
        if os.path.lexists(self.path):
            check_input(self.path)  # a pipe, device or broken link is no registry
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise LineageError(f"cannot create the registry's folder ({e.strerror})", self.path.parent) from None
        with self._errors_as_lineage_errors():
            self._conn = sqlite3.connect(self.path, timeout=LOCK_TIMEOUT_S, isolation_level=None)
            try:
                self._open_schema()
            except BaseException:
                self._conn.close()
                raise

    # -- opening -------------------------------------------------------------------------------
    def _open_schema(self) -> None:
        version = self._conn.execute("PRAGMA user_version").fetchone()[0]
        if version == 0:
            self._create_schema()
            version = self._conn.execute("PRAGMA user_version").fetchone()[0]
        app_id = self._conn.execute("PRAGMA application_id").fetchone()[0]
        if app_id != APPLICATION_ID:
            raise LineageError("is an SQLite database but not a lineage registry; it was left as it is "
                               "(choose another file with --registry or LINEAGE_HOME)", self.path)
        if version > SCHEMA_VERSION:
            raise LineageError(f"registry schema version {version} is newer than this lineage understands "
                               f"({SCHEMA_VERSION}); upgrade lineage (the registry was left as it is)", self.path)

    def _create_schema(self) -> None:
        """Create the tables of a new (empty) file; several processes may race to do it, and a
        database of another application is refused before anything in it changes."""
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            fresh = self._conn.execute("PRAGMA user_version").fetchone()[0] == 0
            if fresh and self._conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
                raise LineageError("is an SQLite database but not a lineage registry; it was left as it is "
                                   "(choose another file with --registry or LINEAGE_HOME)", self.path)
            if fresh:
                for statement in SCHEMA.split(";"):
                    if statement.strip():
                        self._conn.execute(statement)
                self._conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                self._conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            self._conn.execute("COMMIT")
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        if fresh:
            self._conn.execute("PRAGMA journal_mode = WAL")  # kept in the file: readers never wait for a writer

    @contextmanager
    def _errors_as_lineage_errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.OperationalError as e:
            message = str(e)
            for marker, problem in _DISK_PROBLEMS:
                if marker in message.lower():
                    raise LineageError(f"{problem} ({message})", self.path) from None
            if "locked" in message or "busy" in message:
                raise LineageError(f"registry is locked by another process (waited {LOCK_TIMEOUT_S:.0f} s)",
                                   self.path) from None
            if "unable to open" in message:
                raise LineageError(f"cannot open the registry ({message})", self.path) from None
            raise LineageError(f"registry cannot be read ({message}); it was left as it is "
                               "(restore it from an export or move it away)", self.path) from None
        except sqlite3.IntegrityError:
            raise  # a bug in this module, not a damaged file
        except sqlite3.DatabaseError as e:
            raise LineageError(f"is not a lineage registry or is damaged ({e}); it was left as it is "
                               "(restore it from an export or move it away)", self.path) from None

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading -------------------------------------------------------------------------------
    @contextmanager
    def _snapshot(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: one consistent view while other processes write."""
        with self._errors_as_lineage_errors():
            if self._conn.in_transaction:  # read inside a batch (a name resolved while writing): its view is ours
                yield self._conn
                return
            self._conn.execute("BEGIN")
            try:
                yield self._conn
            finally:
                self._conn.execute("COMMIT")

    def has_node(self, node_id: str) -> bool:
        if is_catalog_node(node_id):
            return True
        with self._errors_as_lineage_errors():
            return self._conn.execute("SELECT 1 FROM nodes WHERE id = ?", (node_id,)).fetchone() is not None

    def node(self, node_id: str) -> dict[str, Any]:
        """A node's attributes (a user node's also lists its `paths`, most recent first)."""
        catalog = catalog_graph()
        if node_id in catalog:
            return dict(catalog.nodes[node_id])
        with self._snapshot() as conn:
            row = conn.execute("SELECT attrs FROM nodes WHERE id = ?", (node_id,)).fetchone()
            paths = [p for (p,) in conn.execute(
                "SELECT path FROM paths WHERE node_id = ? ORDER BY seen_at DESC, path", (node_id,))]
        if row is None:
            raise LineageError(f"no node {node_id!r} in the registry or the catalog")
        attrs = _attrs_of(row[0])
        if attrs is None:
            raise LineageError(f"node {node_id!r} is damaged: {_DAMAGED_ROW}", self.path)
        if paths:
            attrs["paths"] = paths
        return attrs

    def file_check(self) -> list[str]:
        """SQLite's check of the file's pages and indexes: ["ok"] when sound."""
        with self._snapshot() as conn:
            return [row[0] for row in conn.execute("PRAGMA quick_check")]

    def stray_hashes(self) -> list[Damage]:
        """Hash rows that name no (readable) user node."""
        with self._snapshot() as conn:
            rows = conn.execute("SELECT kind, value, node_id FROM hashes WHERE node_id NOT IN "
                                "(SELECT id FROM nodes WHERE json_valid(attrs) AND json_type(attrs) = 'object')")
            return [Damage("hashes", f"{kind}:{value}:{node_id}", f"points at node {node_id!r}, which is "
                           "missing") for kind, value, node_id in rows if not is_catalog_node(node_id)]

    def find_paths(self, autov3: str) -> list[str]:
        """File paths seen for a content hash (AutoV3), most recently seen first."""
        with self._errors_as_lineage_errors():
            rows = self._conn.execute(  # the node id is the AutoV3, with a suffix for files with prediction markers
                "SELECT path FROM paths WHERE node_id = ? OR node_id IN (SELECT node_id FROM hashes WHERE "
                "kind = 'autov3' AND value = ?) ORDER BY seen_at DESC, path", (autov3.lower(), autov3.lower()))
            return [p for (p,) in rows]

    def most_recent_first(self, paths: Iterable[str]) -> list[str]:
        """`paths` ordered by when their file was last seen, most recent first (paths never seen last)."""
        seen: dict[str, float] = {}
        with self._errors_as_lineage_errors():
            for path in paths:
                row = self._conn.execute("SELECT seen_at FROM paths WHERE path = ?", (path,)).fetchone()
                seen[path] = row[0] if row else float("-inf")
        return sorted(seen, key=lambda p: -seen[p])

    def known_file(self, path: str | os.PathLike) -> tuple[str, dict[str, str]] | None:
        """(node id, hashes) of a file recorded before whose size and mtime have not changed since."""
        absolute = os.path.abspath(path)
        stat = os.stat(absolute)
        with self._errors_as_lineage_errors():
            row = self._conn.execute(
                "SELECT node_id FROM paths WHERE path = ? AND size = ? AND mtime_ns = ?",
                (absolute, stat.st_size, stat.st_mtime_ns)).fetchone()
            if row is None:
                return None
            rows = self._conn.execute("SELECT kind, value FROM hashes WHERE node_id = ?", (row[0],)).fetchall()
        # A node's files share their tensor data, not their metadata: a whole-file hash the node holds
        # several of (its files' sha256 differ) belongs to none of them in particular, so it is not given.
        kinds = [kind for kind, _ in rows]
        hashes = {kind: value for kind, value in rows if kinds.count(kind) == 1}
        return (row[0], hashes) if "autov3" in hashes else None

    def known_autov3(self, paths: Iterable[str | os.PathLike]) -> list[str | None]:
        """The AutoV3 of each file recorded before and unchanged since (see `known_file`), else None."""
        return [known[1]["autov3"] if (known := self.known_file(p)) else None for p in paths]

    def find_by_hash(self, value: str, kind: str | None = None) -> list[str]:
        """Nodes whose `kind` hash is `value`; without `kind`, nodes with any hash starting with `value`."""
        value = value.lower().removeprefix("0x")
        with self._errors_as_lineage_errors():
            if kind:
                rows = self._conn.execute("SELECT node_id FROM hashes WHERE kind = ? AND value = ? ORDER BY node_id",
                                          (kind, value))
            else:
                rows = self._conn.execute(
                    "SELECT DISTINCT node_id FROM hashes WHERE value >= ? AND value < ? ORDER BY node_id",
                    (value, value + "\uffff"))
            return [n for (n,) in rows]

    def find_by_name(self, name: str) -> list[str]:
        """User nodes whose display name is `name` (ignoring case)."""
        with self._errors_as_lineage_errors():
            return [n for (n,) in self._conn.execute("SELECT id FROM nodes WHERE name = ? ORDER BY id", (name,))]

    def resolve(self, spec: str | os.PathLike) -> str:
        """The model `spec` names (see `_resolve_id`); a file linked to a model names that model."""
        from lineage.graph.editing import canonical  # links: lineage/graph/editing.py

        return canonical(self, self._resolve_id(spec))

    def _resolve_id(self, spec: str | os.PathLike) -> str:
        """The node that `spec` names: a recorded file, a node id, a hash prefix, a Hugging Face repo
        id or URL, a Civitai URL, a display name or a Civitai-style file name (lineage/graph/naming.py).
        Ambiguous or unknown names are errors that list what was found or the closest names."""
        spec = os.fspath(spec)
        if os.path.lexists(spec) and not os.path.isdir(spec):
            check_input(spec)  # a pipe or a broken link named as a model is refused, not looked up by name
        if os.path.isfile(spec):
            known = self.known_file(spec)
            if known:
                node_id: str | None = known[0]
            else:  # the id depends on prediction markers too (recording.py), not on the AutoV3 alone
                from lineage.graph.recording import describe

                try:
                    node_id = describe(spec).node_id
                except LineageError:
                    node_id = None
            if node_id is None or not self.has_node(node_id):
                raise LineageError("is not in the registry yet; record it with `lmerge add` first", spec)
            return node_id
        if self.has_node(spec):
            return spec
        if _HASH_PREFIX.fullmatch(spec.lower().removeprefix("0x")):
            candidates = self.find_by_hash(spec)
            if len(candidates) > 1:
                raise LineageError(f"{spec!r} is ambiguous: it names {', '.join(candidates[:8])}; give a node id")
            if candidates:
                return candidates[0]
        from lineage.graph.naming import resolve  # repo ids, URLs, names, file names: see naming.py
        return resolve(self.graph(), spec).node

    def _user_layer(self) -> tuple[dict[str, dict[str, Any]], list[tuple[str, str, dict[str, Any]]]]:
        """(node id -> attributes, [(parent, child, attributes)]) of the user's part, read in one snapshot.

        SQLite joins each table into one JSON text (the stored attribute texts as they are, so a row
        an older version wrote with NaN reads as null rather than failing SQLite's JSON check) that
        Python parses in a single call: ~10x faster than decoding 100,000 rows one by one. When that
        fails (a damaged row), the rows are read one by one and the damaged ones skipped: see `damage`."""
        with self._snapshot() as conn:
            try:
                nodes = _loads(conn.execute(_ALL_NODES).fetchone()[0])
                edges = [tuple(edge) for edge in _loads(conn.execute(_ALL_EDGES).fetchone()[0])]
                damage: list[Damage] = []
                if not all(isinstance(a, dict) for a in nodes.values()) or \
                        not all(isinstance(a, dict) for _, _, a in edges):
                    raise ValueError("a row's attributes are not an object")
            except (ValueError, RecursionError):
                nodes, edges, damage = self._rows_one_by_one(conn)
            for node_id, path in conn.execute("SELECT node_id, path FROM paths ORDER BY seen_at DESC, path"):
                if node_id in nodes:
                    nodes[node_id].setdefault("paths", []).append(path)
                else:
                    damage.append(Damage("paths", path, f"points at node {node_id!r}, which is missing"))
        kept = []
        for parent, child, attrs in edges:
            missing = [n for n in (parent, child) if n not in nodes and not is_catalog_node(n)]
            if missing:
                damage.append(Damage("edges", f"{parent} -> {child}", f"names node {missing[0]!r}, which is "
                                                                      "missing"))
            else:
                kept.append((parent, child, attrs))
        self.damage = damage
        for row in damage:
            if row in self._reported:
                continue  # once per command, however often it reads the graph
            self._reported.add(row)
            log.warning("warning: %s: damaged registry row skipped: %s (lmerge registry check --repair "
                        "removes it)", self.path, row)
        return nodes, kept

    @staticmethod
    def _rows_one_by_one(conn: sqlite3.Connection) -> tuple[dict[str, dict[str, Any]],
                                                          list[tuple[str, str, dict[str, Any]]], list[Damage]]:
        """The node and edge rows decoded one at a time, the damaged ones left out and listed."""
        nodes, edges, damage = {}, [], []
        for node_id, text in conn.execute("SELECT id, attrs FROM nodes"):
            attrs = _attrs_of(text)
            if attrs is None:
                damage.append(Damage("nodes", node_id, "its attributes are not a JSON object"))
            else:
                nodes[node_id] = attrs
        for parent, child, text in conn.execute("SELECT parent, child, attrs FROM edges"):
            attrs = _attrs_of(text)
            if attrs is None:
                damage.append(Damage("edges", f"{parent} -> {child}", "its attributes are not a JSON object"))
            else:
                edges.append((parent, child, attrs))
        return nodes, edges, damage

    def user_graph(self) -> nx.DiGraph:
        """The user's own nodes and edges, with the catalog nodes those edges hang from (as in the catalog)."""
        with _gc_paused():
            nodes, edges = self._user_layer()
            catalog = catalog_graph()
            graph = nx.DiGraph()
            graph.add_nodes_from((n, catalog.nodes[n]) for n in {p for p, _, _ in edges} if n in catalog)
            graph.add_nodes_from(nodes.items())
            graph.add_edges_from(edges)
        return graph

    def graph(self) -> nx.DiGraph:
        """The lineage graph: the built-in catalog with the user's nodes and edges over it."""
        with _gc_paused():
            nodes, edges = self._user_layer()
            graph = nx.DiGraph(catalog_graph())
            graph.add_nodes_from(nodes.items())
            graph.add_edges_from(edges)
        from lineage.graph.editing import fold_aliases  # a file linked to a model shows as that model

        return fold_aliases(graph)

    # -- writing -------------------------------------------------------------------------------
    @contextmanager
    def batch(self) -> Iterator[Batch]:
        """One transaction: everything done through the batch is committed together, or nothing."""
        with self._errors_as_lineage_errors():
            self._conn.execute("BEGIN IMMEDIATE")  # take the write lock now, waiting for other writers
            try:
                yield Batch(self._conn)
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def import_graph(self, graph: nx.DiGraph) -> dict[str, int]:
        """Add the nodes and edges of `graph` (from an export) in one transaction.

        Catalog nodes, and edges the catalog already has, are skipped; anything that would change
        the catalog, point to an unknown node or close a cycle refuses the whole import."""
        if not nx.is_directed_acyclic_graph(graph):
            cycle = " -> ".join(u for u, _ in nx.find_cycle(graph))
            raise LineageError(f"the imported graph has a cycle ({cycle}); nothing was imported")
        catalog = catalog_graph()
        counts = {"nodes": 0, "edges": 0, "skipped_catalog": 0}
        with self.batch() as b:
            for node_id in nx.topological_sort(graph):
                attrs = dict(graph.nodes[node_id])
                if node_id in catalog:
                    counts["skipped_catalog"] += 1
                    continue
                paths = attrs.pop("paths", [])
                b.put_node(node_id, attrs)
                for p in reversed(paths):  # oldest first, so the most recent keeps the newest seen_at
                    b.put_path(node_id, p)
                counts["nodes"] += 1
            # Parents before children: each cycle check then only walks edges already in the registry.
            for parent, child in ((p, c) for p in nx.topological_sort(graph) for c in graph.successors(p)):
                attrs = dict(graph.edges[parent, child])
                if child in catalog:
                    if catalog.has_edge(parent, child):
                        counts["skipped_catalog"] += 1
                        continue
                    raise LineageError(f"the import would add {parent} -> {child} under the read-only "
                                       "catalog node; nothing was imported")
                b.put_edge(parent, child, attrs.pop("relation"), **attrs)
                counts["edges"] += 1
        return counts


class Batch:
    """Writes inside one registry transaction (see `Registry.batch`)."""

    def __init__(self, conn: sqlite3.Connection):
        self._conn = conn

    def has_node(self, node_id: str) -> bool:
        return is_catalog_node(node_id) or self.node_attrs(node_id) is not None

    def remove_damaged(self, row: Damage) -> int:
        """Delete one row that `lmerge registry check` found damaged; returns how many rows went (0 or 1)."""
        statement, key = _DELETE_ROW[row.table]
        return self._conn.execute(statement, key(row.key)).rowcount

    def node_attrs(self, node_id: str) -> dict[str, Any] | None:
        return self._stored_attrs("SELECT attrs FROM nodes WHERE id = ?", (node_id,), f"node {node_id!r}")

    def edge_attrs(self, parent: str, child: str) -> dict[str, Any] | None:
        """The stored edge parent -> child (its relation among its attributes), or None when there is none."""
        return self._stored_attrs("SELECT attrs FROM edges WHERE parent = ? AND child = ?", (parent, child),
                                  f"the edge {parent} -> {child}")

    def _stored_attrs(self, query: str, key: tuple[str, ...], what: str) -> dict[str, Any] | None:
        """The attributes of the row `query` finds by `key`: None when there is none, an error naming
        `what` when they are damaged."""
        row = self._conn.execute(query, key).fetchone()
        if row is None:
            return None
        attrs = _attrs_of(row[0])
        if attrs is None:
            raise LineageError(f"{what} is damaged: {_DAMAGED_ROW}")
        return attrs

    def put_node(self, node_id: str, attrs: Mapping[str, Any], defaults: Mapping[str, Any] | None = None) -> None:
        """Create or update a node: `attrs` replace stored values, `defaults` only fill gaps;
        `names` (every name the node was seen under) and `hashes` accumulate."""
        if is_catalog_node(node_id):
            raise LineageError(f"{node_id!r} is a built-in catalog node and cannot be changed; "
                               "link your file to it instead (lmerge link FILE NODE)")
        existing = self.node_attrs(node_id)
        stored = existing or {}
        merged = {**(defaults or {}), **stored, **attrs}
        names = [*stored.get("names", []), *attrs.get("names", [])]
        for source in (stored, defaults or {}, attrs):
            if source.get("name"):
                names.append(source["name"])
        merged["names"] = sorted(set(names))
        merged["hashes"] = {**stored.get("hashes", {}), **(defaults or {}).get("hashes", {}), **attrs.get("hashes", {})}
        if not merged["hashes"]:
            del merged["hashes"]
        merged = {k: v for k, v in merged.items() if v is not None and v != []}
        if merged == existing:
            return
        self._conn.execute("INSERT INTO nodes (id, name, attrs) VALUES (?, ?, ?) ON CONFLICT (id) DO UPDATE SET "
                           "name = excluded.name, attrs = excluded.attrs",
                           (node_id, merged.get("name"), _dumps(merged, f"node {node_id}")))
        self._conn.executemany("INSERT OR IGNORE INTO hashes (kind, value, node_id) VALUES (?, ?, ?)",
                               [(k, v.lower(), node_id) for k, v in merged.get("hashes", {}).items()
                                if k in HASH_KINDS and v])

    def put_path(self, node_id: str, path: str | os.PathLike, stat: os.stat_result | None = None) -> None:
        """Remember that `node_id`'s file was seen at `path` (with its size and mtime, when given)."""
        absolute = os.path.abspath(path)
        size, mtime = (stat.st_size, stat.st_mtime_ns) if stat else (None, None)
        row = self._conn.execute("SELECT node_id, size, mtime_ns FROM paths WHERE path = ?", (absolute,)).fetchone()
        if row == (node_id, size, mtime) or (row and row[0] == node_id and stat is None):
            return  # nothing new: keep the time it was first seen like this
        self._conn.execute("INSERT INTO paths (path, node_id, size, mtime_ns, seen_at) VALUES (?, ?, ?, ?, ?) "
                           "ON CONFLICT (path) DO UPDATE SET node_id = excluded.node_id, size = excluded.size, "
                           "mtime_ns = excluded.mtime_ns, seen_at = excluded.seen_at",
                           (absolute, node_id, size, mtime, time.time()))

    def put_edge(self, parent: str, child: str, relation: str, **attrs: Any) -> None:
        """Create or update parent -> child. Refuses unknown nodes, catalog children and cycles."""
        check_relation(relation)
        if is_catalog_node(child):
            raise LineageError(f"{child!r} is a built-in catalog node; its parents cannot be changed")
        for node_id in (parent, child):
            if not self.has_node(node_id):
                raise LineageError(f"no node {node_id!r} in the registry or the catalog")
        if parent == child or self._conn.execute(_IS_ANCESTOR, (parent, child)).fetchone():
            raise LineageError(f"refusing edge {parent} -> {child}: the parent already descends from the "
                               "child (a model cannot descend from itself)")
        stored = {k: v for k, v in attrs.items() if v is not None}
        row = self._conn.execute("SELECT relation, attrs FROM edges WHERE parent = ? AND child = ?",
                                 (parent, child)).fetchone()
        if row and row[0] == relation and _attrs_of(row[1]) == {**stored, "relation": relation}:
            return
        self._conn.execute("INSERT INTO edges (parent, child, relation, attrs) VALUES (?, ?, ?, ?) "
                           "ON CONFLICT (parent, child) DO UPDATE SET relation = excluded.relation, "
                           "attrs = excluded.attrs",
                           (parent, child, relation, _dumps({**stored, "relation": relation},
                                                            f"the edge {parent} -> {child}")))

    def parents(self, child: str) -> list[str]:
        """The stored parents of `child` (user edges)."""
        return [p for (p,) in self._conn.execute("SELECT parent FROM edges WHERE child = ? ORDER BY parent", (child,))]

    def delete_edge(self, parent: str, child: str) -> None:
        self._conn.execute("DELETE FROM edges WHERE parent = ? AND child = ?", (parent, child))

    def delete_node(self, node_id: str) -> None:
        """Remove a user node with its edges, hashes and paths."""
        self._conn.execute("DELETE FROM edges WHERE parent = ? OR child = ?", (node_id, node_id))
        self._delete_node(node_id)

    def drop_parents(self, child: str, sources: Iterable[str], keep: Iterable[str]) -> None:
        """Remove edges into `child` that its own metadata gave (`source` one of `sources`, no `via`
        another file) and whose parent is not in `keep` (a re-scan found other parents), and the
        placeholders left without any edge."""
        kept, dropped_sources = set(keep), set(sources)
        for parent, text in self._conn.execute("SELECT parent, attrs FROM edges WHERE child = ?", (child,)).fetchall():
            attrs = _attrs_of(text) or {}  # a damaged edge row came from no known source: kept
            if parent not in kept and attrs.get("source") in dropped_sources and "via" not in attrs:
                self._conn.execute("DELETE FROM edges WHERE parent = ? AND child = ?", (parent, child))
                if is_placeholder(parent):
                    self._drop_if_orphan(parent)

    def _drop_if_orphan(self, node_id: str) -> None:
        if not self._conn.execute("SELECT 1 FROM edges WHERE parent = ? OR child = ? LIMIT 1",
                                  (node_id, node_id)).fetchone():
            self._delete_node(node_id)

    def _delete_node(self, node_id: str) -> None:
        for table, column in (("nodes", "id"), ("hashes", "node_id"), ("paths", "node_id")):
            self._conn.execute(f"DELETE FROM {table} WHERE {column} = ?", (node_id,))

    def absorb_placeholders(self, node_id: str, hashes: Mapping[str, str | None]) -> list[str]:
        """Placeholders for this node's file (a parent that metadata named by sha256, AutoV1 or
        AutoV2 before the file itself was recorded) become `node_id`: their edges move over."""
        absorbed = []
        for kind in ("sha256", "autov1", "autov2"):
            if not hashes.get(kind):
                continue
            placeholder = reference_id(kind, hashes[kind])
            attrs = self.node_attrs(placeholder)
            if attrs is None:
                continue
            self.put_node(node_id, {"names": attrs.get("names", [])})
            edges = self._conn.execute("SELECT parent, child, relation, attrs FROM edges WHERE parent = ? OR child = ?",
                                       (placeholder, placeholder)).fetchall()
            self._delete_node(placeholder)
            self._conn.execute("DELETE FROM edges WHERE parent = ? OR child = ?", (placeholder, placeholder))
            for parent, child, relation, edge_attrs in edges:
                moved = {k: v for k, v in (_attrs_of(edge_attrs) or {}).items() if k != "relation"}
                self.put_edge(node_id if parent == placeholder else parent,
                              node_id if child == placeholder else child, relation, **moved)
            absorbed.append(placeholder)
        return absorbed


def open_registry(registry: str | os.PathLike | Registry | None = None) -> Registry:
    """`registry` itself when it is a Registry, else the registry at that path (None: the default)."""
    return registry if isinstance(registry, Registry) else Registry(registry)


@contextmanager
def using_registry(registry: str | os.PathLike | Registry | None = None) -> Iterator[Registry]:
    """The registry to work on for one call; closed afterwards only if it was opened here."""
    reg = open_registry(registry)
    try:
        yield reg
    finally:
        if reg is not registry:
            reg.close()


def known_hashes(paths: Sequence[str | os.PathLike], registry: str | os.PathLike | Registry | None = None
                 ) -> list[dict[str, str]]:
    """The hashes ({kind: hex}) of each file that an existing registry has seen unchanged ({} for the
    others), in one call, so that a run need not hash it again; a registry that does not exist yet is
    not created for this."""
    if not isinstance(registry, Registry) and not Path(registry or default_registry_path()).exists():
        return [{} for _ in paths]
    with using_registry(registry) as reg:
        return [known[1] if (known := reg.known_file(p)) else {} for p in paths]


def known_autov3(paths: Sequence[str | os.PathLike], registry: str | os.PathLike | Registry | None = None
                 ) -> list[str | None]:
    """The AutoV3 of each file an existing registry has seen unchanged (None for the others)."""
    return [hashes.get("autov3") for hashes in known_hashes(paths, registry)]
