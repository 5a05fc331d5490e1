"""`lmerge`: the command line. Each subcommand is a thin layer over a library function."""
from __future__ import annotations

import json
import sys
from typing import Any

import click

from . import __version__
from .errors import LineageError


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


def _echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, ensure_ascii=False))


@main.command()
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--hash", "with_hashes", is_flag=True, help="Also compute the identity hashes (reads the whole file).")
def inspect(path: str, as_json: bool, with_hashes: bool) -> None:
    """Show the format, architecture, components, prediction type and recorded lineage of PATH."""
    from .inspection import format_report, inspect_path

    report = inspect_path(path, with_hashes=with_hashes)
    if as_json:
        _echo_json(report)
    else:
        click.echo(format_report(report))


@main.command("hash")
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of objects.")
def hash_command(paths: tuple[str, ...], as_json: bool) -> None:
    """Compute SHA256, AutoV1, AutoV2, AutoV3 and CRC32 of each file in one read pass."""
    from .hashing import hash_file

    results = [hash_file(p).to_dict() for p in paths]
    if as_json:
        _echo_json(results)
        return
    for r in results:
        click.echo(r["path"])
        for name in ("sha256", "autov1", "autov2", "autov3", "crc32"):
            click.echo(f"  {name:<7} {r[name] if r[name] is not None else '-'}")


@main.command()
@click.argument("src", type=click.Path())
@click.argument("dst", type=click.Path())
def convert(src: str, dst: str) -> None:
    """Convert a pickle checkpoint (.ckpt/.pt/.bin) to safetensors, loading only plain tensors."""
    from .convert import convert_pickle

    n = convert_pickle(src, dst)
    click.echo(f"wrote {dst} ({n} tensors)")


@main.command()
@click.argument("output", type=click.Path())
@click.option("--size", type=click.Choice(["small", "full"]), default="small", show_default=True,
              help="small: reduced widths (~60 MB); full: the real SDXL shapes (6.9 GB in fp16).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--dtype", type=click.Choice(["F16", "BF16", "F32"]), default="F16", show_default=True)
@click.option("--parent", type=click.Path(), help="Write a fine-tune of this checkpoint instead of a base.")
@click.option("--prediction-type", type=click.Choice(["epsilon", "v", "v+ztsnr"]), help="Marker tensors to write.")
@click.option("--rank", type=int, default=8, show_default=True, help="Rank of the planted delta of a fine-tune.")
def generate(output: str, size: str, seed: int, dtype: str, parent: str | None, prediction_type: str | None, rank: int) -> None:
    """Write a generated SDXL checkpoint (real key names) for tests, demos and benchmarks."""
    from .synthetic import write_base, write_child

    if parent:
        write_child(parent, output, seed=seed, rank=rank, prediction_type=prediction_type)
    else:
        write_base(output, size=size, seed=seed, dtype=dtype, prediction_type=prediction_type or "epsilon")
    click.echo(f"wrote {output}")
from .graph_commands import register; register(main)  # noqa: E402,E702 - add, scan, link, tree, compat, hub, registry
from merge.commands import register as _register_merge; _register_merge(main)  # noqa: E402,E702 - merge, reproduce, methods
if __name__ == "__main__":
    main()
