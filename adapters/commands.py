"""`lmerge` commands for adapters, one section each (convert here; extract, apply, resize and lora-merge
join as they land). Each is a thin layer over a library function; nothing heavy is imported before a
command runs."""
from __future__ import annotations

import click

from lineage.cli.output import echo_json

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

    done_pickle = convert_pickle(src, dst)
    click.echo(f"wrote {dst} ({done_pickle.tensors} tensors)")
    if done_pickle.left_out:
        shown = ", ".join(done_pickle.left_out[:LISTED]) + (", …" if len(done_pickle.left_out) > LISTED else "")
        click.echo(f"left out {len(done_pickle.left_out)} entries that are not tensors: {shown}", err=True)


# ---------------------------------------------------------------------------------------------
# apply: adapters baked into a checkpoint


@click.command("apply")
@click.argument("checkpoint", type=click.Path())
@click.argument("adapters", nargs=-1, required=True, metavar="ADAPTER[:STRENGTH]...")
@click.option("-o", "--output", required=True, type=click.Path(), help="The patched checkpoint to write.")
@click.option("--title", help="The output's ModelSpec title (default: its file name).")
@click.option("--workers", type=click.IntRange(1, 64), default=None, help="Worker threads (default: up to 4).")
@click.option("--dry-run", is_flag=True, help="Check the inputs and show what would be patched; write nothing.")
@click.option("--no-record", is_flag=True, help="Do not record the output in the lineage registry.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def apply_command(checkpoint: str, adapters: tuple[str, ...], output: str, title: str | None, workers: int | None,
                  dry_run: bool, no_record: bool, as_json: bool) -> None:
    """Bake ADAPTERs (LoRA, LoCon, LoKr, LoHa, full diff, DoRA; kohya, LyCORIS or PEFT keys) into
    CHECKPOINT, each at its STRENGTH (default 1): W + strength * delta per adapted weight, in fp32,
    stored in each tensor's own dtype; every other tensor is copied unchanged."""
    from lineage.adapters.apply import DEFAULT_WORKERS, AdapterInput, apply, plan

    inputs = [AdapterInput.parse(a) for a in adapters]
    if dry_run:
        found = plan(checkpoint, inputs)
        if as_json:
            echo_json(found.summary())
            return
        click.echo(f"apply to {checkpoint}: {len(found.patches)} keys patched of {len(found.tensors)}")
        for a, f in zip(found.adapters, found.files):
            click.echo(f"  {a.path} at {a.strength:g}: {len(f.modules)} {f.algorithm} modules ({f.dialect})")
        return
    done = apply(checkpoint, inputs, output, record=not no_record, title=title,
                 workers=workers or DEFAULT_WORKERS, progress=not as_json)
    if as_json:
        echo_json({**done.plan.summary(), "path": done.path, "autov3": done.autov3, "node": done.node,
                   "record_error": done.record_error})
        return
    click.echo(f"wrote {output} ({len(done.plan.patches)} keys patched by {len(inputs)} adapter(s))")
    if done.record_error:
        click.echo(f"warning: not recorded in the registry: {done.record_error}", err=True)


def register(group: click.Group) -> None:
    """Add the adapter commands to the `lmerge` group."""
    for command in (convert, apply_command):
        group.add_command(command)
