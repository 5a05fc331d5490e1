"""`lmerge` commands for SDXL checkpoints as such: inspect, generate."""
from __future__ import annotations

import click

from lineage.cli.output import echo_json
from lineage.sdxl.layout import MARKERS_FOR_PREDICTION


@click.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (a list of them for several files).")
@click.option("--hash", "with_hashes", is_flag=True, help="Also compute the identity hashes (reads the whole file).")
def inspect(paths: tuple[str, ...], as_json: bool, with_hashes: bool) -> None:
    """Show the format, architecture, components, prediction type and the lineage its metadata records
    (parents, weights, method) of each of PATHS. A file that cannot be read is reported and the others
    still shown; the exit code is then 1."""
    from lineage.errors import LineageError
    from lineage.sdxl.inspection import format_report, inspect_path

    reports, failed = [], False
    for path in paths:
        try:
            reports.append(inspect_path(path, with_hashes=with_hashes))
        except LineageError as e:
            if len(paths) == 1:
                raise
            click.echo(f"error: {e}", err=True)
            failed = True
    if as_json:
        echo_json(reports[0] if len(paths) == 1 else reports)
    else:
        click.echo("\n\n".join(format_report(r) for r in reports))
    if failed:
        raise SystemExit(1)


@click.command()
@click.argument("output", type=click.Path())
@click.option("--size", type=click.Choice(["tiny", "small", "full"]), default="small", show_default=True,
              help="tiny: UNet widths / 80, the rest / 64 (1.7 MB); small: widths / ~10 (59 MB); full: the real SDXL "
                   "shapes (6.9 GB).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--dtype", type=click.Choice(["F16", "BF16", "F32"]), default="F16", show_default=True)
@click.option("--parent", type=click.Path(), help="Write a fine-tune of this checkpoint instead of a base.")
@click.option("--prediction-type", type=click.Choice(list(MARKERS_FOR_PREDICTION)), help="Marker tensors to write.")
@click.option("--rank", type=int, default=8, show_default=True, help="Rank of the planted delta of a fine-tune.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def generate(output: str, size: str, seed: int, dtype: str, parent: str | None, prediction_type: str | None, rank: int,
             as_json: bool) -> None:
    """Write a generated SDXL checkpoint (real key names) for tests, demos and benchmarks."""
    import os

    from lineage.sdxl.synthetic import write_base, write_child

    if parent:
        write_child(parent, output, seed=seed, rank=rank, prediction_type=prediction_type, progress=True)
    else:
        write_base(output, size=size, seed=seed, dtype=dtype, prediction_type=prediction_type or "epsilon",
                   progress=True)
    if as_json:
        echo_json({"output": output, "bytes": os.path.getsize(output), "size": size, "seed": seed,
                   "parent": parent})
        return
    click.echo(f"wrote {output}")


def register(group: click.Group) -> None:
    """Add the SDXL checkpoint commands to the `lmerge` group."""
    for command in (inspect, generate):
        group.add_command(command)
