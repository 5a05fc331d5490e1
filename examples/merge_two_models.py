"""Merge two checkpoints with a weighted sum, streaming, and look at what the output records; then the
same merge with a LoRA added to its result in the same pass.

    python examples/merge_two_models.py [OUTPUT_DIR]
"""
import json
import sys
from pathlib import Path

import lineage
from lineage.adapters.extract import extract

out = Path(sys.argv[1] if len(sys.argv) > 1 else "merge-output")
out.mkdir(parents=True, exist_ok=True)
base = lineage.write_base(out / "base.safetensors", size="tiny", seed=0)  # generated: SDXL key names, widths / 64-80
tuned = lineage.write_child(base, out / "tuned.safetensors", seed=1)

# (1 - 0.3)·base + 0.3·tuned: alpha is the weight of the second model, as in A1111.
result = lineage.merge([base, tuned], out / "merged.safetensors", alpha=0.3, registry=out / "registry.sqlite")
print(result.plan.describe())
print(f"AutoV3 {result.autov3}  (registry node {result.node})")

with lineage.SafetensorsFile(result.path) as f:
    record = json.loads(f.metadata["lineage.record"])
    print("record:", record["method"], record["params"], [(i["name"], i["autov3"][:12]) for i in record["inputs"]])
    print("ModelSpec merged_from:", f.metadata["modelspec.merged_from"])

# A recipe may also add adapters to the merged result, in the same streaming pass (what `lmerge apply`
# would do to the merged file afterwards): here a rank-8 LoRA of what `tuned` learned, at strength 0.5.
lora = extract(base, tuned, out / "tuned_lora.safetensors", rank=8, registry=out / "registry.sqlite").path
styled = lineage.merge([base, tuned], out / "merged_with_lora.safetensors", alpha=0.3, adapters=[(lora, 0.5)],
                       registry=out / "registry.sqlite")
print(f"with the LoRA at 0.5: {styled.plan.patched_keys} keys patched, AutoV3 {styled.autov3[:12]}")
with lineage.SafetensorsFile(styled.path) as f:
    recorded = json.loads(f.metadata["lineage.record"])["adapters"]
    print("recorded adapters:", [(a["name"], a["strength"]) for a in recorded])
