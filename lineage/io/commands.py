"""`lmerge` commands for files as files: hash (convert, which also takes pickles, is in adapters/commands.py)."""
from __future__ import annotations

import click

from lineage.cli.output import echo_json


@click.command("hash")
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of objects.")
def hash_command(paths: tuple[str, ...], as_json: bool) -> None:
    """Compute SHA256, AutoV1, AutoV2, AutoV3 and CRC32 of each file in one read pass."""
    import os

    from tqdm import tqdm

    from lineage.io.hashing import hash_file

    sizes = [os.path.getsize(p) if os.path.isfile(p) else 0 for p in paths]
    results = []
    # On stderr, and only on a terminal: --json and redirected output stay clean.
    with tqdm(total=sum(sizes), unit="B", unit_scale=True, desc="hashing", leave=False, disable=None) as bar:
        for path in paths:
            results.append(hash_file(path, on_bytes=bar.update).to_dict())
    if as_json:
        echo_json(results)
        return
    for r in results:
        click.echo(r["path"])
        for name in ("sha256", "autov1", "autov2", "autov3", "crc32"):
            click.echo(f"  {name:<7} {r[name] if r[name] is not None else '-'}")


def register(group: click.Group) -> None:
    """Add the file commands to the `lmerge` group."""
    for command in (hash_command,):
        group.add_command(command)
