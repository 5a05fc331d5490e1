"""`lmerge` commands for adapters, one section each (convert here; extract, apply, resize and lora-merge
join as they land). Each is a thin layer over a library function; nothing heavy is imported before a
command runs."""
from __future__ import annotations

import click

from lineage.cli.output import echo_json
from lineage.errors import LineageError

LISTED = 10  # left-out pickle entries named in convert's message

# ---------------------------------------------------------------------------------------------
# convert: an adapter into another key dialect, or a pickle checkpoint into safetensors


@click.command()
@click.argument("src", type=click.Path())
@click.argument("dst", type=click.Path())
@click.option("--to", "to", type=click.Choice(["kohya", "peft"]), default=None,
              help="Convert the adapter SRC into this key dialect (kohya: lora_unet_/lora_te1_/lora_te2_ names "
                   "with alpha tensors; peft: diffusers names with lora_A/lora_B, alpha in the header).")
@click.option("--no-record", is_flag=True, help="Do not record the converted adapter in the lineage registry.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def convert(src: str, dst: str, to: str | None, no_record: bool, as_json: bool) -> None:
    """Convert SRC into DST.

    With --to: SRC is an SDXL adapter (kohya, LyCORIS or PEFT keys) and DST the same adapter in that
    dialect, every tensor copied bit for bit; what the target cannot hold (LoKr, LoHa, full diffs in
    PEFT) is refused. Without --to: SRC is a pickle checkpoint (.ckpt/.pt/.bin) written as safetensors,
    loading only plain tensors; entries that are not tensors are listed as left out."""
    if to is not None:
        from lineage.adapters.convert import convert as convert_adapter

        done = convert_adapter(src, dst, to=to, record=not no_record, progress=not as_json)
        if as_json:
            echo_json({"path": done.path, "autov3": done.autov3, "source_dialect": done.source_dialect,
                       "dialect": done.dialect, "modules": done.modules, "node": done.node,
                       "record_error": done.record_error})
            return
        click.echo(f"wrote {dst} ({done.modules} modules, {done.source_dialect} -> {done.dialect})")
        if done.record_error:
            click.echo(f"warning: not recorded in the registry: {done.record_error}", err=True)
        return
    from lineage.io.pickle_convert import convert_pickle

    if _is_safetensors(src):
        raise LineageError("is a safetensors file already; to convert an adapter into another key dialect, "
                           "give --to kohya or --to peft", src)
    done_pickle = convert_pickle(src, dst)
    click.echo(f"wrote {dst} ({done_pickle.tensors} tensors)")
    if done_pickle.left_out:
        shown = ", ".join(done_pickle.left_out[:LISTED]) + (", …" if len(done_pickle.left_out) > LISTED else "")
        click.echo(f"left out {len(done_pickle.left_out)} entries that are not tensors: {shown}", err=True)


def _is_safetensors(path: str) -> bool:
    from lineage.io.safetensors import read_header

    try:
        read_header(path)
    except LineageError:
        return False
    return True


def register(group: click.Group) -> None:
    """Add the adapter commands to the `lmerge` group."""
    for command in (convert,):
        group.add_command(command)
