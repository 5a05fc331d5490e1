"""Sample images per model of the family tree (docs/tree.md, "Previews").

`lmerge preview NODE…` draws a fixed prompt grid with each model and keeps the images beside the
registry, in a folder named by the file's AutoV3 (`<registry dir>/previews/<AutoV3>/0.png, 1.png, …`),
so a renamed or moved file keeps its previews; `lmerge tree --previews` shows the first image in the
model's box and all of them in the page's panel.

- The grid is data (`PromptGrid`): a few short prompts, fixed seeds, size, steps, sampler, CFG and the
  dtype the model runs in; the command's options replace any of them. The model is loaded once per node (`Sampler`,
  train/sampling.py) and every image is one call of it, so a preview is what `lmerge sample` draws
  with the same settings, `parameters` text chunk included.
- A node is drawn from the file the registry recorded for it (the most recently seen that still
  exists). An adapter node is drawn as its base model's file with the adapter applied in memory.
- `previews.json` in the folder records what each image was drawn with. An image is drawn again only
  when its settings (the dtype included: bf16 draws a slightly different image) or the files it was
  drawn from changed (their AutoV2: metadata can change the prediction type), or with `--force`.
- On a CPU a full-size step takes minutes (docs/tree.md has the figures); the caller's `on_step` sees
  each step, and `StepTimer` turns the steps into seconds per step and the time left.
"""
from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from itertools import product
from pathlib import Path
from typing import TYPE_CHECKING, Any

import networkx as nx

from lineage.errors import LineageError
from lineage.graph.model import ADAPTER_KINDS, display_name
from lineage.io import strict_json
from lineage.io.atomic import atomic_write

if TYPE_CHECKING:  # the CLI reads DEFAULT_GRID for its help: this module imports no registry or torch
    from lineage.graph.recording import FileFacts
    from lineage.graph.registry import Registry

log = logging.getLogger(__name__)

PREVIEWS_FOLDER = "previews"  # beside the registry file
MANIFEST = "previews.json"
IMAGE_NAME = re.compile(r"\d+\.png")  # the grid's n-th image; a manifest naming anything else is not followed
FOLDER_NAME = re.compile(r"[0-9a-f]{64}(\+[a-z0-9+-]+)?")  # a file's node id: AutoV3, `+v` etc. for marker files
THUMBNAIL_PIXELS = 160  # longest side of the copies embedded in trees and pages (the stored images stay as drawn)


@dataclass(frozen=True)
class PromptGrid:
    """What every model is drawn with: each prompt with each seed, at one size, step count and sampler."""

    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    negative: str = ""
    width: int = 1024
    height: int = 1024
    steps: int = 20
    cfg: float = 7.0
    sampler: str = "euler"
    scheduler: str = "normal"
    dtype: str = "fp32"  # what the UNet and text encoders run in (train/sampling.py DTYPES)

    def cells(self) -> list[dict[str, Any]]:
        """One entry per image, in order: its prompt and seed with the grid's settings."""
        shared = {k: v for k, v in asdict(self).items() if k not in ("prompts", "seeds")}
        return [{"prompt": prompt, "seed": seed, **shared} for prompt, seed in product(self.prompts, self.seeds)]


# Short prompts that show a model's take on the usual subjects: a person, a landscape, an animal, a scene.
DEFAULT_GRID = PromptGrid(
    prompts=("portrait of a woman with red hair, upper body, looking at viewer",
             "a lighthouse on a rocky coast at sunset",
             "a cat sleeping on a windowsill, soft light",
             "a city street at night in the rain, neon signs"),
    seeds=(1,),
)


def grid_with(width: int | None = None, height: int | None = None, steps: int | None = None,
              prompts: tuple[str, ...] = (), seeds: tuple[int, ...] = (), **settings: Any) -> PromptGrid:
    """The default grid with the given options replacing its values (None or empty: keep the default)."""
    chosen = {"width": width, "height": height, "steps": steps, "prompts": prompts or None, "seeds": seeds or None,
              **settings}
    return replace(DEFAULT_GRID, **{k: v for k, v in chosen.items() if v is not None})


