"""`lmerge` commands for adapters, one section each (convert here; extract, apply, resize and lora-merge
join as they land). Each is a thin layer over a library function; nothing heavy is imported before a
command runs."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from lineage.cli.output import echo_json
from lineage.errors import LineageError

if TYPE_CHECKING:
    from lineage.adapters.resize import LoraResult

LISTED = 10  # left-out pickle entries named in convert's message

# ---------------------------------------------------------------------------------------------
# convert: an adapter into another key dialect, or a pickle checkpoint into safetensors


@click.command()
@click.argument("src", type=click.Path())
@click.argument("dst", type=click.Path())
@click.option("--to", "to", type=click.Choice(["kohya", "peft"]), default=None,
              help="Convert the adapter SRC into this key dialect (kohya: lora_unet_/lora_te1_/lora_te2_ names "
                   "with alpha tensors; peft: diffusers names with lora_A/lora_B, alpha in the header).")
@click.option("--registry", type=click.Path(), help="The lineage registry (default $LINEAGE_HOME).")
@click.option("--no-record", is_flag=True, help="Do not record the converted adapter in the lineage registry.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def convert(src: str, dst: str, to: str | None, registry: str | None, no_record: bool, as_json: bool) -> None:
    """Convert SRC into DST.

    With --to: SRC is an SDXL adapter (kohya, LyCORIS or PEFT keys) and DST the same adapter in that
    dialect, every tensor copied bit for bit; what the target cannot hold (LoKr, LoHa, full diffs in
    PEFT) is refused. Without --to: SRC is a pickle checkpoint (.ckpt/.pt/.bin) written as safetensors,
    loading only plain tensors; entries that are not tensors are listed as left out."""
    if to is not None:
        from lineage.adapters.convert import convert as convert_adapter

        done = convert_adapter(src, dst, to=to, record=not no_record, registry=registry, progress=not as_json)
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
    if as_json:
        echo_json({"output": dst, "tensors": done_pickle.tensors, "left_out": done_pickle.left_out})
        return
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


# ---------------------------------------------------------------------------------------------
# extract: a LoRA / LoCon / LoKr / full diff from a fine-tune and its base

WORST_SHOWN = 8  # modules listed in extract's table, the largest errors first


@click.command()
@click.argument("base", type=click.Path())
@click.argument("tuned", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(), help="The adapter file to write.")
@click.option("--type", "kind", type=click.Choice(["lora", "locon", "lokr", "diff"]), default="lora",
              show_default=True, help="lora: kohya's default modules; locon: plus the convolutions; lokr: the "
                                      "same modules as nearest Kronecker products; diff: the exact difference.")
@click.option("--rank", type=click.IntRange(min=1), help="Rank of every module [32]; for lokr the rank of w2's "
                                                         "factors (without it or a budget, w2 is stored full).")
@click.option("--conv-rank", type=click.IntRange(min=1), help="Rank of 3x3 convolutions (locon; default --rank).")
@click.option("--rank-mode", type=click.Choice(["fixed", "ratio", "threshold", "energy", "quantile"]),
              default="fixed", show_default=True, help="How each module's rank is chosen (with --rank-param).")
@click.option("--rank-param", type=float, help="ratio: keep σ ≥ x·σ₁; threshold: σ ≥ x; energy: share x of ‖Δ‖²; "
                                                 "quantile: share x of Σσ (needs --exact).")
@click.option("--max-rank", type=click.IntRange(min=1), help="Most ranks a mode or a budget gives a module [128].")
@click.option("--size", help="One budget for the whole file, e.g. 200MB: ranks chosen for the least total error.")
@click.option("--params", "param_budget", type=click.IntRange(min=1), help="The budget as a parameter count.")
@click.option("--factor", type=int, help="lokr: split each dimension at this factor (it must divide them all); "
                                        "-1 (default): most square.")
@click.option("--kron-rank", type=int, default=1, show_default=True,
              help="lokr: Kronecker products per module; LoKr files hold 1, the only value written.")
@click.option("--tucker", is_flag=True, help="lokr: a 3x3 convolution's factored w2 as a Tucker core lokr_t2 "
                                             "(LyCORIS' use_tucker).")
@click.option("--decompose-both", is_flag=True, help="lokr: w1 too as a pair of w2's rank where that is smaller "
                                                     "(LyCORIS' decompose_both).")
@click.option("--components", default="unet,clip_l,clip_g", show_default=True,
              help="Which parts to extract, comma-separated.")
@click.option("--exact", is_flag=True, help="Full SVDs instead of the randomized range finder (slower).")
@click.option("--dtype", type=click.Choice(["fp16", "bf16", "fp32"]), default="fp16", show_default=True)
@click.option("--device", help="Where the SVDs run: cpu (default), cuda, cuda:N.")
@click.option("--registry", type=click.Path(), help="The lineage registry (default $LINEAGE_HOME).")
@click.option("--no-record", is_flag=True, help="Do not record the adapter in the lineage registry.")
@click.option("--json", "as_json", is_flag=True, help="Print the result (every module) as JSON.")
def extract(base: str, tuned: str, output: str, kind: str, rank: int | None, conv_rank: int | None, rank_mode: str,
            rank_param: float | None, max_rank: int | None, size: str | None, param_budget: int | None,
            factor: int | None, kron_rank: int, tucker: bool, decompose_both: bool, components: str, exact: bool,
            dtype: str, device: str | None, registry: str | None, no_record: bool, as_json: bool) -> None:
    """Extract TUNED − BASE (two SDXL checkpoints) as an adapter: each module's difference by truncated
    SVD (lokr: its nearest Kronecker product, and beside its error the error of a LoRA of equal size),
    streamed module by module, errors reported per module and in total."""
    from lineage.adapters.extract import extract as run_extract

    done = run_extract(base, tuned, output, type=kind, rank=rank, conv_rank=conv_rank, rank_mode=rank_mode,
                       rank_param=rank_param, size=size, params=param_budget, max_rank=max_rank, factor=factor,
                       kron_rank=kron_rank, tucker=tucker, decompose_both=decompose_both,
                       components=[c.strip() for c in components.split(",") if c.strip()],
                       exact=exact, dtype=dtype, record=not no_record, registry=registry, progress=not as_json,
                       device=device)
    if as_json:
        echo_json({"path": done.path, "autov3": done.autov3, "type": done.type, "params": done.params,
                   "total_relative_error": done.total_error, "lora_equal_params_relative_error": done.lora_error,
                   "svd": "exact" if done.exact else "randomized",
                   "components": done.components, "node": done.node, "record_error": done.record_error,
                   "modules": [vars(m) for m in done.modules]})
        return
    click.echo(f"wrote {done.path} ({done.type}, {done.params:,} parameters, AutoV3 {done.autov3[:12]})")
    click.echo(f"{'component':<10} {'modules':>7} {'changed':>7} {'rel. change':>11} {'rel. error':>10}")
    for name, c in done.components.items():
        click.echo(f"{name:<10} {int(c['modules']):>7} {int(c['changed']):>7} {c['relative_change']:>11.2e} "
                   f"{c['relative_error']:>10.4f}")
        if not c["changed"]:
            click.echo(f"  {name} has the same weights in both files: left out", err=True)
    worst = sorted((m for m in done.modules if m.rank), key=lambda m: -m.relative_error)[:WORST_SHOWN]
    if done.type == "lokr":
        lokr_better = sum(m.relative_error < (m.lora_error or 0.0) for m in done.modules if m.rank)
        click.echo(f"total relative error {done.total_error:.4f}; a LoRA of equal size per module: "
                   f"{done.lora_error:.4f}")
        click.echo(f"LoKr is better in {lokr_better} of {sum(1 for m in done.modules if m.rank)} modules; "
                   "largest errors:")
        click.echo(f"  {'LoKr':>6} {'LoRA':>6} {'w1':>7} {'w2':>9} {'r':>4}  module")
        for m in worst:
            w1, w2 = ("x".join(map(str, s or ())) for s in (m.w1_shape, m.w2_shape))
            click.echo(f"  {m.relative_error:.4f} {m.lora_error or 0.0:.4f} {w1:>7} {w2:>9} "
                       f"{m.w2_rank or 'full':>4}  {_fit(m.name, 38)}")
    elif done.type != "diff":
        click.echo(f"total relative error {done.total_error:.4f} ({'exact' if done.exact else 'randomized'} SVD); "
                   "largest per module:")
        for m in worst:
            click.echo(f"  {m.relative_error:.4f}  rank {m.rank:>4}  {_fit(m.name, 58)}")
    if done.record_error:
        click.echo(f"warning: not recorded in the registry: {done.record_error}", err=True)


# ---------------------------------------------------------------------------------------------
# apply: adapters baked into a checkpoint


@click.command("apply")
@click.argument("checkpoint", type=click.Path())
@click.argument("adapters", nargs=-1, required=True, metavar="ADAPTER[:STRENGTH]...")
@click.option("-o", "--output", required=True, type=click.Path(), help="The patched checkpoint to write.")
@click.option("--title", help="The output's ModelSpec title (default: its file name).")
@click.option("--workers", type=click.IntRange(1, 64), default=None, help="Worker threads (default: up to 4).")
@click.option("--dry-run", is_flag=True, help="Check the inputs and show what would be patched; write nothing.")
@click.option("--registry", type=click.Path(), help="The lineage registry (default $LINEAGE_HOME).")
@click.option("--no-record", is_flag=True, help="Do not record the output in the lineage registry.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def apply_command(checkpoint: str, adapters: tuple[str, ...], output: str, title: str | None, workers: int | None,
                  dry_run: bool, registry: str | None, no_record: bool, as_json: bool) -> None:
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
    done = apply(checkpoint, inputs, output, record=not no_record, registry=registry, title=title,
                 workers=workers or DEFAULT_WORKERS, progress=not as_json)
    if as_json:
        echo_json({**done.plan.summary(), "path": done.path, "autov3": done.autov3, "node": done.node,
                   "record_error": done.record_error})
        return
    click.echo(f"wrote {output} ({len(done.plan.patches)} keys patched by {len(inputs)} adapter(s))")
    if done.record_error:
        click.echo(f"warning: not recorded in the registry: {done.record_error}", err=True)


# ---------------------------------------------------------------------------------------------
# resize: a LoRA / LoCon re-truncated to other ranks, without its base

RANK_MODES = ["fixed", "ratio", "threshold", "energy", "quantile"]


@click.command()
@click.argument("adapter", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(), help="The resized adapter to write.")
@click.option("--rank", type=int, help="The new rank of every module (a module keeps less if it has less).")
@click.option("--rank-mode", type=click.Choice(RANK_MODES), default="fixed", show_default=True,
              help="How each module's rank is chosen (with --rank-param).")
@click.option("--rank-param", type=float, help="ratio: keep σ ≥ x·σ₁; threshold: σ ≥ x; energy: share x of ‖ΔW‖²; "
                                                 "quantile: share x of Σσ.")
@click.option("--max-rank", type=int, help="Most ranks a mode gives a module [the input's largest rank].")
@click.option("--size", help="One budget for the whole file, e.g. 50MB: ranks chosen for the least total error.")
@click.option("--params", "param_budget", type=int, help="The budget as a parameter count.")
@click.option("--registry", type=click.Path(), help="The lineage registry (default $LINEAGE_HOME).")
@click.option("--no-record", is_flag=True, help="Do not record the resized adapter in the lineage registry.")
@click.option("--json", "as_json", is_flag=True, help="Print the result (every module) as JSON.")
def resize(adapter: str, output: str, rank: int | None, rank_mode: str, rank_param: float | None,
           max_rank: int | None, size: str | None, param_budget: int | None, registry: str | None, no_record: bool,
           as_json: bool) -> None:
    """Re-truncate the LoRA / LoCon ADAPTER to new ranks without its base: per module the SVD of
    up @ down (through the QR of each factor), the retained share of ‖ΔW‖² reported per module."""
    from lineage.adapters.resize import resize as run_resize

    done = run_resize(adapter, output, rank=rank, rank_mode=rank_mode, rank_param=rank_param, max_rank=max_rank,
                      size=size, params=param_budget, record=not no_record, registry=registry,
                      progress=not as_json)
    if as_json:
        echo_json(_lora_json(done, alpha_ratio=done.alpha_ratio, alphas_folded=done.alphas_folded))
        return
    click.echo(f"wrote {done.path} ({done.dialect}, {done.params:,} parameters, AutoV3 {done.autov3[:12]})")
    _echo_truncation(done)
    if done.record_error:
        click.echo(f"warning: not recorded in the registry: {done.record_error}", err=True)


# ---------------------------------------------------------------------------------------------
# lora-merge: several LoRAs as one (concatenated, or re-truncated to a rank)


@click.command("lora-merge")
@click.argument("adapters", nargs=-1, required=True, metavar="ADAPTER[:WEIGHT]...")
@click.option("-o", "--output", required=True, type=click.Path(), help="The merged LoRA to write.")
@click.option("--rank", type=int, help="Re-truncate the merged modules to this rank (default: concatenate).")
@click.option("--rank-mode", type=click.Choice(RANK_MODES), default="fixed", show_default=True,
              help="How each module's rank is chosen (with --rank-param).")
@click.option("--rank-param", type=float, help="As for lmerge resize.")
@click.option("--max-rank", type=int, help="Most ranks a mode gives a module.")
@click.option("--size", help="One budget for the whole file, e.g. 50MB.")
@click.option("--params", "param_budget", type=int, help="The budget as a parameter count.")
@click.option("--to", "dialect", type=click.Choice(["kohya", "peft"]), default="kohya", show_default=True,
              help="The output's key dialect.")
@click.option("--registry", type=click.Path(), help="The lineage registry (default $LINEAGE_HOME).")
@click.option("--no-record", is_flag=True, help="Do not record the merged LoRA in the lineage registry.")
@click.option("--json", "as_json", is_flag=True, help="Print the result (every module) as JSON.")
def lora_merge(adapters: tuple[str, ...], output: str, rank: int | None, rank_mode: str, rank_param: float | None,
               max_rank: int | None, size: str | None, param_budget: int | None, dialect: str, registry: str | None,
               no_record: bool, as_json: bool) -> None:
    """Merge LoRA / LoCon ADAPTERs (any dialect), each at its WEIGHT (default 1), into one LoRA: the exact
    sum (factors stacked, rank = the sum of ranks), or with --rank / --rank-mode / --size its best
    truncation (the QR of the stacked factors, then the small SVD)."""
    from lineage.adapters.apply import AdapterInput
    from lineage.adapters.lora_merge import lora_merge as run_merge

    done = run_merge([AdapterInput.parse(a) for a in adapters], output, rank=rank, rank_mode=rank_mode,
                     rank_param=rank_param, max_rank=max_rank, size=size, params=param_budget, dialect=dialect,
                     record=not no_record, registry=registry, progress=not as_json)
    if as_json:
        echo_json(_lora_json(done, exact=done.exact))
        return
    click.echo(f"wrote {done.path} ({done.dialect}, {done.params:,} parameters, AutoV3 {done.autov3[:12]})")
    if done.exact:
        ranks = sorted({m.rank for m in done.modules})
        click.echo(f"{len(done.modules)} modules concatenated exactly (ranks {ranks[0]}–{ranks[-1]}, alpha = rank)")
    else:
        _echo_truncation(done)
    if done.record_error:
        click.echo(f"warning: not recorded in the registry: {done.record_error}", err=True)


def _lora_json(done: LoraResult, **extra: Any) -> dict[str, Any]:
    """The `--json` answer of a resize or a lora-merge: the file, its totals and every module, with `extra`."""
    return {"path": done.path, "autov3": done.autov3, "dialect": done.dialect, **extra, "params": done.params,
            "total_retained": done.total_retained, "total_relative_error": done.total_error,
            "clamped": done.clamped, "node": done.node, "record_error": done.record_error,
            "modules": [vars(m) for m in done.modules]}


def _echo_truncation(done: LoraResult) -> None:
    """The table of a resize or a lora-merge to a rank: totals, the alpha rule, the worst modules."""
    kept = [m for m in done.modules if m.rank]
    click.echo(f"retained {done.total_retained:.4%} of ‖ΔW‖², total relative error {done.total_error:.4f}, "
               f"alpha/rank {done.alpha_ratio:g}")
    if done.alphas_folded:
        click.echo("alpha/rank differed between the input modules: each scale folded into its factors")
    click.echo(f"  {'retained':>9} {'error':>7} {'rank':>9}  module (largest errors first)")
    for m in sorted(kept, key=lambda m: -m.relative_error)[:WORST_SHOWN]:
        click.echo(f"  {m.retained:>9.4%} {m.relative_error:>7.4f} {m.rank_in:>4}→{m.rank:<4}  {_fit(m.name, 48)}")
    dropped = len(done.modules) - len(kept)
    if dropped:
        click.echo(f"{dropped} module(s) change nothing (up @ down is zero): left out", err=True)
    if done.clamped:
        click.echo(f"{done.clamped} module(s) hold fewer ranks than asked: kept at their own (a resize adds "
                   "no rank)", err=True)


def _fit(name: str, width: int) -> str:
    """`name` in at most `width` characters, its middle left out: module names differ at both ends."""
    if len(name) <= width:
        return name
    head = (width - 1) // 3
    return name[:head] + "…" + name[len(name) - (width - 1 - head):]


def register(group: click.Group) -> None:
    """Add the adapter commands to the `lmerge` group."""
    for command in (convert, extract, apply_command, resize, lora_merge):
        group.add_command(command)
