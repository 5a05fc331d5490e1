"""`lmerge` commands for identity and editing: link, show, edit, merge-nodes, remove.

Thin layers over lineage/graph/editing.py; `register(group)` adds them to the `lmerge` group. Every
command takes `--registry PATH` like the other graph commands.
"""
from __future__ import annotations

from typing import Any

import click

from lineage.cli.output import echo_json
from lineage.errors import LineageError
from lineage.graph.commands import json_option, node_label, registry_option
from lineage.graph.model import RELATIONS, display_name


@click.command()
@click.argument("path", type=click.Path())
@click.argument("node")
@json_option
@registry_option
def link(path: str, node: str, as_json: bool, registry_path: str | None) -> None:
    """The file PATH IS the model NODE (e.g. a catalog entry: noobai-xl-vpred-1.0): its hashes and
    paths attach to NODE, and what is made from the file is made from NODE. Kinds, architectures
    and prediction types must agree (a LoRA is never a checkpoint)."""
    from lineage.graph.editing import link as link_file
    from lineage.graph.registry import Registry

    with Registry(registry_path) as reg:
        target = link_file(path, node, reg)
        graph = reg.graph()
    if as_json:
        echo_json({"path": path, "node": target, "name": display_name(graph, target)})
        return
    click.echo(f"linked {path}: it is {node_label(graph, target)}")


def _related(edge: dict[str, Any]) -> str:
    """A parent or child as `show` lists it: its name, id and how it is related."""
    from lineage.graph.editing import edge_text

    name = edge["name"] if edge["name"] == edge["id"] else f"{edge['name']} [{edge['id']}]"
    return f"{name} ({edge_text(edge)})"


def show_text(facts: dict[str, Any]) -> str:
    """`lmerge show` as text: one fact per line, lists indented."""
    from lineage.graph.editing import show_fields

    lines = [f"{facts['name']} [{facts['id']}] ({facts['origin']})"]
    lines += [f"  {caption}: {text}" for caption, text in show_fields(facts)]
    for title in ("parents", "children"):
        if facts.get(title):
            lines.append(f"  {title}:")
            lines += [f"    {_related(e)}" for e in facts[title]]
    return "\n".join(lines) + "\n"


@click.command()
@click.argument("node")
@json_option
@registry_option
def show(node: str, as_json: bool, registry_path: str | None) -> None:
    """Everything known about NODE: names, hashes, files and paths, parents (relation, weight,
    method), children, licence, prediction type, URLs and notes.

    NODE is a recorded file, a node id, a hash prefix, a repo id, a Hugging Face or Civitai URL or a name."""
    from lineage.graph.editing import show as show_node
    from lineage.graph.registry import Registry

    with Registry(registry_path) as reg:
        node_id = reg.resolve(node)
        facts = show_node(reg.graph(), node_id)
    if as_json:
        echo_json(facts)
    else:
        click.echo(show_text(facts), nl=False)


@click.command()
@click.argument("node")
@click.option("--rename", help="A new display name.")
@click.option("--set-repo", "repo", help="Its Hugging Face repo id (owner/name); \"\" clears it.")
@click.option("--set-civitai", "civitai_url", help="Its Civitai URL; \"\" clears it.")
@click.option("--set-license", "license_", help="Its licence; \"\" clears it.")
@click.option("--set-notes", "notes", help="Notes; \"\" clears them.")
@click.option("--remove-parent", "removed", multiple=True, help="Remove this parent edge. Repeatable.")
@click.option("--parent", "parents", multiple=True,
              help="Replace ALL parents by these (repeat for a merge); with --relation and --weight.")
@click.option("--relation", type=click.Choice(list(RELATIONS)),
              help="Relation of the new --parent edges (default: merge for several, else finetune).")