# ---------------------------------------------------------------------------------------------
# Where previews live


def previews_root(registry: Registry) -> Path:
    return registry.path.parent / PREVIEWS_FOLDER


def _read_manifest(folder: Path) -> dict[str, Any]:
    """The folder's record of what its images were drawn with; empty when missing or unreadable (the
    images are then drawn again)."""
    try:
        manifest = strict_json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # strict_json.JSONError is a ValueError
        return {}
    return manifest if isinstance(manifest, dict) and isinstance(manifest.get("cells"), list) else {}


def stored_images(folder: Path) -> list[Path]:
    """The images of a previews folder, in grid order (only those on disk)."""
    names = [c.get("file") for c in _read_manifest(folder).get("cells", []) if isinstance(c, dict)]
    return [folder / name for name in names if isinstance(name, str) and IMAGE_NAME.fullmatch(name)
            and (folder / name).is_file()]


def preview_keys(graph: nx.DiGraph, node: str) -> list[str]:
    """The folder names a model's previews may be under: the AutoV3 id of its own file, and those of
    the files linked to it (`lmerge link`)."""
    linked = [str(f["linked"]) for f in graph.nodes[node].get("files", []) if f.get("linked")]
    return [key for key in (node, *linked) if FOLDER_NAME.fullmatch(key)]


def previews_of(graph: nx.DiGraph, registry: Registry) -> dict[str, list[Path]]:
    """node -> its preview images, for the nodes of `graph` that have any."""
    root = previews_root(registry)
    found = {}
    for node in graph:
        images = [image for key in preview_keys(graph, node) for image in stored_images(root / key)]
        if images:
            found[node] = images
    return found


@contextmanager
def thumbnails(images: dict[str, list[Path]], pixels: int = THUMBNAIL_PIXELS) -> Iterator[dict[str, list[str]]]:
    """Small copies of the images (longest side `pixels`) in a temporary folder, for Graphviz to lay
    out and the page to embed: node -> their paths. The folder is removed afterwards."""
    if not images:  # a tree without previews needs neither Pillow nor a folder
        yield {}
        return
    from PIL import Image

    folder = tempfile.mkdtemp(prefix="lineage-thumbnails-")
    try:
        small: dict[str, list[str]] = {}
        for n, (node, paths) in enumerate(images.items()):
            for i, path in enumerate(paths):
                try:
                    with Image.open(path) as image:
                        image.thumbnail((pixels, pixels))
                        target = os.path.join(folder, f"{n}-{i}.png")
                        image.convert("RGB").save(target, format="PNG", optimize=True)
                except OSError as e:  # a damaged image file: the node shows without it
                    log.warning("warning: %s: not a readable image (%s); left out of the tree", path, e)
                    continue
                small.setdefault(node, []).append(target)
        yield small
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Which file draws a node


@dataclass(frozen=True)
class PreviewSource:
    """What a node is drawn with: a checkpoint file, plus the adapter file when the node is an adapter."""

    node: str
    name: str
    key: str  # the previews folder: the AutoV3 id of the node's own file
    checkpoint: str
    checkpoint_autov2: str | None
    adapter: str | None = None
    adapter_autov3: str | None = None  # known from the registry: the infotext's `Lora hashes` need no hashing
    base: str | None = None  # the adapter's base node

    def drawn_with(self) -> dict[str, Any]:
        """The files' identities, recorded with the images: a different base redraws an adapter's previews."""
        return {"checkpoint": self.checkpoint_autov2, "adapter": self.key if self.adapter else None}


def _local_file(registry: Registry, graph: nx.DiGraph, node: str) -> tuple[str, FileFacts]:
    """The most recently seen file of `node` that still exists, with its hashes and AutoV3 id."""
    from lineage.graph.recording import describe

    # a catalog model's paths are its linked files', each file's newest first: order them all by time
    paths = registry.most_recent_first(str(p) for p in graph.nodes[node].get("paths", []))
    for path in paths:
        if os.path.isfile(path):
            return path, describe(path, registry)
    name = display_name(graph, node)
    if paths:
        raise LineageError(f"{name} has no file on this machine: it was recorded at {paths[0]}, which is gone "
                           "(record the file where it is now with `lmerge add FILE`)")
    raise LineageError(f"{name} has no file on this machine (record one with `lmerge add FILE` or "
                       f"`lmerge link FILE {node}`)")


