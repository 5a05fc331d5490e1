"""`lmerge merge` beside the I/O floor and sd-mecha, on full-size generated SDXL checkpoints.

    python benchmarks/bench_merge.py [--dir /tmp/lineage-merge-bench] [--rounds 1] [--skip-mecha]
                                     [--methods weighted_sum,add_difference,ties]

Generates base / child1 / child2 (6.9 GB each, the real 2,515 SDXL keys and shapes, fp16) in --dir
if they are missing and records them in a registry there (so `lmerge merge` finds their AutoV3
instead of hashing them; the cost of that first hashing is printed). Then, alternately in the same
run, for each job:
- floor: read the inputs and write one output-sized file in 16 MiB blocks, then fsync (docs/benchmarks.md:
  the floor the targets refer to);
- floor, O_DIRECT: the same with the output written as lmerge writes it (aligned blocks, O_DIRECT,
  no page cache), for reference;
- lmerge: `lmerge merge ... --no-record` (the output is still hashed and its metadata written);
- sd-mecha 1.1.8 (`pip install -e '.[bench]'`) with the recipe of docs/benchmarks.md ("sd-mecha as a peer");
each a subprocess under /usr/bin/time -v. Prints a table of median wall time, ratio to the floor and
peak RSS. Outputs are deleted after each run; the page cache is left as it is (the same for all).
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

from lineage.sdxl.synthetic import write_base, write_child

# job -> (inputs, lmerge options, sd-mecha recipe over models m[0], m[1], ...)
JOBS: dict[str, tuple[tuple[str, ...], list[str], str]] = {
    "weighted_sum": (("base", "child1"), ["--alpha", "0.3"], "sd_mecha.weighted_sum(m[0], m[1], alpha=0.3)"),
    "add_difference": (("child1", "child2", "base"), ["--method", "add_difference", "--alpha", "0.5"],
                       "sd_mecha.add_difference(m[0], m[1], m[2], alpha=0.5)"),
    # sd-mecha 1.1.8's add_difference_ties raises; docs/benchmarks.md composes it from ties_sum.
    "ties": (("base", "child1", "child2"), ["--method", "ties", "--param", "density=0.2"],
             "m[0] + sd_mecha.ties_sum(m[1] - m[0], m[2] - m[0], k=0.2)"),
}

FLOOR = """
import os, sys
out, inputs = sys.argv[1], sys.argv[2:]
block = bytearray(16 << 20)
view = memoryview(block)
fds = [os.open(p, os.O_RDONLY) for p in inputs]
size = os.fstat(fds[0]).st_size
fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
for offset in range(0, size, len(block)):
    n = min(len(block), size - offset)
    for f in fds:
        os.preadv(f, [view[:n]], offset)
    os.pwrite(fd, view[:n], offset)
os.fsync(fd)
"""

# The same, but the output written the way lmerge writes it: 16 MiB page-aligned blocks with O_DIRECT
# (no page cache), then fsync. Not the floor the targets refer to (docs/benchmarks.md), shown beside it.
FLOOR_DIRECT = """
import mmap, os, sys
out, inputs = sys.argv[1], sys.argv[2:]
block = mmap.mmap(-1, 16 << 20)
view = memoryview(block)
fds = [os.open(p, os.O_RDONLY) for p in inputs]
size = os.fstat(fds[0]).st_size
fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
for offset in range(0, size, len(block)):
    n = min(len(block), size - offset)
    for f in fds:
        os.preadv(f, [view[:n]], offset)
    os.pwrite(fd, view[:-(-n // 4096) * 4096], offset)
os.ftruncate(fd, size)
os.fsync(fd)
"""

MECHA = """
import sys, torch, sd_mecha
out, paths = sys.argv[1], sys.argv[2:]
m = [sd_mecha.model(p) for p in paths]
sd_mecha.merge({recipe}, output=out, merge_dtype=torch.float32, output_dtype=torch.float16)
"""


def timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, int]:
    """Wall seconds and peak RSS (KiB) of a command run under /usr/bin/time -v."""
    start = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd[:4])} failed:\n{r.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1))
    return wall, rss


def prepare(directory: Path, env: dict[str, str]) -> dict[str, str]:
    files = {name: directory / f"{name}.safetensors" for name in ("base", "child1", "child2")}
    if not files["base"].exists():
        print(f"generating {files['base']} ...", flush=True)
        write_base(files["base"], size="full", seed=0)
    for seed, name in enumerate(("child1", "child2"), start=1):
        if not files[name].exists():
            print(f"generating {files[name]} ...", flush=True)
            write_child(files["base"], files[name], seed=seed)
    start = time.perf_counter()
    for path in files.values():  # once: the registry then knows each unchanged file's hashes
        subprocess.run([sys.executable, "-m", "lineage", "add", str(path)], check=True, env=env,
                       capture_output=True)
    print(f"recorded the inputs in the registry ({time.perf_counter() - start:.1f} s, 0 when known already)")
    return {k: str(v) for k, v in files.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/tmp/lineage-merge-bench")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--methods", default=",".join(JOBS), help=f"comma-separated, from {', '.join(JOBS)}")
    ap.add_argument("--skip-mecha", action="store_true", help="sd-mecha takes 1.5-4 minutes per job")
    args = ap.parse_args()
    jobs = [j.strip() for j in args.methods.split(",")]
    unknown = [j for j in jobs if j not in JOBS]
    if unknown:
        sys.exit(f"unknown jobs {unknown}; choose from {', '.join(JOBS)}")
    directory = Path(args.dir)
    directory.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "LINEAGE_HOME": str(directory / "lineage-home")}
    files = prepare(directory, env)
    out = str(directory / "out.safetensors")

    runs: dict[tuple[str, str], list[tuple[float, int]]] = {}
    for round_ in range(args.rounds):
        for job in jobs:
            names, options, recipe = JOBS[job]
            inputs = [files[n] for n in names]
            commands = {
                "I/O floor": [sys.executable, "-c", FLOOR, out, *inputs],
                "floor, O_DIRECT": [sys.executable, "-c", FLOOR_DIRECT, out, *inputs],
                "lmerge merge": [sys.executable, "-m", "lineage", "merge", *inputs, "-o", out, *options,
                                 "--no-record"],
            }
            if not args.skip_mecha:
                commands["sd-mecha 1.1.8"] = [sys.executable, "-c", MECHA.format(recipe=recipe), out, *inputs]
            for tool, cmd in commands.items():
                result = timed(cmd, env)
                os.unlink(out)
                runs.setdefault((job, tool), []).append(result)
                print(f"round {round_ + 1} {job:<15} {tool:<15} {result[0]:7.1f} s  {result[1] / 1024:7.0f} MB",
                      flush=True)

    print(f"\nfull-size SDXL fp16 inputs (6.9 GB each), {args.rounds} round(s), median wall time")
    print("| job | tool | wall s | ratio to floor | peak RSS MB |")
    print("|---|---|---|---|---|")
    for job in jobs:
        floor = statistics.median(w for w, _ in runs[(job, "I/O floor")])
        for (j, tool), samples in runs.items():
            if j != job:
                continue
            wall = statistics.median(w for w, _ in samples)
            rss = max(r for _, r in samples) / 1024
            print(f"| {job} | {tool} | {wall:.1f} | {wall / floor:.2f}x | {rss:.0f} |")


if __name__ == "__main__":
    main()
