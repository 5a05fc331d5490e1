"""`lmerge apply` of a rank-64 LoRA beside the I/O floor, on a full-size generated SDXL checkpoint.

    python benchmarks/bench_apply.py [--dir /tmp/lineage-apply-bench] [--rounds 1] [--rank 64] [--keep]

Generates in --dir, if missing, a base checkpoint (6.9 GB, the real 2,515 SDXL keys and shapes, fp16) and a
kohya LoRA of the given rank over kohya's default module set (722 UNet + 72 CLIP-L + 192 OpenCLIP-G
modules) with random factors, and records both in a registry there (so `lmerge apply` finds their AutoV3
instead of hashing them). Then, alternately in the same run:
- the I/O floor of bench_merge.py (read every input, write one checkpoint-sized file, fsync) over the
  checkpoint and the LoRA;
- `lmerge apply BASE LORA:0.8 -o OUT --no-record`.
Each runs as a subprocess under /usr/bin/time -v; prints median wall time, ratio to the floor and peak
RSS. Outputs are deleted after each run; the inputs too at the end unless --keep.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_merge import FLOOR, timed

from lineage.sdxl.synthetic import write_base


def write_random_lora(base: Path, path: Path, rank: int) -> int:
    """A kohya LoRA over the default module set of `base`, factors random and small (fp16), alpha = rank."""
    import torch

    from lineage.adapters.modules import sdxl_modules
    from lineage.adapters.writer import adapter_key
    from lineage.io.safetensors import read_header, save_file

    g = torch.Generator().manual_seed(0)
    tensors = {}
    modules = sdxl_modules(read_header(base)[0])
    for m in modules:
        out, inp = m.shape[0], m.shape[1]
        tensors[adapter_key("kohya", m, "lora_down")] = (torch.randn(rank, inp, generator=g) / inp ** 0.5).half()
        tensors[adapter_key("kohya", m, "lora_up")] = (torch.randn(out, rank, generator=g) * 1e-3).half()
        tensors[adapter_key("kohya", m, "alpha")] = torch.tensor(float(rank), dtype=torch.float16)
    save_file(tensors, path)
    return len(modules)


def prepare(directory: Path, rank: int, env: dict[str, str]) -> dict[str, str]:
    base, lora = directory / "base.safetensors", directory / f"lora-r{rank}.safetensors"
    if not base.exists():
        print(f"generating {base} ...", flush=True)
        write_base(base, size="full", seed=0)
    if not lora.exists():
        print(f"generating {lora} ...", flush=True)
        modules = write_random_lora(base, lora, rank)
        print(f"  {modules} modules, {lora.stat().st_size / 1e6:.0f} MB", flush=True)
    start = time.perf_counter()
    for path in (base, lora):  # once: the registry then knows each unchanged file's AutoV3
        subprocess.run([sys.executable, "-m", "lineage", "add", str(path)], check=True, env=env, capture_output=True)
    print(f"recorded the inputs in the registry ({time.perf_counter() - start:.1f} s, 0 when known already)")
    return {"base": str(base), "lora": str(lora)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/tmp/lineage-apply-bench")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--keep", action="store_true", help="keep the generated inputs for another run")
    args = ap.parse_args()
    directory = Path(args.dir)
    directory.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "LINEAGE_HOME": str(directory / "lineage-home")}
    files = prepare(directory, args.rank, env)
    out = str(directory / "out.safetensors")
    commands = {
        "I/O floor": [sys.executable, "-c", FLOOR, out, files["base"], files["lora"]],
        "lmerge apply": [sys.executable, "-m", "lineage", "apply", files["base"], f"{files['lora']}:0.8", "-o", out,
                         "--no-record"],
    }
    runs: dict[str, list[tuple[float, int]]] = {}
    for round_ in range(args.rounds):
        for tool, cmd in commands.items():
            result = timed(cmd, env)
            os.unlink(out)
            runs.setdefault(tool, []).append(result)
            print(f"round {round_ + 1} {tool:<13} {result[0]:7.1f} s  {result[1] / 1024:7.0f} MB", flush=True)
    if not args.keep:
        shutil.rmtree(directory)

    floor = statistics.median(w for w, _ in runs["I/O floor"])
    print(f"\nfull-size SDXL fp16 checkpoint (6.9 GB) + rank-{args.rank} LoRA, {args.rounds} round(s), "
          "median wall time")
    print("| job | tool | wall s | ratio to floor | peak RSS MB |")
    print("|---|---|---|---|---|")
    for tool, samples in runs.items():
        wall = statistics.median(w for w, _ in samples)
        rss = max(r for _, r in samples) / 1024
        print(f"| apply rank-{args.rank} LoRA | {tool} | {wall:.1f} | {wall / floor:.2f}x | {rss:.0f} |")


if __name__ == "__main__":
    main()