def preview_source(registry: Registry, spec: str) -> PreviewSource:
    """The files that draw the model `spec` names (any name the CLI takes); one-line errors when the
    model, its file or an adapter's base file is not here."""
    node = registry.resolve(spec)
    graph = registry.graph()
    name = display_name(graph, node)
    if graph.nodes[node].get("kind") not in ADAPTER_KINDS:
        path, facts = _local_file(registry, graph, node)
        return PreviewSource(node, name, facts.node_id, path, facts.hashes.autov2)
    adapter, adapter_facts = _local_file(registry, graph, node)
    bases = sorted(p for p in graph.predecessors(node) if graph.nodes[p].get("kind") not in ADAPTER_KINDS)
    if not bases:
        raise LineageError(f"the adapter {name} has no recorded base model to draw it with "
                           f"(record one with `lmerge add ADAPTER --parent BASE --relation adapter`)")
    problems = []
    for base in bases:
        try:
            path, facts = _local_file(registry, graph, base)
        except LineageError as e:
            problems.append(str(e))
            continue
        return PreviewSource(node, name, adapter_facts.node_id, path, facts.hashes.autov2, adapter,
                             adapter_facts.hashes.autov3, base)
    raise LineageError(f"the adapter {name} is drawn with its base model, and {'; '.join(problems)}")


# ---------------------------------------------------------------------------------------------
# Drawing


class StepTimer:
    """Seconds per denoising step and the time a run of `images` images of `steps` steps has left.

    A step is timed between consecutive steps of an image: the first step's wall time also holds the
    prompt's encoding, and the time after the last step the VAE's decoding;
    both are measured per image and added to the estimate once an image has shown them."""

    def __init__(self, images: int, steps: int) -> None:
        self.images, self.steps = images, steps
        self.intervals: list[float] = []  # between steps
        self._until_first: list[float] = []  # image start -> its first step
        self._after_last: list[float] = []  # its last step -> the image
        self._started = self._last = 0.0
        self.started = self.finished = self.steps_done = 0

    def start_image(self) -> None:
        self._started = self._last = time.monotonic()
        self.started += 1

    def step(self) -> None:
        now = time.monotonic()
        if self._last == self._started:
            self._until_first.append(now - self._started)
        else:
            self.intervals.append(now - self._last)
        self._last = now
        self.steps_done += 1

    def image_done(self, seconds_per_step: float) -> None:
        """`seconds_per_step`: the sampler's own figure, which stands in when images have one step (no
        interval to measure)."""
        self._after_last.append(time.monotonic() - self._last)
        if self.steps == 1:
            self.intervals.append(seconds_per_step)
        self.finished += 1

    @property
    def seconds_per_step(self) -> float | None:
        return sum(self.intervals) / len(self.intervals) if self.intervals else None

    def seconds_left(self) -> float | None:
        rate = self.seconds_per_step
        if rate is None:
            return None
        loading = max(0.0, _mean(self._until_first) - rate)
        return ((self.images * self.steps - self.steps_done) * rate + (self.images - self.started) * loading
                + (self.images - self.finished) * _mean(self._after_last))

    def label(self) -> str:
        """"about 3 min 20 s left (12.1 s/step)"; "timing the first steps" before there is a measure."""
        left = self.seconds_left()
        if left is None:
            return "timing the first steps"
        return f"about {duration(left)} left ({self.seconds_per_step:.3g} s/step)"


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def duration(seconds: float) -> str:
    """"2 h 5 min", "3 min 20 s", "14 s"."""
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"


@dataclass
class Previews:
    """What `make_previews` did for one node: the folder, every image of the grid, and which were drawn now."""

    source: PreviewSource
    folder: Path
    files: list[Path]
    drawn: list[Path]


