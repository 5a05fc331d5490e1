"""`lmerge`: the command line. The group lives here; each area adds its own commands from its package
(io: hash; sdxl: inspect, generate; graph: add, scan, tree, preview, compat, hub, registry, link, show, edit,
merge-nodes, remove; merge: merge, reproduce, methods; adapters: convert, extract, apply, resize, lora-merge;
train: sample). Every subcommand is a thin layer over a library function."""
from __future__ import annotations

import sys
from typing import Any

import click

from lineage import __version__
from lineage.errors import LineageError


class _Group(click.Group):
    """Turns LineageError into a one-line message (a traceback only with --debug)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except LineageError as e:
            if ctx.params.get("debug"):
                raise
            click.echo(f"error: {e}", err=True)
            sys.exit(1)


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="lmerge")
@click.option("--debug", is_flag=True, help="Show full tracebacks for errors.")
def main(debug: bool) -> None:
    """Merge, inspect and trace the lineage of SDXL checkpoints."""


def _register_areas() -> None:
    from lineage.adapters.commands import register as register_adapters
    from lineage.graph.commands import register as register_graph
    from lineage.io.commands import register as register_io
    from lineage.merge.commands import register as register_merge
    from lineage.sdxl.commands import register as register_sdxl
    from lineage.train.commands import register as register_sampling

    for register in (register_sdxl, register_io, register_graph, register_merge, register_adapters, register_sampling):
        register(main)


_register_areas()
