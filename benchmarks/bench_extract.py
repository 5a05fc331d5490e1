"""`lmerge extract` of a rank-64 LoRA beside kohya's algorithm and sd-mecha, on generated SDXL checkpoints.

    python benchmarks/bench_extract.py [--size full|small|tiny] [--dir /tmp/lineage-extract-bench] [--rank 64]
                                       [--planted-rank 16] [--types lora[,lokr]] [--lokr-factor F] [--per-shape 1]
                                       [--skip-mecha] [--keep]

Generates in --dir, if missing, a base checkpoint and a fine-tune of it (lineage/sdxl/synthetic.py: every
weight of the UNet and both text encoders gets a planted low-rank delta of rank --planted-rank plus
noise), and records both in a registry there (so extraction finds their AutoV3 instead of hashing them).
Then, each as a subprocess under /usr/bin/time -v (wall time, peak RSS), over kohya's default module set
(722 UNet + 72 CLIP-L + 192 OpenCLIP-G modules at full size):
- our extraction (`lineage.adapters.extract`) of a rank-R LoRA, randomized and `exact=True`; the exact
  path's truncated SVDs are the optimal rank-R error every other error is compared with;
- each further type of --types (e.g. lokr) at the LoRA's parameter count (`params=`); a LoKr with the
  most-square split holds every module's whole Kronecker product in a few million parameters, far below
  a rank-64 LoRA's, so `--lokr-factor` (e.g. 4: w1 4x4, w2 the rest) gives it room to spend the budget;
- kohya's algorithm (sd-scripts' networks/extract_lora_from_models.py, reimplemented here from its
  behaviour): per module the fp32 difference, `torch.linalg.svd` with full_matrices=True, up = U·S and
  down = Vh cut to rank R, both clamped at the 0.99 quantile of their joined values. A full run takes
  about 20 minutes here, so it is timed on a sample: --per-shape modules of each distinct module shape
  (12 at full size), spread over the module list; a module's SVD costs what any module of its shape
  costs, so the estimate for all modules is each shape's mean time times its module count. Its error
  (clamp included) is compared with the optimum on the same modules;
- sd-mecha 1.1.8's `extract_kohya_lora` (sd_mecha/extensions/builtin/lycoris.py) on the same files,
  unless --skip-mecha; the number of tensors it wrote is shown.
Prints a table: wall time, speed-up over kohya's algorithm (estimated for all modules), peak RSS,
parameters, total relative error ‖Δ − ΔLoRA‖/‖Δ‖ over all modules, and its ratio to the optimum.
Outputs are deleted after each run; the inputs too at the end unless --keep.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

from lineage.sdxl.synthetic import SIZES, write_base, write_child

# Our extraction in a child process: its arguments as JSON, its result (every module's error) as JSON.
OURS = """
import json, sys
from lineage.adapters.extract import extract
args = json.loads(sys.argv[1])
done = extract(**args, record=False, progress=False)
print(json.dumps({"params": done.params, "total_error": done.total_error,
                  "modules": {m.name: [m.relative_error, m.norm2] for m in done.modules}}))
"""

# kohya's per-module algorithm on the sampled modules: (name, key, rows) each; prints per-module figures.
KOHYA = """
import json, sys, time, torch
from lineage.io.safetensors import SafetensorsFile
base_path, tuned_path, rank, modules = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
found = {}
with SafetensorsFile(base_path) as base, SafetensorsFile(tuned_path) as tuned:
    for name, key, rows in modules:
        b, t = base.read(key), tuned.read(key)
        if rows:
            b, t = b[rows[0]:rows[1]], t[rows[0]:rows[1]]
        start = time.perf_counter()
        mat = (t - b).float().flatten(1)
        r = min(rank, *mat.shape)
        u, s, vh = torch.linalg.svd(mat)  # full_matrices=True, kohya's call
        up, down = u[:, :r] @ torch.diag(s[:r]), vh[:r, :]
        high = torch.quantile(torch.cat([up.flatten(), down.flatten()]), 0.99)
        up, down = up.clamp(-high, high), down.clamp(-high, high)
        seconds = time.perf_counter() - start
        norm2 = float(mat.double().square().sum())
        found[name] = {"seconds": seconds, "norm2": norm2, "optimal2": float(s[r:].double().square().sum()),
                       "kohya2": float((mat - up @ down).double().square().sum())}
print(json.dumps(found))
"""

# sd-mecha's own extraction of the whole difference; prints how many tensors it wrote.
MECHA = """
import json, sys, torch, sd_mecha
from sd_mecha.extensions.merge_methods import resolve
from lineage.io.safetensors import read_header
base, tuned, out, rank = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
delta = sd_mecha.convert(sd_mecha.model(tuned) - sd_mecha.model(base), "sdxl-kohya")
sd_mecha.merge(resolve("extract_kohya_lora")(delta, rank=rank), output=out, merge_dtype=torch.float32,
               output_dtype=torch.float16)
