"""The demo `make demo` runs: a small generated family of SDXL checkpoints, merged three ways,
recorded with their parents and drawn next to the built-in catalog of the real SDXL anime family.

    python examples/demo.py [OUTPUT_DIR]     (default: ./demo-output)

Writes into OUTPUT_DIR: the checkpoints (real SDXL key names at reduced widths, 59 MB each),
`registry.sqlite` (a registry of its own, never the user's), `family.{svg,png,mmd}`,
`catalog.{svg,png}` and `tree.html`, the whole family as a page to explore in a browser (search,
click a model for its facts; the images and the page need Graphviz's `dot`).
"""
import sys
from pathlib import Path

import lineage
from lineage.graph.catalog import catalog_graph
from lineage.graph.editing import link
from lineage.graph.model import neighbourhood
from lineage.graph.registry import Registry
from lineage.graph.render import render
from lineage.sdxl.inspection import format_report

out = Path(sys.argv[1] if len(sys.argv) > 1 else "demo-output")
out.mkdir(parents=True, exist_ok=True)
registry = Registry(out / "registry.sqlite")

# A generated base stands in for SDXL 1.0: linking it hangs the family under the catalog's node.
base = lineage.write_base(out / "base.safetensors", seed=0)
base_id = link(base, "sdxl-1.0-base", registry)

# Fine-tunes: each gets a planted low-rank delta over its parent; one is v-prediction.
anime = lineage.write_child(base, out / "anime-eps.safetensors", seed=1)
lineage.record(anime, parents=[base], registry=registry)
vpred = lineage.write_child(anime, out / "anime-vpred.safetensors", seed=2, prediction_type="v+ztsnr")
lineage.record(vpred, parents=[anime], registry=registry)
photo = lineage.write_child(base, out / "photo.safetensors", seed=3)
lineage.record(photo, parents=[base], registry=registry)

# Three merges; each records itself (an edge from each input, with its weight).
merges = {
    # 0.7·anime + 0.3·photo (alpha is the weight of the second model, as in A1111)
    "weighted": lineage.merge([anime, photo], out / "mix-weighted.safetensors", alpha=0.3,
                              registry=registry, progress=False),
    # supermerger's 20 values: BASE, IN00-IN08, M00, OUT00-OUT08: input blocks from photo, output blocks from anime
    "block": lineage.merge([anime, photo], out / "mix-blocks.safetensors", preset="supermerger",
                           blocks="0.5, 1,1,1,1,1,1,1,1,1, 0.5, 0,0,0,0,0,0,0,0,0", registry=registry, progress=False),
    # TIES over the shared base, keeping the largest 20% of each fine-tune's changes
    "ties": lineage.merge([base, anime, photo], out / "mix-ties.safetensors", method="ties",
                          params={"density": 0.2}, registry=registry, progress=False),
}
for name, result in merges.items():
    print(f"{name:>8} merge: {Path(result.path).name}  AutoV3 {result.autov3[:12]}  {result.plan.counts()}")

print()
print(format_report(lineage.inspect(vpred)))

# SDXL 1.0 (which our base file is) and our own models below it, without the rest of the catalog's family.
whole = registry.graph()
family = whole.subgraph({base_id} | {n for n in neighbourhood(whole, base_id) if n not in catalog_graph()})
(out / "family.mmd").write_text(render(family, "mermaid"))
page = (out / "tree.html").resolve()
try:
    for name, graph in (("family", family), ("catalog", catalog_graph())):
        for fmt in ("svg", "png"):
            data = render(graph, fmt)
            (out / f"{name}.{fmt}").write_bytes(data.encode() if isinstance(data, str) else data)
    page.write_text(render(registry.graph(), "html", focus=base_id), encoding="utf-8")
except lineage.LineageError as e:
    print(f"note: no images ({e})", file=sys.stderr)

print()
print(render(family, "text"), end="")
print(f"\nregistry: {registry.path}; pictures in {out}/ (family.png, catalog.png)")
if page.exists():
    print(f"the family tree to explore in a browser: {page}")
registry.close()
