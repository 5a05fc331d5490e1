"""Per-block merges: supermerger's 20-value string, ComfyUI's ratios, per-key overrides, and a TOML
recipe that reproduces the same bytes.

    python examples/merge_block_weights.py [OUTPUT_DIR]
"""
import sys
from pathlib import Path

import lineage
from lineage.merge.api import build_recipe
from lineage.merge.recipe import load_recipe
from lineage.merge.weights import KeyWeights

out = Path(sys.argv[1] if len(sys.argv) > 1 else "merge-output")
out.mkdir(parents=True, exist_ok=True)
a = lineage.write_base(out / "a.safetensors", size="tiny", seed=0)  # real SDXL key names, widths / 64-80
b = lineage.write_child(a, out / "b.safetensors", seed=1)

# supermerger XL string: BASE, IN00..IN08, M00, OUT00..OUT08 — take B's input blocks, keep A's output blocks.
blocks = "0.5, 1,1,1,1,1,1,1,1,1, 0.5, 0,0,0,0,0,0,0,0,0"
m1 = lineage.merge([a, b], out / "in-from-b.safetensors", blocks=blocks, preset="supermerger", record=False)
print("supermerger string:", m1.autov3[:12])

# The same split with ComfyUI's sliders, whose ratio is the weight of model 1 (A): 1 keeps A.
comfy = ",".join(["0"] * 11 + ["0.5"] * 3 + ["1"] * 10)  # time, label, input 0-8 | middle 0-2 | output 0-8, out
m2 = lineage.merge([a, b], out / "comfy.safetensors", blocks=comfy, preset="comfyui", record=False)
print("comfyui ratios:    ", m2.autov3[:12], "(text encoders and VAE are not merged in ComfyUI's preset)")

# Our finer set plus regex overrides: the VAE from A, cross-attention keys at 0.8.
recipe = build_recipe([a, b], alpha=0.5, per_key={"alpha": KeyWeights(
    preset="lineage", blocks={"VAE": 0.0}, overrides=((r"attn2\.to_[kv]", 0.8),))})
m3 = lineage.merge(recipe, out / "fine.safetensors", record=False)
m3.recipe.save(out / "fine.toml")
again = lineage.merge(load_recipe(out / "fine.toml"), out / "fine-again.safetensors", record=False)
print("recipe file:", (out / "fine.toml").read_text().splitlines()[:3], "... reproduces:", again.autov3 == m3.autov3)