print(json.dumps({"tensors": len(read_header(out)[0])}))
"""


class BenchError(Exception):
    """A run that failed: the message says which and why, in one line."""


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, int, str]:
    """Wall seconds, peak RSS (KiB) and stdout of a command run under /usr/bin/time -v."""
    start = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if r.returncode != 0:
        lines = [line for line in r.stderr.splitlines() if line.strip() and not line.startswith("\t")]
        raise BenchError(lines[-1] if lines else f"exit status {r.returncode}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1))
    return wall, rss, r.stdout


def prepare(directory: Path, size: str, planted_rank: int, env: dict[str, str]) -> tuple[str, str]:
    base = directory / f"{size}-base.safetensors"
    tuned = directory / f"{size}-tuned-r{planted_rank}.safetensors"
    if not base.exists():
        print(f"generating {base} ...", flush=True)
        write_base(base, size=size, seed=0)
    if not tuned.exists():
        print(f"generating {tuned} (rank-{planted_rank} deltas plus noise in every module) ...", flush=True)
        write_child(base, tuned, seed=1, rank=planted_rank)
    start = time.perf_counter()
    for path in (base, tuned):  # once: the registry then knows each unchanged file's AutoV3
        subprocess.run([sys.executable, "-m", "lineage", "add", str(path)], check=True, env=env, capture_output=True)
    print(f"recorded the inputs in the registry ({time.perf_counter() - start:.1f} s, 0 when known already)")
    return str(base), str(tuned)


def check_types(types: list[str]) -> None:
    """Every type is one `lineage.adapters.extract` knows, and "lora" (the reference) comes first."""
    from lineage.adapters.extract import TYPES

    unknown = [t for t in types if t not in TYPES]
    if unknown:
        raise BenchError(f"unknown adapter type(s) {', '.join(unknown)}: this lineage extracts {', '.join(TYPES)}")
    if not types or types[0] != "lora":
        raise BenchError("--types must start with lora (the other types are measured at its parameter count)")


def kohya_sample(modules: list, per_shape: int) -> tuple[list, dict]:
    """`per_shape` modules of each distinct shape, spread over that shape's modules; and shape -> count."""
    by_shape: dict[tuple, list] = defaultdict(list)
    for m in modules:
        by_shape[m.shape].append(m)
    sample = []
    for group in by_shape.values():
        n = min(per_shape, len(group))
        sample += [group[(2 * i + 1) * len(group) // (2 * n)] for i in range(n)]
    return sample, {shape: len(group) for shape, group in by_shape.items()}


def relative(residual2: float, norm2: float) -> float:
    return (residual2 / norm2) ** 0.5 if norm2 > 0 else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=SIZES, default="full")
    ap.add_argument("--dir", default="/tmp/lineage-extract-bench")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--planted-rank", type=int, default=16, help="rank of the planted delta of each weight")
    ap.add_argument("--types", default="lora", help="comma-separated adapter types, lora first (e.g. lora,lokr)")
    ap.add_argument("--lokr-factor", type=int, default=-1,
                    help="lokr: split each dimension at this factor (-1: the most square split)")
    ap.add_argument("--per-shape", type=int, default=1, help="kohya's algorithm: modules timed per distinct shape")
    ap.add_argument("--skip-exact", action="store_true",
                    help="no exact-SVD run (6-10 min at full size on 2 cores): the optimum is then kohya's "
                         "SVDs of the sampled modules, and errors are compared on those")
    ap.add_argument("--skip-mecha", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the generated inputs for another run")
    args = ap.parse_args()
    try:
        run(args)
    except BenchError as e:
        sys.exit(f"bench_extract: {e}")


def run(args: argparse.Namespace) -> None:
    from lineage.adapters.modules import sdxl_modules
    from lineage.io.safetensors import read_header

    types = [t.strip() for t in args.types.split(",") if t.strip()]
    check_types(types)
    directory = Path(args.dir)
    directory.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "LINEAGE_HOME": str(directory / "lineage-home")}
    base, tuned = prepare(directory, args.size, args.planted_rank, env)
    out = str(directory / "out.safetensors")
    modules = sdxl_modules(read_header(base)[0])

    rows: list[tuple[str, float, int, dict]] = []  # tool, wall, RSS KiB, result

    def measure(tool: str, cmd: list[str]) -> dict:
        try:
            wall, rss, stdout = timed(cmd, env)
        except BenchError as e:
            raise BenchError(f"{tool} failed: {e}") from None
        if os.path.exists(out):
            os.unlink(out)
        result = json.loads(stdout.strip().splitlines()[-1])
        rows.append((tool, wall, rss, result))
        print(f"{tool:<34} {wall:7.1f} s  {rss / 1024:7.0f} MB", flush=True)
        return result

    def ours(**options: object) -> list[str]:
        return [sys.executable, "-c", OURS, json.dumps({"base": base, "tuned": tuned, "output": out, **options})]

    lora = measure("lineage, randomized SVD", ours(type="lora", rank=args.rank))
    optimal = (None if args.skip_exact else
               measure("lineage, exact SVD (the optimum)", ours(type="lora", rank=args.rank, exact=True)))
    for kind in types[1:]:
        options = {"factor": args.lokr_factor} if kind == "lokr" and args.lokr_factor != -1 else {}
        measure(f"lineage {kind}, same parameter count", ours(type=kind, params=lora["params"], **options))
    sample, counts = kohya_sample(modules, args.per_shape)
    kohya = measure("kohya's algorithm, sampled", [sys.executable, "-c", KOHYA, base, tuned, str(args.rank),
                                                   json.dumps([(m.name, m.key, m.rows) for m in sample])])
    if not args.skip_mecha:
        measure("sd-mecha 1.1.8 extract_kohya_lora", [sys.executable, "-c", MECHA, base, tuned, out, str(args.rank)])
    if not args.keep:
        shutil.rmtree(directory)

    # kohya's time for every module: each sampled shape's mean time times its module count.
    per_shape: dict[tuple, list[float]] = defaultdict(list)
    for m in sample:
        per_shape[m.shape].append(kohya[m.name]["seconds"])
    kohya_total = sum(counts[shape] * sum(times) / len(times) for shape, times in per_shape.items())
    sample_norm2 = sum(kohya[m.name]["norm2"] for m in sample)
    kohya_error = relative(sum(kohya[m.name]["kohya2"] for m in sample), sample_norm2)
    sample_optimum = relative(sum(kohya[m.name]["optimal2"] for m in sample), sample_norm2)

    def on_sample(result: dict) -> float:
        """A run's total relative error over the sampled modules only."""
        residual = sum(result["modules"][m.name][1] * result["modules"][m.name][0] ** 2 for m in sample)
        return relative(residual, sum(result["modules"][m.name][1] for m in sample))

    def versus_optimum(result: dict) -> float:
        """A run's error over the optimum's: on all modules with the exact run, else on the sampled ones."""
        if optimal is None:
            return on_sample(result) / sample_optimum if sample_optimum else 1.0
        return result["total_error"] / optimal["total_error"] if optimal["total_error"] else 1.0

    print(f"\n{args.size} generated SDXL (fp16), tuned = base + rank-{args.planted_rank} delta + noise in every "
          f"module; rank-{args.rank} adapters over {len(modules)} modules")
    print(f"kohya's algorithm timed on {len(sample)} modules ({args.per_shape} per distinct shape, "
          f"{sum(kohya[m.name]['seconds'] for m in sample):.1f} s of SVD and clamp, reading excluded) and scaled to "
          f"all {len(modules)} by each shape's module count: {kohya_total:.1f} s (estimated)")
    print("| tool | wall s | vs kohya's algorithm | peak RSS MB | parameters | total rel. error | vs optimum |")
    print("|---|---|---|---|---|---|---|")
    for tool, wall, rss, result in rows:
        if "total_error" in result:
            print(f"| {tool} | {wall:.1f} | {kohya_total / wall:.1f}x faster | {rss / 1024:.0f} | "
                  f"{result['params']:,} | {result['total_error']:.5f} | "
                  f"{versus_optimum(result):.4f}x |")
        elif tool.startswith("kohya"):
            print(f"| kohya's algorithm, all modules (estimated) | {kohya_total:.1f} | 1x | — | — | — | — |")
            print(f"| {tool} ({len(sample)} modules) | {wall:.1f} | — | {rss / 1024:.0f} | — | "
                  f"{kohya_error:.5f} | {kohya_error / sample_optimum if sample_optimum else 1.0:.4f}x |")
        else:
            print(f"| {tool} | {wall:.1f} | {kohya_total / wall:.1f}x faster | {rss / 1024:.0f} | "
                  f"{result['tensors']} tensors written | — | — |")
    exact_part = "" if optimal is None else f"lineage exact {on_sample(optimal):.5f}, "
    print(f"on the sampled modules: optimum {sample_optimum:.5f}, lineage randomized {on_sample(lora):.5f}, "
          f"{exact_part}kohya (clamp at the 0.99 quantile) {kohya_error:.5f}; 'vs optimum' compares "
          + ("all modules with the exact run" if optimal else "the sampled modules with kohya's SVDs (--skip-exact)"))
    speedup = kohya_total / rows[0][1]
    ratio = versus_optimum(lora)
    rss_mb = rows[0][2] / 1024
    print(f"targets (randomized LoRA): >= 20x faster than kohya's algorithm: {speedup:.1f}x "
          f"{'met' if speedup >= 20 else 'MISSED'}; <= 1.01x the optimal error: {ratio:.4f}x "
          f"{'met' if ratio <= 1.01 else 'MISSED'}; peak RSS <= 2 GB: {rss_mb:.0f} MB "
          f"{'met' if rss_mb <= 2000 else 'MISSED'}")


if __name__ == "__main__":
    main()
