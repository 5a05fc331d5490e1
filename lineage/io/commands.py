"""`lmerge` commands for files as files: hash, convert."""
from __future__ import annotations

import click

from lineage.cli.output import echo_json

LISTED = 10  # left-out entries named in convert's message


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


@click.command()
@click.argument("src", type=click.Path())
@click.argument("dst", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def convert(src: str, dst: str, as_json: bool) -> None:
    """Convert a pickle checkpoint (.ckpt/.pt/.bin) to safetensors, loading only plain tensors.
    Entries that are not tensors (step counters, optimizer state beside state_dict) are listed as left out."""
    from lineage.io.pickle_convert import convert_pickle

    done = convert_pickle(src, dst)
    if as_json:
        echo_json({"output": dst, "tensors": done.tensors, "left_out": done.left_out})
        return
    click.echo(f"wrote {dst} ({done.tensors} tensors)")
    if done.left_out:
        shown = ", ".join(done.left_out[:LISTED]) + (", …" if len(done.left_out) > LISTED else "")
        click.echo(f"left out {len(done.left_out)} entries that are not tensors: {shown}", err=True)


def register(group: click.Group) -> None:
    """Add the file commands to the `lmerge` group."""
    for command in (hash_command, convert):
        group.add_command(command)
