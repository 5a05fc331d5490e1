"""Scanning files whose metadata other tools made huge: time and registry growth.

    python benchmarks/bench_metadata_bounds.py [--dir /tmp/lineage-bench]

Writes two tiny checkpoints (one tensor each) into --dir: one whose ModelSpec `merged_from` names
5,000 models (94 KB of metadata), one whose A1111 `sd_merge_models` holds a 10,000-entry ancestry
(a chain of weighted-sum merges, 3.8 MB). Each is scanned into a fresh registry; the wall time of
the scan and the registry's size (file + write-ahead log) are printed.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from lineage.graph.recording import scan_file
from lineage.graph.registry import Registry
from lineage.io.safetensors import save_file


def _recipe(first: int, second: int) -> dict[str, object]:
    return {"type": "webui", "primary_model_hash": f"{first:064x}", "secondary_model_hash": f"{second:064x}",
            "interp_method": "Weighted sum", "multiplier": 0.5}


CASES = {
    "merged_from": lambda: {"modelspec.merged_from": ", ".join(f"model number {i}" for i in range(5000))},
    "sd_merge_models": lambda: {
        "sd_merge_recipe": json.dumps(_recipe(0, 1)),
        "sd_merge_models": json.dumps({f"{i:064x}": {"name": f"m{i}", "sd_merge_recipe": _recipe(i + 1, i + 2)}
                                       for i in range(10_000)})},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/lineage-bench")
    root = Path(parser.parse_args().dir)
    root.mkdir(parents=True, exist_ok=True)
    for name, metadata in CASES.items():
        model, registry = root / f"{name}.safetensors", root / f"{name}.sqlite"
        for stale in (registry, Path(f"{registry}-wal"), Path(f"{registry}-shm")):
            stale.unlink(missing_ok=True)
        save_file({"model.diffusion_model.label_emb.0.0.weight": torch.ones(4, 4)}, model, metadata())
        start = time.perf_counter()
        with Registry(registry) as reg:
            scan_file(model, reg)
        elapsed = time.perf_counter() - start
        grown = sum(os.path.getsize(p) for p in (registry, Path(f"{registry}-wal")) if p.exists())
        print(f"{name}: file {model.stat().st_size / 1e3:.0f} KB, scan {elapsed:.1f} s, registry {grown / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
