"""The registry at scale: 100,000 nodes (a random forest of fine-tunes and merges under the catalog).

    python benchmarks/bench_registry.py [--dir /tmp/lineage-bench] [--nodes 100000] [--rounds 5]

Builds `registry-<nodes>.sqlite` in --dir through the registry's own write path (one transaction,
every cycle check) unless it is there already, then measures, each beside a baseline in the same run
(median of --rounds, warm page cache):

| step                          | ours                                | baseline                             | target  |
|-------------------------------|-------------------------------------|--------------------------------------|---------|
| open                          | `Registry(path).graph()` + catalog  | plain sqlite3 fetching the same rows | < 3 s   |
| ancestors of the deepest node | `graph.ancestors` on the open graph | a recursive SQL query (same file)    | < 50 ms |
| a 200-node subtree as DOT     | `render.to_dot` (styles, tooltips)  | the bare edge list as DOT            | < 1 s   |

(the targets are issue 3's)

and, for scale, how long Graphviz's `dot` takes to lay that subtree out as SVG.
"""
from __future__ import annotations

import argparse
import hashlib
import random
import shutil
import sqlite3
import statistics
import subprocess
import time
from collections.abc import Callable
from itertools import islice
from pathlib import Path

import networkx as nx

from lineage.graph.catalog import catalog_graph
from lineage.graph.model import ancestors
from lineage.graph.registry import Registry
from lineage.graph.render import to_dot

TARGETS_S = {"open": 3.0, "ancestors": 0.050, "dot": 1.0}
SUBTREE_NODES = 200


def build(path: Path, nodes: int, seed: int = 0) -> None:
    """A random forest: most models fine-tune a recent one (long version chains), some branch off an
    older one, one in ten merges two or three; the first hundred hang under SDXL catalog models."""
    rng = random.Random(seed)
    anchors = sorted(n for n, a in catalog_graph().nodes(data=True) if a["architecture"] == "sdxl")
    ids = [hashlib.sha256(f"{seed}:{i}".encode()).hexdigest() for i in range(nodes)]
    start = time.perf_counter()
    with Registry(path) as reg, reg.batch() as b:
        for i, node_id in enumerate(ids):
            sha256 = hashlib.sha256(node_id.encode()).hexdigest()
            b.put_node(node_id, {
                "name": f"model {i}", "kind": "checkpoint", "architecture": "sdxl", "format": "sdxl-single-file",
                "prediction_type": rng.choice(["epsilon", "epsilon", "v+ztsnr"]), "source": "scan",
                "size": 6_938_078_334, "hashes": {"autov3": node_id, "sha256": sha256, "autov2": sha256[:10]},
            })
            b.put_path(node_id, f"/models/sdxl/model-{i}.safetensors")
            if i < 100:
                b.put_edge(rng.choice(anchors), node_id, "finetune", source="scan")
                continue
            roll = rng.random()
            if roll < 0.1:
                parents = rng.sample(ids[max(0, i - 1000):i], rng.choice([2, 3]))
                for parent in parents:
                    b.put_edge(parent, node_id, "merge", weight=round(1 / len(parents), 3),
                               params={"method": "weighted_sum"}, source="lineage")
            else:
                parent = ids[rng.randrange(max(0, i - 100), i)] if roll < 0.8 else ids[rng.randrange(i)]
                b.put_edge(parent, node_id, "finetune", source="scan")
    print(f"built {path} ({nodes:,} nodes) in {time.perf_counter() - start:.1f} s")


def median_time(fn: Callable[[], object], rounds: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(rounds):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def open_graph(path: Path) -> nx.DiGraph:
    catalog_graph.cache_clear()  # as a fresh process would: the catalog is read again too
    with Registry(path) as reg:
        return reg.graph()


def raw_rows(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        return sum(len(conn.execute(f"SELECT * FROM {table}").fetchall()) for table in ("nodes", "edges", "paths"))


def sql_ancestors(path: Path, node: str) -> set[str]:
    query = ("WITH RECURSIVE up(id) AS (SELECT ? UNION SELECT edges.parent FROM edges JOIN up ON edges.child = up.id) "
             "SELECT id FROM up")
    with sqlite3.connect(path) as conn:
        return {row[0] for row in conn.execute(query, (node,))} - {node}


def bare_dot(graph: nx.DiGraph) -> str:
    return "digraph {\n" + "".join(f'  "{u}" -> "{v}";\n' for u, v in graph.edges) + "}\n"


def report(step: str, ours: float, baseline: float, baseline_name: str) -> None:
    verdict = "meets" if ours < TARGETS_S[step] else "MISSES"
    print(f"{step:<10} {ours * 1000:10.1f} ms   {baseline_name:<28} {baseline * 1000:10.1f} ms   "
          f"ratio {ours / baseline:6.2f}   target < {TARGETS_S[step] * 1000:.0f} ms: {verdict}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/tmp/lineage-bench")
    ap.add_argument("--nodes", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    path = Path(args.dir) / f"registry-{args.nodes}.sqlite"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        build(path, args.nodes)

    open_s, graph = median_time(lambda: open_graph(path), args.rounds)
    rows_s, _ = median_time(lambda: raw_rows(path), args.rounds)
    depth = {}
    for node in nx.topological_sort(graph):
        depth[node] = 1 + max((depth[p] for p in graph.predecessors(node)), default=-1)
    deepest = max(depth, key=depth.get)
    ancestors_s, found = median_time(lambda: ancestors(graph, deepest), args.rounds * 4)
    sql_s, sql_found = median_time(lambda: sql_ancestors(path, deepest), args.rounds * 4)
    # The SQL side sees the user's edges only; the graph also climbs the catalog above them.
    assert sql_found <= found and all(n in catalog_graph() for n in found - sql_found), "SQL and graph disagree"
    root = next(n for n in graph if graph.in_degree(n) == 0 and graph.out_degree(n) > 5)
    subtree = graph.subgraph(islice(nx.bfs_tree(graph, root), SUBTREE_NODES))
    dot_s, dot = median_time(lambda: to_dot(subtree), args.rounds * 4)
    bare_s, _ = median_time(lambda: bare_dot(subtree), args.rounds * 4)

    print(f"registry: {graph.number_of_nodes():,} nodes, {graph.number_of_edges():,} edges "
          f"(with the catalog); deepest node {depth[deepest]} generations down with {len(found):,} ancestors; "
          f"subtree {subtree.number_of_nodes()} nodes / {subtree.number_of_edges()} edges; median of {args.rounds}")
    report("open", open_s, rows_s, "sqlite3 fetching the rows")
    report("ancestors", ancestors_s, sql_s, "recursive SQL query")
    report("dot", dot_s, bare_s, "bare edge-list DOT")
    if shutil.which("dot"):
        layout_s, _ = median_time(lambda: subprocess.run(["dot", "-Tsvg"], input=dot, capture_output=True,
                                                         text=True, check=True), 1)
        print(f"(for scale: Graphviz lays the {subtree.number_of_nodes()}-node DOT out as SVG in {layout_s:.2f} s)")


if __name__ == "__main__":
    main()