@click.option("--weight", "weights", type=float, multiple=True, help="Weight of each --parent, in order.")
@click.option("--unlink", is_flag=True, help="NODE (a linked file) is its own model again: undoes link/merge-nodes.")
@json_option
@registry_option
def edit(node: str, rename: str | None, repo: str | None, civitai_url: str | None, license_: str | None,
         notes: str | None, removed: tuple[str, ...], parents: tuple[str, ...], relation: str | None,
         weights: tuple[float, ...], unlink: bool, as_json: bool, registry_path: str | None) -> None:
    """Change one of your own nodes (catalog nodes are read-only): rename it, set its repo id,
    Civitai URL, licence or notes, remove a parent edge or replace its parents."""
    from lineage.graph import editing
    from lineage.graph.registry import Registry

    if (relation or weights) and not parents:
        raise LineageError("--relation and --weight go with --parent")
    values = {k: v for k, v in {"name": rename, "repo": repo, "civitai_url": civitai_url, "license": license_,
                                "notes": notes}.items() if v is not None}
    if not (values or removed or parents or unlink):
        raise LineageError("nothing to change: give --rename, --set-repo, --set-civitai, --set-license, "
                           "--set-notes, --remove-parent, --parent or --unlink")
    say = (lambda text: None) if as_json else click.echo
    with Registry(registry_path) as reg:
        unlinked = None
        if unlink:
            unlinked = editing.unlink(node, reg)
            say(f"unlinked {unlinked}: it is its own model again")
            if not (values or removed or parents):
                if as_json:
                    echo_json({"node": unlinked, "unlinked": unlinked, "set": {}, "cleared": [],
                               "removed_parents": [], "parents": None})
                return
            node = unlinked
        node_id = reg.resolve(node)
        if values:
            editing.set_attributes(node_id, values, reg)
        for parent in removed:
            editing.remove_parent(node_id, parent, reg)
            say(f"removed parent {parent}")
        if parents:
            editing.set_parents(node_id, parents, relation or ("merge" if len(parents) > 1 else "finetune"),
                                weights or None, reg)
        facts = editing.show(reg.graph(), node_id)
    if as_json:
        echo_json({"node": node_id, "name": facts["name"], "unlinked": unlinked,
                   "set": {k: v for k, v in values.items() if v}, "cleared": [k for k, v in values.items() if not v],
                   "removed_parents": list(removed), "parents": facts.get("parents", []) if parents else None})
        return
    for key, value in values.items():
        click.echo(f"set {key} to {value!r}" if value else f"cleared {key}")
    if parents:
        click.echo("parents now: " + "; ".join(_related(e) for e in facts.get("parents", [])))
    click.echo(f"edited {facts['name']} [{node_id}]")


@click.command("merge-nodes")
@click.argument("keep")
@click.argument("duplicate")
@json_option
@registry_option
def merge_nodes(keep: str, duplicate: str, as_json: bool, registry_path: str | None) -> None:
    """DUPLICATE is the same model as KEEP: from now on its names, hashes, files and children are
    KEEP's (undo: `lmerge edit DUPLICATE --unlink`). Not a weight merge: that is `lmerge merge`."""
    from lineage.graph.editing import merge_nodes as merge
    from lineage.graph.registry import Registry

    with Registry(registry_path) as reg:
        gone = reg.resolve(duplicate)
        kept = merge(keep, duplicate, reg)
        graph = reg.graph()
    if as_json:
        echo_json({"merged": gone, "into": kept, "name": display_name(graph, kept)})
        return
    click.echo(f"merged {gone} into {node_label(graph, kept)}")


@click.command()
@click.argument("node")
@json_option
@registry_option
def remove(node: str, as_json: bool, registry_path: str | None) -> None:
    """Remove one of your own nodes from the registry, with its edges and the files linked to it
    (the files on disk are not touched). Catalog nodes cannot be removed."""
    from lineage.graph.editing import remove_node
    from lineage.graph.registry import Registry

    with Registry(registry_path) as reg:
        removed = remove_node(node, reg)
    if as_json:
        echo_json({"removed": removed[0], "linked_files": removed[1:]})
        return
    click.echo(f"removed {removed[0]}" + (f" and {len(removed) - 1} linked file(s)" if len(removed) > 1 else ""))


def register(group: click.Group) -> None:
    """Add the identity and editing commands to the `lmerge` group."""
    for command in (link, show, edit, merge_nodes, remove):
        group.add_command(command)
