"""All identity hashes in one pass vs `openssl dgst -sha256`, on a full-size generated SDXL checkpoint.

    python benchmarks/bench_hash.py [--dir /tmp/lineage-bench] [--rounds 3]

Generates `sdxl-full.safetensors` (6.9 GB, the real 2,515 keys and shapes) in --dir if it is not there,
then runs, alternately in the same run, `openssl dgst -sha256 FILE` and `lmerge hash FILE --json`
(SHA256 + AutoV1 + AutoV2 + AutoV3 + CRC32), each under /usr/bin/time -v, and reports median wall time,
the ratio to OpenSSL and peak RSS. The file stays in the page cache after the first read, so both
sides are measured warm; the first (cold) round is reported separately and not counted.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from lineage.sdxl.synthetic import write_base


def timed(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (KiB) of a command run under /usr/bin/time -v."""
    start = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if r.returncode != 0:
        sys.exit(f"{cmd[0]} failed: {r.stderr[-2000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1))
    return wall, rss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/tmp/lineage-bench")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    path = Path(args.dir) / "sdxl-full.safetensors"
    if not path.exists():
        print(f"generating {path} ...", flush=True)
        write_base(path, size="full", seed=0)
    size_gb = path.stat().st_size / 1e9
    lmerge = [sys.executable, "-m", "lineage", "hash", str(path), "--json"]
    openssl = ["openssl", "dgst", "-sha256", str(path)]

    timed(openssl)  # cold read: fills the page cache for both sides
    runs: dict[str, list[tuple[float, int]]] = {"openssl dgst -sha256": [], "lmerge hash (5 hashes)": []}
    for _ in range(args.rounds):
        runs["openssl dgst -sha256"].append(timed(openssl))
        runs["lmerge hash (5 hashes)"].append(timed(lmerge))

    base = statistics.median(w for w, _ in runs["openssl dgst -sha256"])
    print(f"\n{path.name}: {size_gb:.2f} GB, {args.rounds} alternating rounds, median wall time")
    print("| command | wall s | GB/s | ratio to openssl | peak RSS MB |")
    print("|---|---|---|---|---|")
    for name, samples in runs.items():
        wall = statistics.median(w for w, _ in samples)
        rss = max(r for _, r in samples) / 1024
        print(f"| {name} | {wall:.2f} | {size_gb / wall:.2f} | {wall / base:.2f}x | {rss:.0f} |")


if __name__ == "__main__":
    main()