def _kept(folder: Path, source: PreviewSource) -> dict[str, dict[str, Any]]:
    """file name -> what it was drawn with, for the images in the folder drawn from the same files."""
    manifest = _read_manifest(folder)
    if manifest.get("drawn_with") != source.drawn_with():
        return {}
    return {c["file"]: c for c in manifest["cells"]
            if isinstance(c, dict) and IMAGE_NAME.fullmatch(str(c.get("file"))) and (folder / c["file"]).is_file()}


def planned(registry: Registry, source: PreviewSource, grid: PromptGrid, force: bool = False) -> list[int]:
    """The grid cells that need drawing: those whose image is missing or was drawn with other settings."""
    kept = _kept(previews_root(registry) / source.key, source)
    return [i for i, cell in enumerate(grid.cells()) if force or kept.get(f"{i}.png") != {**cell, "file": f"{i}.png"}]


def make_previews(registry: Registry, source: PreviewSource, grid: PromptGrid, *, force: bool = False,
                  on_image: Callable[[int, int], None] | None = None, on_step: Callable[[], None] | None = None,
                  timer: StepTimer | None = None, device: str = "cpu") -> Previews:
    """Draw the grid cells of `source` that need it (all with `force`) into its previews folder on `device`,
    each image written atomically and recorded in the folder's manifest as soon as it is there.
    `on_image(i, count)` is called before each image is drawn, `on_step()` after each step."""
    from lineage.train.sampling import Sampler, png_info

    folder = previews_root(registry) / source.key
    cells = grid.cells()
    todo = planned(registry, source, grid, force)
    # Until an image is replaced, the record keeps describing the one on disk: a run that fails or is
    # stopped leaves every listed image true to its entry.
    record = _kept(folder, source)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LineageError(f"cannot create the previews folder ({e.strerror})", folder) from None
    inputs = [source.checkpoint, source.adapter]
    drawn = []
    # Loaded once for the grid (a full-size file takes a minute or two to load on a CPU).
    sample = Sampler(source.checkpoint, adapters=[(source.adapter, 1.0)] if source.adapter else (),
                     dtype=grid.dtype, device=device, model_hash=source.checkpoint_autov2,
                     adapter_hashes={source.adapter: source.adapter_autov3} if source.adapter else None,
                     ) if todo else None
    for n, i in enumerate(todo):
        cell = cells[i]
        if on_image:
            on_image(n, len(todo))
        if timer:
            timer.start_image()
        image = sample(cell["prompt"], negative=cell["negative"], steps=cell["steps"], cfg=cell["cfg"],
                       seed=cell["seed"], width=cell["width"], height=cell["height"], sampler=cell["sampler"],
                       scheduler=cell["scheduler"], progress=False,
                       on_step=lambda *_: on_step() if on_step else None)[0]
        if timer:
            timer.image_done(image.info["seconds_per_step"])
        data = io.BytesIO()
        image.save(data, format="PNG", pnginfo=png_info(image))
        path = folder / f"{i}.png"
        atomic_write(path, data.getvalue(), inputs=inputs)
        drawn.append(path)
        record[path.name] = {**cell, "file": path.name}
        _write_manifest(folder, source, record, inputs)
    # The images of an earlier, larger grid go: the folder holds the grid last asked for.
    extra = [p for p in folder.iterdir() if IMAGE_NAME.fullmatch(p.name) and int(p.stem) >= len(cells)]
    for path in extra:
        path.unlink(missing_ok=True)
        record.pop(path.name, None)
    if extra:
        _write_manifest(folder, source, record, inputs)
    return Previews(source, folder, [folder / f"{i}.png" for i in range(len(cells))], drawn)


def _write_manifest(folder: Path, source: PreviewSource, cells: dict[str, dict[str, Any]], inputs: list) -> None:
    """The folder's record, its images in grid order (0.png, 1.png, …)."""
    ordered = [cells[name] for name in sorted(cells, key=lambda name: int(Path(name).stem))]
    manifest = {"node": source.node, "name": source.name, "drawn_with": source.drawn_with(), "cells": ordered}
    atomic_write(folder / MANIFEST, json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", inputs=inputs)
