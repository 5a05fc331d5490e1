"""The demo `make demo` runs: a folder of downloads, named and tagged as they come from Civitai, is
recognised by a scan alone (as `lmerge scan` does it) as models of the built-in catalog of the SDXL
anime family; then our own merges, a LoRA extracted, applied and converted, all recorded and drawn in
the family tree.

    python examples/demo.py [OUTPUT_DIR]     (default: ./demo-output)

Every checkpoint is generated (real SDXL key names at reduced widths, the "tiny" size); only the
names and metadata look like real downloads. Writes into OUTPUT_DIR: `downloads/` (the files as
downloaded), `mine/` (what we make of them), `registry.sqlite` (a registry of its own, never the
user's, started anew on each run so that a re-run shows that run's nodes only),
`family.{svg,png,mmd}`, `catalog.{svg,png}` and `tree.html`, the whole family as a page to explore
in a browser (the images and the page need Graphviz's `dot`).
"""
import sys
from pathlib import Path

import lineage
from lineage.adapters.apply import apply
from lineage.adapters.convert import convert
from lineage.adapters.extract import extract
from lineage.graph.catalog import catalog_graph
from lineage.graph.editing import set_attributes
from lineage.graph.model import display_name
from lineage.graph.recording import scan
from lineage.graph.registry import Registry
from lineage.graph.render import render
from lineage.io.hashing import hash_file
from lineage.io.safetensors import SafetensorsFile, save_file

SIZE = "tiny"  # the demo is about lineage, not speed: small files keep it well within a minute


def heading(text: str) -> None:
    print(f"\n== {text} " + "=" * max(0, 74 - len(text)))


def rewrite(path: Path, metadata: dict[str, str]) -> None:
    """The file's tensors with only `metadata`: what another tool would have left in it."""
    with SafetensorsFile(path) as f:
        tensors = {k: f.read(k) for k in f.keys()}
    path.unlink()
    save_file(tensors, path, metadata=metadata)


def new_registry(path: Path) -> Registry:
    """An empty registry at `path`: an earlier run's file goes, with SQLite's write-ahead log and index
    beside it (a log left by a killed run would otherwise be replayed into the new file)."""
    for leftover in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        leftover.unlink(missing_ok=True)
    return Registry(path)


def make_downloads(downloads: Path) -> dict[str, Path]:
    """A download folder: file names as Civitai serves them, metadata as other tools write it."""
    downloads.mkdir(parents=True, exist_ok=True)
    illustrious = Path(lineage.write_base(downloads / "illustriousXL_v01.safetensors", size=SIZE, seed=0))
    noob_eps = Path(lineage.write_child(illustrious, downloads / "noobaiXLNAIXL_epsilonPred11Version.safetensors",
                                        seed=1))
    noob_v = Path(lineage.write_child(noob_eps, downloads / "noobaiXLNAIXL_vPred10Version.safetensors", seed=2,
                                      prediction_type="v"))

    # Someone's merge from A1111's checkpoint merger: only A1111's keys (sd_merge_recipe, sd_merge_models).
    a1111_mix = downloads / "illustriousNoobMix_v10.safetensors"
    lineage.merge([illustrious, noob_eps], a1111_mix, alpha=0.4, record=False, progress=False)
    with SafetensorsFile(a1111_mix) as f:
        rewrite(a1111_mix, {k: v for k, v in f.metadata.items() if k.startswith("sd_merge_")})

    # A LoRA trained with kohya's sd-scripts: its ss_* keys name the base it was trained on.
    style_lora = downloads / "animeLineart_v2.safetensors"
    extract(illustrious, noob_eps, style_lora, rank=8, record=False, progress=False)
    base_hashes = hash_file(illustrious)
    rewrite(style_lora, {"ss_sd_model_name": illustrious.name, "ss_base_model_version": "sdxl_base_v1-0",
                         "ss_sd_model_hash": base_hashes.autov1, "ss_new_sd_model_hash": base_hashes.sha256,
                         "ss_network_module": "networks.lora", "ss_network_dim": "8", "ss_network_alpha": "8",
                         "ss_output_name": "animeLineart_v2"})
    return {"illustrious": illustrious, "noob_eps": noob_eps, "noob_v": noob_v, "a1111_mix": a1111_mix,
            "style_lora": style_lora}


