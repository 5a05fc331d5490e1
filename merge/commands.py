"""`lmerge merge`, `lmerge reproduce` and `lmerge methods`: thin click layers over merge/."""
from __future__ import annotations

import json
import re
import shlex
import shutil
import textwrap
from dataclasses import replace
from typing import Any

import click

from lineage.errors import LineageError
from lineage.io.atomic import destination, file_destination

from .recipe import DTYPES, MISMATCH_POLICIES, Adapter, Input, Recipe, load_recipe
from .weights import PRESETS


def _param_value(text: str) -> Any:
    """`--param k=v` values: JSON (numbers, true/false, [lists]), else a number as Python reads it
    (`nan` and `inf` too: the method's parameter types refuse them with the parameter named), else
    comma-separated numbers, else text."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    try:
        return [float(v) for v in text.split(",")] if "," in text else float(text)
    except ValueError:
        return text


def _parse_params(pairs: tuple[str, ...]) -> dict[str, Any]:
    params = {}
    for pair in pairs:
        if "=" not in pair:
            raise LineageError(f"--param {pair!r}: expected NAME=VALUE")
        name, value = pair.split("=", 1)
        params[name.strip()] = _param_value(value.strip())
    return params


def _adapters(loras: tuple[str, ...]) -> list[Adapter]:
    """`--lora PATH[:STRENGTH]` values, read as `lmerge apply` reads its adapters."""
    from lineage.adapters.apply import AdapterInput

    return [Adapter(a.path, strength=a.strength) for a in map(AdapterInput.parse, loras)]


def _recipe_from_options(inputs: tuple[str, ...], recipe_file: str | None, method: str | None, alpha: float | None,
                         blocks: str | None, preset: str | None, params: dict[str, Any], dtype: str | None,
                         seed: int | None, mismatch: str | None, prediction_type: str | None,
                         loras: tuple[str, ...] = ()) -> Recipe:
    """The recipe file's recipe with the command line's options on top, or one from the options alone."""
    from .api import build_recipe

    adapters = _adapters(loras)
    if recipe_file is None:
        if not inputs:
            raise LineageError("give the input models (or --recipe FILE)")
        return build_recipe(inputs, method=method or "weighted_sum", alpha=alpha, params=params, blocks=blocks,
                            preset=preset, seed=seed or 0, dtype=dtype or "fp16", mismatch=mismatch or "error",
                            prediction_type=prediction_type, adapters=adapters)
    recipe = load_recipe(recipe_file)
    from_options = build_recipe(inputs or [i.path for i in recipe.inputs], method=method or recipe.method,
                                alpha=alpha, params=params, blocks=blocks, preset=preset)
    changed_method = method is not None and method != recipe.method
    return replace(
        recipe,
        method=from_options.method,
        inputs=tuple(Input(p) for p in inputs) if inputs else recipe.inputs,
        params=from_options.params if changed_method else {**recipe.params, **from_options.params},
        per_key=from_options.per_key if changed_method else {**recipe.per_key, **from_options.per_key},
        seed=recipe.seed if seed is None else seed,
        dtype=dtype or recipe.dtype,
        mismatch=mismatch or recipe.mismatch,
        prediction_type=prediction_type or recipe.prediction_type,
        adapters=tuple(adapters) if adapters else recipe.adapters,
    )


def _base_warnings(recipe: Any, registry: str | None) -> list[str]:
    """For a method over a base: the inputs the registry knows do not descend from the first input
    (only files it recorded before and that have not changed since are looked up: nothing is hashed)."""
    import networkx as nx

    from lineage.graph.registry import Registry

    if not recipe.merge_method.needs_base:
        return []
    try:
        with Registry(registry) as reg:
            nodes = [known[0] if (known := reg.known_file(i.path)) else None for i in recipe.inputs]
            graph = reg.graph() if nodes[0] and any(nodes[1:]) else None
    except (LineageError, OSError):
        return []  # the plan stands without the registry; a damaged one is reported by the commands that use it
    if graph is None:
        return []
    warnings = []
    for source, node in zip(recipe.inputs[1:], nodes[1:]):
        if node is None or node == nodes[0] or nodes[0] in nx.ancestors(graph, node):
            continue
        if node in nx.ancestors(graph, nodes[0]) or graph.in_degree(node):
            warnings.append(f"the registry says {source.path} does not descend from {recipe.inputs[0].path}, "
                            f"the first input, which {recipe.method} takes as the base of the others")
    return warnings


@click.command("merge")
@click.argument("inputs", nargs=-1, type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(), help="The merged .safetensors file.")
@click.option("--method", help="A merge method (see `lmerge methods`); default weighted_sum.")
@click.option("--alpha", type=float, help="weighted_sum of two models: the weight of B, (1-α)A + αB, as in A1111. "
                                          "Methods over a base: the multiplier of the merged delta.")
@click.option("--blocks", help='Per-block alpha: the preset\'s values in order ("BASE,IN00,…,OUT08" for '
                               'supermerger) or NAME=VALUE pairs ("IN04=0.3,M00=1").')
@click.option("--preset", type=click.Choice(PRESETS), help="Which blocks --blocks names (default supermerger). "
                                                           "comfyui values are ComfyUI ratios: the weight of model 1.")
@click.option("--param", "params", multiple=True, metavar="NAME=VALUE",
              help="A method parameter, e.g. density=0.2 or weights=0.5,0.5 (repeatable).")
@click.option("--lora", "loras", multiple=True, metavar="PATH[:STRENGTH]",
              help="An adapter (LoRA, LoCon, LoKr, LoHa, diff; kohya, LyCORIS or PEFT keys) added to the merged "
                   "result at STRENGTH (default 1), as `lmerge apply` would add it, in the same pass; repeatable. "
                   "Given with --recipe, these replace the recipe's [[adapters]].")
@click.option("--dtype", type=click.Choice(list(DTYPES)), help="Dtype of merged tensors (default fp16).")
@click.option("--seed", type=int, help="Seed of random methods (each tensor's seed derives from it and its key).")
@click.option("--recipe", "recipe_file", type=click.Path(), help="A TOML recipe; options given here override it.")
@click.option("--registry", type=click.Path(),
              help="The lineage registry (default $LINEAGE_HOME or the user data dir).")
@click.option("--no-record", is_flag=True, help="Do not register the output in the lineage registry.")
@click.option("--dry-run", is_flag=True, help="Show the plan (keys per method, memory, output size); write nothing.")
@click.option("--mismatch", type=click.Choice(MISMATCH_POLICIES),
              help="Keys missing from some inputs or with different shapes: error (default), take them from "
                   "the first model, or drop them.")
@click.option("--prediction-type", help="When the inputs' prediction types differ: the one to keep (its markers "
                                        "are written), e.g. v+ztsnr or epsilon.")
@click.option("--fail-on-nonfinite", is_flag=True, help="Stop when an input tensor holds NaN/Inf (default: warn).")
@click.option("--save-recipe", type=click.Path(), help="Also write the recipe (with the inputs' AutoV3) as TOML.")
@click.option("--workers", type=click.IntRange(1, 64), help="Compute threads (default: cores, at most 4).")
@click.option("--device", help="Compute on this device: cpu (default), cuda or cuda:N; the files stream "
                                 "through the host either way.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan or the result as JSON.")
def merge_command(inputs: tuple[str, ...], output: str, method: str | None, alpha: float | None, blocks: str | None,
                  preset: str | None, params: tuple[str, ...], dtype: str | None, seed: int | None,
                  recipe_file: str | None, registry: str | None, no_record: bool, dry_run: bool, mismatch: str | None,
                  prediction_type: str | None, fail_on_nonfinite: bool, save_recipe: str | None, workers: int | None,
                  device: str | None, as_json: bool, loras: tuple[str, ...]) -> None:
    """Merge checkpoints A B [C ...] into OUTPUT, tensor by tensor (bounded memory), and add any
    --lora adapters to the result in the same pass."""
    from .api import DEFAULT_WORKERS, merge, plan

    recipe = _recipe_from_options(inputs, recipe_file, method, alpha, blocks, preset, _parse_params(params), dtype,
                                  seed, mismatch, prediction_type, loras)
    workers = workers or DEFAULT_WORKERS
    if dry_run:
        merge_plan = plan(recipe, workers)
        click.echo(json.dumps(merge_plan.summary(), indent=2) if as_json else merge_plan.describe())
        for warning in _base_warnings(recipe, registry):
            click.echo(f"warning: {warning}", err=True)
        return
    # Neither -o nor --save-recipe may land on a file this command reads, nor on each other: checked before merging.
    read = [*(f.path for f in recipe.files), recipe_file]
    file_destination(output, read)
    if save_recipe:
        destination(save_recipe, [*read, output])
    result = merge(recipe, output, record=not no_record, registry=registry, workers=workers,
                   fail_on_nonfinite=fail_on_nonfinite, device=device)
    for path, key in result.nonfinite:
        click.echo(f"warning: {path}: tensor {key!r} holds NaN or Inf (merged as is)", err=True)
    if save_recipe:
        result.recipe.save(save_recipe, inputs=[*read, output])
    if as_json:
        click.echo(json.dumps({"path": result.path, "autov3": result.autov3, "node": result.node,
                               "record_error": result.record_error,
                               "nonfinite": [list(x) for x in result.nonfinite], "plan": result.plan.summary(),
                               "recipe": result.recipe.to_dict()}, indent=2))
    else:
        adapters = len(recipe.adapters)
        patched = f", {result.plan.patched_keys} patched by {adapters} adapter(s)" if adapters else ""
        click.echo(f"wrote {output} (AutoV3 {result.autov3[:12]}, {result.plan.counts().get(recipe.method, 0)} "
                   f"tensors merged by {recipe.method}{patched}, {len(result.plan.steps)} in all)")
        if result.node:
            click.echo(f"recorded as node {result.node}")
    if result.record_error:  # the output is complete and stays: recording it can be done again
        later = f"lmerge scan {shlex.quote(output)}" + (f" --registry {shlex.quote(registry)}" if registry else "")
        click.echo(f"warning: {output} was written but not recorded in the registry ({result.record_error}); "
                   f"record it later with `{later}`", err=True)


@click.command("reproduce")
@click.argument("path", type=click.Path())
@click.option("--input", "inputs", multiple=True, type=click.Path(),
              help="An input file, in the recorded order, then each recorded adapter (repeat for each); default: "
                   "found by AutoV3 in the registry.")
@click.option("-o", "--output", type=click.Path(), help="Keep the re-run here (default: a temporary file, removed).")
@click.option("--registry", type=click.Path(), help="The lineage registry to find inputs in.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (a mismatch still exits 1).")
def reproduce_command(path: str, inputs: tuple[str, ...], output: str | None, registry: str | None,
                      as_json: bool) -> None:
    """Re-run the recipe recorded in PATH and check the result has the same AutoV3."""
    from .reproduce import reproduce

    found = reproduce(path, inputs=inputs, registry=registry, output=output)
    if as_json:
        click.echo(json.dumps({"path": path, "inputs": found.inputs, "expected_autov3": found.expected_autov3,
                               "autov3": found.autov3, "matches": found.matches, "output": found.output}, indent=2))
        if not found.matches:
            raise SystemExit(1)
        return
    for used in found.inputs:
        click.echo(f"input {used}")
    if not found.matches:
        raise LineageError(f"not reproduced: the re-run has AutoV3 {found.autov3[:12]}, the file "
                           f"{found.expected_autov3[:12]}", path)
    kept = f" (re-run kept at {output})" if output else ""
    click.echo(f"reproduced {path}: AutoV3 {found.autov3[:12]} matches{kept}")


@click.command("methods")
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
def methods_command(name: str | None, as_json: bool) -> None:
    """List the merge methods, their parameters and conventions (NAME: one method in full)."""
    from .methods import METHODS, NONFINITE_RULE, get_method

    chosen = [get_method(name)] if name else sorted(METHODS.values(), key=lambda m: m.name)
    rows = [{"name": m.name, "needs_base": m.needs_base, "min_models": m.min_models, "max_models": m.max_models,
             "random": m.random, "elementwise": m.elementwise, "params": m.defaults,
             "param_types": {p.name: p.type.describe() for p in m.params.values()}, "peers": m.peers,
             "doc": m.doc} for m in chosen]
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=repr))
        return
    for method, row in zip(chosen, rows):
        flags = ", ".join(f for f, on in (("base first", row["needs_base"]), ("random", row["random"]),
                                           ("elementwise", row["elementwise"])) if on)
        params = ", ".join(f"{k}={v!r}" for k, v in row["params"].items())
        click.echo(_fitted(f"{row['name']}" + (f"  [{flags}]" if flags else "") + (f"  ({params})" if params else "")))
        if name:  # the whole docstring, its lines fitted to the terminal
            click.echo(_fitted(row["doc"], "    "))
        else:  # its first sentence
            first = " ".join(row["doc"].split("\n\n")[0].split())
            click.echo(_indented(first.split(". ")[0].rstrip(".") + "."))
        click.echo(f"    takes {method.models_described()}")
        for param, kind in row["param_types"].items():
            click.echo(f"    {param}: {kind}")
        if row["peers"]:
            click.echo(_indented(f"vs peers: {row['peers']}"))
    click.echo("\n" + _fitted(NONFINITE_RULE))


def _width() -> int:
    """The terminal's width (COLUMNS when set), at most 100 columns."""
    return min(100, shutil.get_terminal_size((100, 24)).columns)


def _indented(text: str) -> str:
    return textwrap.fill(text, width=_width(), initial_indent="    ", subsequent_indent="      ",
                         break_on_hyphens=False)


def _fitted(text: str, indent: str = "") -> str:
    """`text` re-wrapped to the terminal, each paragraph and list item on its own, with `indent` before it."""
    items: list[tuple[str, str]] = []  # (leading spaces + list marker of the item's first line, its words)
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped:
            items.append(("", ""))
        elif items and items[-1][1] and not re.match(r"(- |\d+\. )", stripped):
            items[-1] = (items[-1][0], items[-1][1] + " " + stripped)
        else:
            items.append((line[: len(line) - len(line.lstrip())], stripped))
    out = []
    for lead, words in items:
        marker = re.match(r"(- |\d+\. )", words)
        hanging = indent + lead + " " * (len(marker.group(1)) if marker else 2)
        out.append(textwrap.fill(words, width=_width(), initial_indent=indent + lead, subsequent_indent=hanging,
                                 break_on_hyphens=False) if words else "")
    return "\n".join(out)


def register(group: click.Group) -> None:
    """Add the merge commands to the `lmerge` group."""
    for command in (merge_command, reproduce_command, methods_command):
        group.add_command(command)

