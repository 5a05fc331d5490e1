"""A small generated family of checkpoints, recorded with their parents and drawn next to the
built-in catalog of the real SDXL anime family.

    python examples/family_tree.py OUTPUT_DIR     (default: ./family-tree-output)

Writes into OUTPUT_DIR: the checkpoints (~60 MB each), `registry.sqlite` (a registry of its own,
never the user's), `family.{svg,png,mmd}` and `catalog.{svg,png}` (the images need Graphviz's `dot`).
"""
import sys
from pathlib import Path

import lineage
from lineage.catalog import catalog_graph
from lineage.graph import neighbourhood
from lineage.recording import link
from lineage.registry import Registry
from lineage.render import render

out = Path(sys.argv[1] if len(sys.argv) > 1 else "family-tree-output")
out.mkdir(parents=True, exist_ok=True)
registry = Registry(out / "registry.sqlite")

# A generated base stands in for SDXL 1.0: linking it hangs the family under the catalog's node.
base = lineage.write_base(out / "base.safetensors", seed=0)
base_id = link(base, "sdxl-1.0-base", registry)

anime = lineage.write_child(base, out / "anime-eps.safetensors", seed=1)
lineage.record(anime, parents=[base], registry=registry)
vpred = lineage.write_child(anime, out / "anime-vpred.safetensors", seed=2, prediction_type="v+ztsnr")
lineage.record(vpred, parents=[anime], registry=registry)
photo = lineage.write_child(base, out / "photo.safetensors", seed=3)
lineage.record(photo, parents=[base], registry=registry)

# 0.7·anime + 0.3·photo; the merge records itself (an edge from each input, with its weight).
lineage.merge([anime, photo], out / "anime-photo-mix.safetensors", alpha=0.3, registry=registry, progress=False)

family = neighbourhood(registry.graph(), base_id)  # SDXL 1.0 above, our files below
(out / "family.mmd").write_text(render(family, "mermaid"))
try:
    for name, graph in (("family", family), ("catalog", catalog_graph())):
        for fmt in ("svg", "png"):
            data = render(graph, fmt)
            (out / f"{name}.{fmt}").write_bytes(data.encode() if isinstance(data, str) else data)
except lineage.LineageError as e:
    print(f"note: no images ({e})", file=sys.stderr)

print(render(family, "text"), end="")
print(f"\nregistry: {registry.path}; pictures in {out}/")
registry.close()
