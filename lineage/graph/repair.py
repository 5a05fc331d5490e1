"""`lmerge registry check [--repair]`: find the damaged rows of a registry, and remove them.

A registry whose file is sound can still hold rows no command can use: attributes that are not a JSON
object (a write by another tool, a bit flip), a path, hash or edge that names a node that is not
there. Reading skips such rows with a warning (lineage/graph/registry.py); `check` lists them all,
after SQLite's own page check, and `repair` deletes exactly those rows in one transaction, so what
remains is what every command already saw. A file SQLite itself finds damaged is not repaired here:
restore it from an export.
"""
from __future__ import annotations

import logging

from lineage.errors import LineageError
from lineage.graph.registry import Damage, Registry


def check(registry: Registry) -> list[Damage]:
    """Every damaged row of `registry` (empty when it is sound). A file SQLite finds damaged is an error."""
    verdict = registry.file_check()
    if verdict != ["ok"]:
        raise LineageError(f"the file itself is damaged (SQLite: {'; '.join(verdict[:3])}); it was left as it is "
                           "(restore it from an export: lmerge registry import)", registry.path)
    registry_log = logging.getLogger("lineage.graph.registry")
    level = registry_log.level
    registry_log.setLevel(logging.ERROR)  # the rows are listed by the caller, not warned about one by one
    try:
        registry.user_graph()  # reading the whole user layer lists its damaged node, edge and path rows
    finally:
        registry_log.setLevel(level)
    return [*registry.damage, *registry.stray_hashes()]


def repair(registry: Registry, damage: list[Damage]) -> int:
    """Delete the `damage` rows (as `check` found them) in one transaction; returns how many went."""
    with registry.batch() as b:
        return sum(b.remove_damaged(row) for row in damage)
