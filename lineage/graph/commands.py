"""`lmerge` commands for the lineage graph: add, scan, tree, preview, compat, hub, registry (link, show,
edit, merge-nodes, remove: edit_commands.py).

Each is a thin layer over `record`, `render`, `compat`, `hub` and `registry`; `register(main)` adds
them to the `lmerge` group (lineage/cli). Every command takes `--registry PATH` (default: $LINEAGE_HOME
or the user data directory).
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import click

from lineage.cli.output import echo_json
from lineage.errors import LineageError
from lineage.graph.catalog import is_catalog_node
from lineage.graph.model import RELATIONS, display_name, neighbourhood
from lineage.graph.previews import DEFAULT_GRID
from lineage.graph.render import FORMATS
from lineage.train.commands import DEVICE_HELP, DTYPE_CHOICES, DTYPE_HELP, SAMPLER_CHOICES

COMPAT_ERROR_EXIT = 2  # `lmerge compat`: 0 fits (maybe with a warning), 1 incompatible, 2 the question was wrong
_REGISTRY_HELP = "Registry file (default: $LINEAGE_HOME/registry.sqlite, else the user data directory)."


def registry_option(command: Callable[..., Any]) -> Callable[..., Any]:
    """`--registry PATH` (as `registry_path`), which every graph command takes."""
    return click.option("--registry", "registry_path", type=click.Path(), default=None, help=_REGISTRY_HELP)(command)


def json_option(command: Callable[..., Any]) -> Callable[..., Any]:
    """`--json` (as `as_json`): the answer as one JSON object."""
    return click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")(command)


def node_label(graph: Any, node: str) -> str:
    """A node as messages name it: its display name with its id, or the id alone when it has no name."""
    name = display_name(graph, node)
    return node if name == node else f"{name} [{node}]"


@click.command()
@click.argument("path", type=click.Path())
@click.option("--parent", "parents", multiple=True,
              help="A parent: a file, node id, hash or name. Repeat for a merge. "
                   "Without --parent, the parents the file's metadata names are used.")
@click.option("--relation", type=click.Choice(list(RELATIONS)),
              help="How PATH was made from the parents (default: merge for several, else finetune).")
@click.option("--weight", "weights", type=float, multiple=True, help="Weight of each --parent, in order (merges).")
@click.option("--name", help="Display name (default: ModelSpec title or the file name).")
@click.option("--replace", is_flag=True, help="The --parent models replace the parents recorded before "
                                              "(default: they are added to them).")
@json_option
@registry_option
def add(path: str, parents: tuple[str, ...], relation: str | None, weights: tuple[float, ...], name: str | None,
        replace: bool, as_json: bool, registry_path: str | None) -> None:
    """Record a checkpoint or adapter file in the registry. Each parent line says whether it was
    added, kept, changed or replaced; a relation that contradicts the recorded one is a warning. What
    an earlier record holds and this one leaves out (a merge's method or weights) is kept. Without
    --parent, a new file whose hash or download name surely names a catalog model is that model, as
    with `lmerge scan`."""
    from lineage.graph.editing import drop_other_parents
    from lineage.graph.recording import record
    from lineage.graph.recording import scan as scan_directory
    from lineage.graph.registry import Registry
    from lineage.io.inputs import check_input

    if replace and not parents:
        raise LineageError("--replace goes with --parent")
    recognised: list = []
    with Registry(registry_path) as reg:
        before = reg.graph()
        known = reg.known_file(path) if parents and os.path.isfile(path) else None
        if known and is_catalog_node(model := reg.resolve(known[0])):
            raise LineageError(f"is linked to the catalog model {node_label(before, model)}, whose parents the catalog "
                               "settles; `lmerge edit FILE --unlink` first if it is another model", path)
        if parents:
            node_id = record(path, parents=parents, relation=relation or ("merge" if len(parents) > 1 else "finetune"),
                             weights=weights or None, attrs={"name": name} if name else None, registry=reg)
            node_id = reg.resolve(node_id)
            dropped = drop_other_parents(node_id, [reg.resolve(p) for p in parents], reg) if replace else []
        elif weights or relation or name:
            raise LineageError("--relation, --weight and --name go with --parent (metadata brings its own)")
        else:  # as `lmerge scan FILE`: a download named like a catalog model is that model
            check_input(path)  # a folder is refused, not scanned
            found = scan_directory(path, reg)
            if found.failed:
                raise LineageError(found.failed[0][1], path)
            node_id, dropped, recognised = reg.resolve(found.recorded[0][1]), [], found.recognised
        graph = reg.graph()
    old = {p: before.edges[p, node_id] for p in before.predecessors(node_id)} if node_id in before else {}
    if as_json:
        echo_json({"path": path, "node": node_id, "name": graph.nodes[node_id].get("name"),
                   "parents": [{"node": p, **graph.edges[p, node_id]} for p in sorted(graph.predecessors(node_id))],
                   **_recognised_json(recognised)})
        return
    click.echo(f"recorded {path} as {node_label(graph, node_id)}")
    _echo_recognised(recognised)
    for parent in sorted(graph.predecessors(node_id)):
        edge = graph.edges[parent, node_id]
        weight = f" {edge['weight']:.3g}" if edge.get("weight") is not None else ""
        status = "added" if parent not in old else "kept" if old[parent] == edge else "changed"
        click.echo(f"  parent {status}: {node_label(graph, parent)} ({edge['relation']}{weight})")
        if status == "changed" and old[parent]["relation"] != edge["relation"]:
            click.echo(f"warning: {node_label(graph, parent)} was recorded as a {old[parent]['relation']} parent; "
                       f"it is now {edge['relation']}", err=True)
    for parent in dropped:
        click.echo(f"  parent replaced: {node_label(before, parent)} (removed)")
    earlier = [p for p in graph.predecessors(node_id) if p in old and parents and not replace]
    new = [p for p in graph.predecessors(node_id) if p not in old]
    if earlier and new:
        click.echo(f"warning: {node_label(graph, node_id)} keeps its earlier parent(s) "
                   f"{', '.join(node_label(graph, p) for p in sorted(earlier))} next to the new one(s); "
                   "use --replace to replace them", err=True)


@click.command()
@click.argument("directory", type=click.Path())
@json_option
@registry_option
def scan(directory: str, as_json: bool, registry_path: str | None) -> None:
    """Record every .safetensors file under DIRECTORY, linking the parents their metadata names
    (our record, A1111, ModelSpec, sd-mecha, kohya). A new file whose hash or download name
    (`noobaiXLNAIXL_vPred10Version.safetensors`) surely names a catalog model is linked to it, as
    `lmerge link` does; a name that only resembles one is suggested. Running it again changes nothing."""

    from tqdm import tqdm

    from lineage.graph.recording import scan as scan_directory

    # A bar of files read (on a terminal), with each file's name above it.
    with tqdm(unit="file", desc="scanning", leave=False, disable=None) as bar:
        def reading(path: str) -> None:
            bar.write(f"reading {path}", file=sys.stderr)
            bar.update(1)

        result = scan_directory(directory, registry_path, on_file=reading)
    if as_json:
        echo_json({"recorded": [{"path": p, "node": n} for p, n in result.recorded], "relations": result.edges,
                   **_recognised_json(result.recognised),
                   "failed": [{"path": p, "problem": why} for p, why in result.failed]})
    else:
        click.echo(f"recorded {len(result.recorded)} file(s); {result.edges} relation(s) from metadata")
        _echo_recognised(result.recognised)
    for path, problem in result.failed:
        click.echo(f"error: {problem}" if path in problem else f"error: {path}: {problem}", err=True)
    if result.failed:
        sys.exit(1)


def _recognised_json(recognised: list) -> dict[str, list[dict[str, Any]]]:
    """The files scan took as catalog models (`linked`) and those it only suggests, for --json."""
    return {kind: [{"path": r.path, "node": r.node, "confidence": r.confidence, "how": r.how}
                   for r in recognised if r.linked == linked]
            for kind, linked in (("linked", True), ("suggested", False))}


def _echo_recognised(recognised: list) -> None:
    """A line per file taken as a catalog model, and one per file that only resembles some."""
    import shlex

    from lineage.graph.catalog import catalog_graph

    if not recognised:
        return
    catalog = catalog_graph()
    suggested = [r for r in recognised if not r.linked]
    for r in recognised:
        if r.linked:
            click.echo(f"linked {r.path}: it is {node_label(catalog, r.node)} ({r.told}, {r.confidence:.0%})")
    for path in dict.fromkeys(r.path for r in suggested):  # one line per file, its candidates best first
        likes = [f"{node_label(catalog, r.node)} ({r.confidence:.0%})" for r in suggested if r.path == path]
        first = next(r for r in suggested if r.path == path)
        click.echo(f"{path} looks like {' or '.join(likes)}; "
                   f"run `lmerge link {shlex.quote(path)} {first.node}` to confirm")


@click.command()
@click.argument("node", required=False)
@click.option("--up", is_flag=True, help="Only NODE's ancestors.")
@click.option("--down", is_flag=True, help="Only NODE's descendants.")
@click.option("--depth", type=click.IntRange(min=1), help="At most this many generations from NODE.")
@click.option("--format", "fmt", type=click.Choice(FORMATS),
              help="Output format (default: from -o's extension, else text).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write to this file.")
@click.option("--previews", "with_previews", is_flag=True,
              help="Show each model's images from `lmerge preview` in its box (svg, png, pdf; html also in its "
                   "panel). The images are embedded: the file can be moved.")
@registry_option
def tree(node: str | None, up: bool, down: bool, depth: int | None, fmt: str | None, output: str | None,
         with_previews: bool, registry_path: str | None) -> None:
    """Show the lineage tree: the whole family, or NODE's ancestors and descendants.

    NODE is a recorded file, a node id (catalog slug or AutoV3), a hash prefix, a repo id or a name."""
    from lineage.graph.previews import previews_of, thumbnails
    from lineage.graph.registry import Registry
    from lineage.graph.render import BINARY_FORMATS, PICTURE_FORMATS, format_for_path, render
    from lineage.io.atomic import atomic_write

    with Registry(registry_path) as reg:
        graph = reg.graph()
        focus = reg.resolve(node) if node else None
    if focus:
        graph = neighbourhood(graph, focus, up=up or not down, down=down or not up, depth=depth)
    elif up or down or depth:
        raise LineageError("--up, --down and --depth need a NODE")
    fmt = fmt or (format_for_path(output) if output else "text")
    if fmt in BINARY_FORMATS and not output:
        raise LineageError(f"--format {fmt} is binary: give -o FILE")
    if with_previews and fmt not in PICTURE_FORMATS:
        raise LineageError(f"--previews needs a tree with pictures ({', '.join(PICTURE_FORMATS)}), not {fmt}")
    images = previews_of(graph, reg) if with_previews else {}
    if with_previews and not images:
        click.echo("no model in this tree has previews yet (make them with `lmerge preview NODE`)", err=True)
    if fmt == "text" and not output and sys.stdout.isatty():  # a terminal: its lines fit its width
        import shutil

        from lineage.graph.render import to_text

        data: str | bytes = to_text(graph, focus, width=shutil.get_terminal_size().columns)
    else:
        with thumbnails(images) as pictures:
            data = render(graph, fmt, focus, pictures)
    if output:
        atomic_write(output, data, inputs=[reg.path])
        click.echo(f"wrote {output} ({graph.number_of_nodes()} models, {graph.number_of_edges()} relations)")
    else:
        click.echo(data, nl=False)


def _parse_size(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, int] | None:
    """"832x1216" -> (832, 1216)."""
    if value is None:
        return None
    width, x, height = value.lower().partition("x")
    if not (x and width.isdigit() and height.isdigit()):
        raise click.BadParameter(f"{value!r} is not WIDTHxHEIGHT (e.g. 1024x1024)")
    return int(width), int(height)


@click.command()
@click.argument("nodes", nargs=-1, required=True)
@click.option("--prompt", "prompts", multiple=True,
              help="A prompt of the grid; repeat for several (replaces the built-in prompts).")
@click.option("--seed", "seeds", multiple=True, type=click.IntRange(0, 2**32 - 1),  # A1111's range, as MAX_SEED
              help=f"A seed; each prompt is drawn with each seed (default: {', '.join(map(str, DEFAULT_GRID.seeds))}).")
@click.option("--negative", default=None, help=f"Negative prompt (default: {DEFAULT_GRID.negative or 'none'}).")
@click.option("--size", callback=_parse_size, metavar="WxH",
              help=f"Image size (default: {DEFAULT_GRID.width}x{DEFAULT_GRID.height}).")
@click.option("--steps", type=click.IntRange(min=1), help=f"Sampling steps (default: {DEFAULT_GRID.steps}).")
@click.option("--cfg", type=float, help=f"Classifier-free guidance scale (default: {DEFAULT_GRID.cfg:g}).")
@click.option("--sampler", type=click.Choice(SAMPLER_CHOICES), help=f"Sampler (default: {DEFAULT_GRID.sampler}).")
@click.option("--dtype", type=click.Choice(DTYPE_CHOICES),
              help=f"{DTYPE_HELP} Images drawn in another dtype are drawn again (default: {DEFAULT_GRID.dtype}).")
@click.option("--device", default="cpu", show_default=True, help=DEVICE_HELP)
@click.option("--force", is_flag=True, help="Draw every image again, even those drawn with the same settings.")
@json_option
@registry_option
def preview(nodes: tuple[str, ...], prompts: tuple[str, ...], seeds: tuple[int, ...], negative: str | None,
            size: tuple[int, int] | None, steps: int | None, cfg: float | None, sampler: str | None,
            dtype: str | None, device: str, force: bool, as_json: bool, registry_path: str | None) -> None:
    """Draw a fixed grid of prompts with each of NODES and keep the images beside the registry (by the
    file's AutoV3), for `lmerge tree --previews`. An adapter is drawn on its base model.

    Images drawn before with the same settings are kept. On a CPU a full-size (1024x1024) step takes a
    minute or more: the progress bar says how long is left, and the time per step is printed at the end."""
    from tqdm import tqdm

    from lineage.engine.device import compute_device
    from lineage.graph.previews import StepTimer, grid_with, make_previews, planned, preview_source
    from lineage.graph.registry import Registry

    compute_device(device)  # a device that is not here is said before any work

    width, height = size or (None, None)
    grid = grid_with(width, height, steps, prompts, seeds, negative=negative, cfg=cfg, sampler=sampler, dtype=dtype)
    with Registry(registry_path) as reg:
        sources = list({s.key: s for s in (preview_source(reg, spec) for spec in nodes)}.values())
        work = {s.key: planned(reg, s, grid, force) for s in sources}  # every name is checked before drawing
        timer = StepTimer(sum(len(cells) for cells in work.values()), grid.steps)
        total = timer.images * grid.steps
        bar_format = "{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} steps{postfix}"
        results = []
        with tqdm(total=total, unit="step", bar_format=bar_format, disable=True if as_json else None) as bar:
            def stepped() -> None:  # the label: how long the rest takes at the times measured so far
                timer.step()
                bar.set_postfix_str(timer.label(), refresh=False)
                bar.update(1)

            for source in sources:
                def drawing(i: int, count: int, name: str = source.name) -> None:
                    bar.set_description(f"{name}: image {i + 1}/{count}")

                results.append(make_previews(reg, source, grid, force=force, on_image=drawing, on_step=stepped,
                                             timer=timer, device=device))
    rate = timer.seconds_per_step
    if as_json:
        echo_json({"previews": [{"node": r.source.node, "name": r.source.name, "folder": str(r.folder),
                                 "checkpoint": r.source.checkpoint, "adapter": r.source.adapter,
                                 "base": r.source.base, "files": [str(f) for f in r.files],
                                 "written": [str(f) for f in r.drawn]} for r in results],
                   "size": f"{grid.width}x{grid.height}", "steps": grid.steps, "seconds_per_step": rate})
        return
    for r in results:
        on = f" on {r.source.checkpoint}" if r.source.adapter else ""
        click.echo(f"{r.source.name}: drew {len(r.drawn)} image(s){on}, kept {len(r.files) - len(r.drawn)}, "
                   f"in {r.folder}")
    if rate is not None:
        click.echo(f"{rate:.3g} s per step at {grid.width}x{grid.height}")


@click.command()
@click.argument("adapter")
@click.argument("checkpoint")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@registry_option
def compat(adapter: str, checkpoint: str, as_json: bool, registry_path: str | None) -> None:
    """Does ADAPTER (a LoRA, LoKr, ...) fit CHECKPOINT? Answered from the lineage graph; files are
    recorded first. Exit code 0: compatible, likely compatible (a warning) or uncertain; 1: incompatible;
    2: an error (e.g. a LoRA given as the checkpoint, an unknown name)."""
    from lineage.graph.compat import check
    from lineage.graph.recording import scan_file
    from lineage.graph.registry import Registry

    try:
        with Registry(registry_path) as reg:
            ids = [reg.resolve(scan_file(spec, reg) if os.path.isfile(spec) else spec)
                   for spec in (adapter, checkpoint)]
            result = check(reg.graph(), *ids)
    except LineageError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(COMPAT_ERROR_EXIT)
    if as_json:
        echo_json(result.to_dict())
    else:
        click.echo(f"{result.verdict}: {result.reason}")
    if not result.compatible:
        sys.exit(1)


@click.group()
def hub() -> None:
    """Hugging Face model cards: base_model chains in and out."""


@hub.command("import")
@click.argument("source")
@click.option("--as", "as_node", help="The model a card FILE describes: its file, node id or repo id.")
@click.option("--cards", "cards_dir", type=click.Path(file_okay=False),
              help="Look for cards in CARDS/<owner>/<name>/README.md before asking the hub.")
@click.option("--depth", type=click.IntRange(min=1), default=32, show_default=True,
              help="Follow base_model at most this many cards up.")
@json_option
@registry_option
def hub_import(source: str, as_node: str | None, cards_dir: str | None, depth: int, as_json: bool,
               registry_path: str | None) -> None:
    """Read SOURCE's model card (a repo id or a card file) and its base_model chain into the registry."""
    from lineage.graph.hub import import_card

    result = import_card(source, registry_path, as_node=as_node, cards_dir=cards_dir, max_depth=depth)
    if as_json:
        echo_json({"root": result.root, "nodes": result.nodes,
                   "edges": [{"parent": p, "child": c, "relation": r} for p, c, r in result.edges],
                   "left_to_catalog": [list(edge) for edge in result.skipped], "not_followed": result.not_followed})
        return
    click.echo(f"imported {len(result.nodes)} model(s), {len(result.edges)} relation(s) starting at {result.root}")
    for parent, child, relation in result.edges:
        click.echo(f"  {parent} -> {child} ({relation})")
    if result.skipped:
        click.echo(f"  {len(result.skipped)} relation(s) left to the read-only built-in catalog", err=True)
    for repo, why in result.not_followed.items():
        click.echo(f"  not followed: {repo}: {why}", err=True)


@hub.command("card")
@click.argument("node")
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Update (or create) this README.md instead of printing the front matter.")
@json_option
@registry_option
def hub_card(node: str, output: str | None, as_json: bool, registry_path: str | None) -> None:
    """Write the model card front matter (base_model, base_model_relation) of NODE from the graph."""
    from lineage.graph.hub import card_data, front_matter, write_card
    from lineage.graph.registry import Registry

    with Registry(registry_path) as reg:
        node_id = reg.resolve(node)
        graph = reg.graph()
    if as_json:
        data, missing = card_data(graph, node_id)
        if output:
            write_card(graph, node_id, output, inputs=[reg.path])
        echo_json({"node": node_id, "base_model": data.base_model, "base_model_relation": data.base_model_relation,
                   "output": output, "left_out": missing})
    elif output:
        missing = write_card(graph, node_id, output, inputs=[reg.path])
        click.echo(f"wrote {output}")
    else:
        data, missing = card_data(graph, node_id)
        click.echo(front_matter(data), nl=False)
    if missing:
        click.echo(f"left out (no Hugging Face repo id): {', '.join(missing)}", err=True)


@click.group("registry")
def registry_group() -> None:
    """The registry file: where it is, export and import."""


@registry_group.command("info")
@json_option
@registry_option
def registry_info(as_json: bool, registry_path: str | None) -> None:
    """Where the registry is and what it holds."""
    from lineage.graph.registry import Registry

    with Registry(registry_path) as reg:
        user = reg.user_graph()
    own = sum(attrs.get("source") != "catalog" for _, attrs in user.nodes(data=True))
    if as_json:
        echo_json({"registry": str(reg.path), "models": own, "relations": user.number_of_edges(),
                   "damaged_rows": len(reg.damage)})
        return
    click.echo(f"{reg.path}: {own} model(s), {user.number_of_edges()} relation(s) over the built-in catalog")


@registry_group.command("export")
@click.argument("output", type=click.Path(dir_okay=False))
@click.option("--format", "fmt", type=click.Choice(["json", "graphml"]),
              help="Default: from the file extension (.graphml), else json.")
@json_option
@registry_option
def registry_export(output: str, fmt: str | None, as_json: bool, registry_path: str | None) -> None:
    """Write the user's nodes and edges (not the built-in catalog) to OUTPUT."""
    from lineage.graph.interchange import to_graphml, to_json
    from lineage.graph.registry import Registry
    from lineage.io.atomic import atomic_write

    with Registry(registry_path) as reg:
        user = reg.user_graph()
    fmt = fmt or ("graphml" if output.lower().endswith(".graphml") else "json")
    atomic_write(output, to_graphml(user) if fmt == "graphml" else to_json(user), inputs=[reg.path])
    if as_json:
        echo_json({"output": output, "format": fmt, "models": user.number_of_nodes(),
                   "relations": user.number_of_edges(), "damaged_rows_left_out": len(reg.damage)})
        return
    click.echo(f"wrote {output} ({user.number_of_nodes()} models, {user.number_of_edges()} relations)")


@registry_group.command("import")
@click.argument("source", type=click.Path())
@json_option
@registry_option
def registry_import(source: str, as_json: bool, registry_path: str | None) -> None:
    """Add the nodes and edges of an export (JSON or GraphML); all of it, or nothing on any error."""
    from lineage.graph.interchange import read_graph_file
    from lineage.graph.registry import Registry

    graph = read_graph_file(source)
    with Registry(registry_path) as reg:
        counts = reg.import_graph(graph)
    if as_json:
        echo_json({"models": counts["nodes"], "relations": counts["edges"],
                   "skipped_catalog": counts["skipped_catalog"]})
        return
    click.echo(f"imported {counts['nodes']} model(s), {counts['edges']} relation(s) "
               f"({counts['skipped_catalog']} already in the built-in catalog)")


@registry_group.command("check")
@click.option("--repair", is_flag=True, help="Remove the damaged rows found (everything else stays).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@registry_option
def registry_check(repair: bool, as_json: bool, registry_path: str | None) -> None:
    """Find rows no command can use (bad JSON, a path or relation naming no model); --repair removes them.

    Exits 0 when the registry is sound or was repaired, 1 when damaged rows remain."""
    from lineage.graph import repair as repairing
    from lineage.graph.registry import Registry

    with Registry(registry_path) as reg:
        damage = repairing.check(reg)
        removed = repairing.repair(reg, damage) if repair and damage else 0
    if as_json:
        echo_json({"registry": str(reg.path), "damaged": [{"table": d.table, "row": d.key, "problem": d.problem}
                                                           for d in damage], "removed": removed})
    else:
        for row in damage:
            click.echo(f"damaged: {row}")
        if not damage:
            click.echo(f"{reg.path}: no damaged rows")
        elif repair:
            click.echo(f"removed {removed} damaged row(s); the rest of the registry is unchanged")
            if any(row.table == "nodes" for row in damage):
                click.echo("a file whose model row was removed is recorded again by `lmerge scan FILE`")
        else:
            click.echo(f"{len(damage)} damaged row(s); `lmerge registry check --repair` removes them")
    if damage and not repair:
        sys.exit(1)


def register(group: click.Group) -> None:
    """Add the lineage-graph commands to the `lmerge` group."""
    from lineage.graph.edit_commands import register as register_editing

    for command in (add, scan, tree, preview, compat, hub, registry_group):
        group.add_command(command)
    register_editing(group)
