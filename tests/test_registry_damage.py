"""A registry nothing can brick: damaged rows are skipped, reported and repaired; disk problems named as such."""
import json
import sqlite3

import pytest

from lineage import LineageError
from lineage.graph.recording import record
from lineage.graph.registry import Registry
from lineage.graph.repair import check


def _damage(path, *statements):
    with sqlite3.connect(path) as conn:
        for statement in statements:
            conn.execute(statement)


@pytest.fixture
def damaged(tmp_path, tiny):
    """A registry with two good files (one the parent of the other) and three damaged rows."""
    path = tmp_path / "registry.sqlite"
    with Registry(path) as reg:
        base = record(tiny("base.safetensors", 1), registry=reg)
        child = record(tiny("child.safetensors", 2), parents=[base], registry=reg)
        broken = record(tiny("broken.safetensors", 3), registry=reg)
    _damage(path, f"UPDATE nodes SET attrs = '{{\"name\": \"bro' WHERE id = '{broken}'",
            "INSERT INTO paths (path, node_id, seen_at) VALUES ('/nowhere/x.safetensors', 'no-such-node', 0)",
            "INSERT INTO edges (parent, child, relation, attrs) VALUES ('ghost', "
            f"'{child}', 'merge', '{{\"relation\": \"merge\"}}')")
    return {"path": path, "base": base, "child": child, "broken": broken}


def test_a_damaged_row_is_skipped_and_named_while_the_rest_works(damaged, caplog):
    with Registry(damaged["path"]) as reg:
        graph = reg.user_graph()
        assert damaged["base"] in graph and damaged["child"] in graph and graph.has_edge(damaged["base"],
                                                                                      damaged["child"])
        assert damaged["broken"] not in graph and "ghost" not in graph
        assert {d.table for d in reg.damage} == {"nodes", "paths", "edges"}
        with pytest.raises(LineageError, match="is damaged.*registry check --repair"):
            reg.node(damaged["broken"])
        assert reg.node(damaged["base"])["name"] == "base"
    assert damaged["broken"][:12] in caplog.text and "/nowhere/x.safetensors" in caplog.text and "ghost" in caplog.text


def test_export_keeps_every_good_row_and_check_repair_fixes(damaged, lmerge, tmp_path):
    out = tmp_path / "export.json"
    code, stdout, _ = lmerge("registry", "export", out, "--registry", damaged["path"])
    assert code == 0, stdout
    exported = json.loads(out.read_text())
    ids = {n["id"] for n in exported["nodes"]}
    assert {damaged["base"], damaged["child"]} <= ids and damaged["broken"] not in ids
    assert len(exported["edges"]) == 1

    code, stdout, _ = lmerge("registry", "check", "--registry", damaged["path"])
    # The broken node, its path and its hash rows, the path to no node, the edge from no node.
    assert code == 1 and "--repair" in stdout
    found = [line for line in stdout.splitlines() if line.startswith("damaged:")]
    assert [line.split()[1] for line in found].count("hashes") >= 2 and len(found) == 4 + sum(
        line.split()[1] == "hashes" for line in found)
    code, stdout, _ = lmerge("registry", "check", "--repair", "--json", "--registry", damaged["path"])
    assert code == 0 and json.loads(stdout)["removed"] == len(found)
    code, stdout, _ = lmerge("registry", "check", "--registry", damaged["path"])
    assert code == 0 and "no damaged rows" in stdout
    with Registry(damaged["path"]) as reg:
        assert reg.user_graph().has_edge(damaged["base"], damaged["child"]) and reg.damage == []


def test_a_file_damaged_below_sqlite_is_not_repaired(tmp_path, monkeypatch):
    with Registry(tmp_path / "r.sqlite") as reg:
        monkeypatch.setattr(Registry, "file_check", lambda self: ["row 3 missing from index nodes_by_name"])
        with pytest.raises(LineageError, match="file itself is damaged.*restore it"):
            check(reg)


def test_a_missing_registry_folder_is_an_error_not_a_new_registry(tmp_path, lmerge):
    with pytest.raises(LineageError, match="does not exist"):
        Registry(tmp_path / "typo" / "registry.sqlite")
    code, _, err = lmerge("registry", "info", "--registry", tmp_path / "typo" / "r.sqlite")
    assert code == 1 and "does not exist" in err and not (tmp_path / "typo").exists()


def test_a_read_only_registry_is_reported_as_read_only(tmp_path, tiny, monkeypatch):
    """The registry opened read-only by SQLite itself (the tests run as root, where chmod cannot)."""
    path = tmp_path / "registry.sqlite"
    Registry(path).close()
    connect = sqlite3.connect
    monkeypatch.setattr(sqlite3, "connect",
                        lambda p, **kw: connect(f"file:{p}?mode=ro", uri=True, **kw))
    with Registry(path) as reg:
        with pytest.raises(LineageError, match="read-only disk") as error:
            record(tiny("a.safetensors", 1), registry=reg)
    assert "move it away" not in str(error.value)


class _FullDisk:
    """A connection whose writes fail the way SQLite reports ENOSPC (SQLITE_FULL)."""

    def __init__(self, conn):
        self._conn = conn

    def execute(self, statement, *args):
        if statement.lstrip().upper().startswith(("INSERT", "UPDATE")):
            raise sqlite3.OperationalError("database or disk is full")
        return self._conn.execute(statement, *args)

    def __getattr__(self, name):
        return getattr(self._conn, name)


def test_a_full_disk_is_reported_as_full(tmp_path, tiny):
    """ENOSPC simulated at SQLite's interface (SQLITE_FULL's message), as no tiny tmpfs is available here."""
    with Registry(tmp_path / "registry.sqlite") as reg:
        reg._conn = _FullDisk(reg._conn)
        with pytest.raises(LineageError, match="disk holding the registry is full") as error:
            record(tiny("a.safetensors", 1), registry=reg)
    assert "move it away" not in str(error.value)