def main(out: Path) -> None:
    downloads, mine = out / "downloads", out / "mine"
    files = make_downloads(downloads)
    illustrious, noob_eps, a1111_mix, style_lora = (files[k] for k in ("illustrious", "noob_eps", "a1111_mix",
                                                                       "style_lora"))
    mine.mkdir(exist_ok=True)
    registry = new_registry(out / "registry.sqlite")

    # -- 1. The downloads, recognised: by file name (checkpoints), by what their metadata names (merge, LoRA)
    heading("the downloads, recognised")
    catalog = catalog_graph()
    scanned = scan(downloads, registry)
    print(f"scan: {len(scanned.recorded)} files, {scanned.edges} relations read from metadata")
    linked = set()
    for found in scanned.recognised:  # the file IS that model: its hashes and path join the node
        if found.linked:
            linked.add(found.node)
            print(Path(found.path).name)
            print(f"    -> {display_name(catalog, found.node)} ({found.told}, confidence {found.confidence:.2f})")
    graph = registry.graph()
    for path in (a1111_mix, style_lora):
        node = registry.resolve(str(path))
        print(f"{path.name} ({graph.nodes[node].get('kind')}), made from:")
        for parent in sorted(graph.predecessors(node)):
            print(f"    {display_name(graph, parent)} ({graph.edges[parent, node]['source']} metadata)")

    # -- 2. Our own work: a fine-tune and three merges, each recorded with its parents -------------------
    heading("our merges")
    finetune = Path(lineage.write_child(noob_eps, mine / "myStyle_v1.safetensors", seed=3))
    lineage.record(finetune, parents=[noob_eps], registry=registry)
    merges = {
        # 0.7·NoobAI eps + 0.3·ours (alpha is the weight of the second model, as in A1111)
        "weighted": lineage.merge([noob_eps, finetune], mine / "mix-weighted.safetensors", alpha=0.3,
                                  registry=registry, progress=False),
        # supermerger's 20 values: BASE, IN00-IN08, M00, OUT00-OUT08: input blocks from ours, outputs from NoobAI
        "block": lineage.merge([noob_eps, finetune], mine / "mix-blocks.safetensors", preset="supermerger",
                               blocks="0.5, 1,1,1,1,1,1,1,1,1, 0.5, 0,0,0,0,0,0,0,0,0", registry=registry,
                               progress=False),
        # TIES over the shared base, keeping the largest 20% of each fine-tune's changes
        "ties": lineage.merge([illustrious, noob_eps, finetune], mine / "mix-ties.safetensors", method="ties",
                              params={"density": 0.2}, registry=registry, progress=False),
    }
    for name, result in merges.items():
        print(f"{name:>8}: {Path(result.path).name:<22} AutoV3 {result.autov3[:12]}")

    # -- 3. Adapters: extract a LoRA and a LoKr, apply one, convert it to PEFT and back ---------------
    heading("adapters")
    lora = extract(illustrious, finetune, mine / "myStyle-lora.safetensors", rank=8, registry=registry,
                   progress=False)
    print(f"extracted {Path(lora.path).name}: rank 8, {len(lora.modules)} modules, "
          f"relative error {lora.total_error:.4f}")
    # A LoKr of the same pair: each module's nearest Kronecker product, beside a LoRA of as many parameters
    lokr = extract(illustrious, finetune, mine / "myStyle-lokr.safetensors", type="lokr", registry=registry,
                   progress=False)
    print(f"extracted {Path(lokr.path).name}: {lokr.params:,} parameters, relative error "
          f"{lokr.total_error:.4f}\n  (a LoRA of as many parameters: {lokr.lora_error:.4f})")
    applied = apply(illustrious, [(lora.path, 1.0)], mine / "illustrious+myStyle.safetensors", registry=registry,
                    progress=False)
    print(f"applied at strength 1.0: {Path(applied.path).name}")
    peft = convert(lora.path, mine / "myStyle-lora-peft.safetensors", to="peft", registry=registry, progress=False)
    back = convert(peft.path, mine / "myStyle-lora-kohya.safetensors", to="kohya", registry=registry, progress=False)
    for converted, dialect in ((peft, "PEFT"), (back, "kohya again")):  # the files keep the LoRA's title: say which
        set_attributes(converted.node, {"name": f"myStyle-lora ({dialect})"}, registry)
    with SafetensorsFile(lora.path) as a, SafetensorsFile(back.path) as b:
        keys = sorted(a.keys())
        exact = keys == sorted(b.keys()) and all(a.read(k).equal(b.read(k)) for k in keys)
    print(f"converted to PEFT: {Path(peft.path).name}")
    print(f"and back to kohya: {Path(back.path).name}, {len(keys)} tensors, "
          f"{'bit-exact' if exact else 'NOT bit-exact'}")

    # -- 4. The family tree ----------------------------------------------------------------------------
    heading("the family tree")
    whole = registry.graph()
    ours = {n for n in whole if n not in catalog}
    # our files and the catalog models they are or descend from directly, without the rest of the catalog
    family = whole.subgraph(ours | linked | {p for n in ours for p in whole.predecessors(n)})
    (out / "family.mmd").write_text(render(family, "mermaid"))
    page = (out / "tree.html").resolve()
    try:
        for name, drawn in (("family", family), ("catalog", catalog)):
            for fmt in ("svg", "png"):
                data = render(drawn, fmt)
                (out / f"{name}.{fmt}").write_bytes(data.encode() if isinstance(data, str) else data)
        page.write_text(render(whole, "html", focus="illustrious-xl-v0.1"), encoding="utf-8")
    except lineage.LineageError as e:
        print(f"note: no images ({e})", file=sys.stderr)
    print(render(family, "text"), end="")
    print(f"\nregistry: {registry.path}")
    print(f"pictures: {out}/family.png, {out}/catalog.png")
    if page.exists():
        print(f"the family tree to explore in a browser: {page}")
    registry.close()


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "demo-output"))
