"""TIES-merge two fine-tunes over their base, record it in a registry, then `reproduce` it from the
record in the file (inputs found by AutoV3).

    python examples/merge_ties_and_reproduce.py [OUTPUT_DIR]
"""
import sys
from pathlib import Path

import lineage
from lineage.merge.reproduce import reproduce

out = Path(sys.argv[1] if len(sys.argv) > 1 else "merge-output")
out.mkdir(parents=True, exist_ok=True)
registry = out / "registry.sqlite"
base = lineage.write_base(out / "base.safetensors", size="tiny", seed=0)  # real SDXL key names, widths / 64-80
x = lineage.write_child(base, out / "x.safetensors", seed=1)
y = lineage.write_child(base, out / "y.safetensors", seed=2)

# The base first; density is the share of each task vector that is kept.
result = lineage.merge([base, x, y], out / "ties.safetensors", method="ties", params={"density": 0.2},
                       registry=registry)
print(f"ties: {result.plan.counts()}  AutoV3 {result.autov3[:12]}")

check = reproduce(result.path, registry=registry, progress=False)
print(f"reproduced from its record: {check.matches} (inputs {[Path(p).name for p in check.inputs]})")
