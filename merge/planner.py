"""The merge planner: decide, from the inputs' headers alone, what the merge does with every output key.

This is the part of a merge that knows SDXL: it checks that every input is an SDXL checkpoint,
chooses the prediction type (and so the marker tensors), keeps the tensors a merge must not
interpolate as they are, and applies the recipe's mismatch policy. Every output key gets one step:
- `merge`: the recipe's method over the key's tensor from every input (its parameters resolved for
  that key: block weights, overrides);
- `copy`: the first model's tensor, cast to the output dtype (a block preset leaves the key unmerged,
  or the inputs disagree about the key and the recipe says to take it from the first model);
- `pass`: copied byte for byte from one input: `position_ids`, `logit_scale`, non-float tensors and
  the prediction-type markers (loaders read them as flags or ids: never interpolated);
- `marker`: an empty marker tensor for a prediction type no input carries.
A recipe's adapters are placed on the output's keys by the planner of `lmerge apply`
(adapters/apply.py: plan_apply, which checks each adapter against the output's header): a `merge` or
`copy` step then carries its key's patches, which the job adds to the fp32 result before storing it.
An adapter that would change a tensor the merge passes through unchanged is refused.
The plan is what `lmerge merge --dry-run` shows; merge/jobs.py turns its steps into the executor's
jobs (lineage/engine/) to run it. Nothing here imports torch.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from lineage.engine.budget import CHUNK_ELEMENTS, executor_bytes
from lineage.errors import LineageError
from lineage.io.safetensors import SafetensorsFile, TensorInfo, dtype_size
from lineage.sdxl.blocks import BLOCK_NAMES, block_of
from lineage.sdxl.detection import require_sdxl
from lineage.sdxl.layout import MARKER_KEYS, MARKERS_FOR_PREDICTION, UNWRITABLE_PREDICTIONS, is_pass_through

from .recipe import Recipe

if TYPE_CHECKING:
    from lineage.adapters.apply import Patch
    from lineage.adapters.reader import AdapterFile

    from .methods import MergeMethod

def is_elementwise(method: MergeMethod) -> bool:
    """Whether the method may be run on pieces of a tensor: it declares itself elementwise (given its
    statistics, if it has any) and needs no per-tensor random stream."""
    return method.elementwise and not method.random


@dataclass(frozen=True)
class Step:
    """What the merge does for one output key."""

    key: str
    action: str  # merge | copy | pass | marker
    dtype: str  # output safetensors dtype
    shape: tuple[int, ...]
    source: int = 0  # input index a copy / pass-through comes from
    params: Mapping[str, Any] | None = None  # the method's parameters for this key (merge only)
    reason: str = ""  # why a key is copied rather than merged
    patches: tuple[Patch, ...] = ()  # the recipe's adapters on this key, added in order (merge / copy only)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * dtype_size(self.dtype)


@dataclass
class MergePlan:
    """The steps of a merge, decided from the inputs' headers alone (what `--dry-run` shows)."""

    recipe: Recipe
    steps: list[Step]
    input_prediction_types: list[str]
    prediction_type: str
    dropped: list[str] = field(default_factory=list)  # keys left out (mismatch policy "drop"/"first")
    workers: int = 2
    stored_itemsize: int = 2  # bytes per element of the widest merged input tensor (sizes the read buffers)
    adapter_files: list[AdapterFile] = field(default_factory=list)  # the recipe's adapters, opened

    @property
    def patched_keys(self) -> int:
        return sum(bool(s.patches) for s in self.steps)

    @property
    def output_bytes(self) -> int:
        return sum(s.nbytes for s in self.steps)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.steps:
            label = self.recipe.method if s.action == "merge" else s.action + (f" ({s.reason})" if s.reason else "")
            out[label] = out.get(label, 0) + 1
        if self.dropped:
            out["dropped"] = len(self.dropped)
        return out

    def memory_estimate(self) -> int:
        """Bytes of buffers the run holds at its peak (excluding the interpreter and torch themselves):
        the executor's slots and writer blocks, and each worker's working set for the method."""
        n = len(self.recipe.inputs)
        stored = self.stored_itemsize
        method = self.recipe.merge_method
        largest = sorted((s.numel for s in self.steps if s.action == "merge"), reverse=True)[: self.workers]
        if is_elementwise(method):
            # per source: its fp32 chunk row, the stored chunk it is converted from, ~one temporary; the result
            working = self.workers * CHUNK_ELEMENTS * (n * (4 + stored + 4) + 4)
            if method.statistics is not None:  # the statistics read each source's whole stored tensor first
                working += sum(numel * n * stored for numel in largest)
        else:  # whole fp32 tensors: each source in fp32 and chunk by chunk as stored, the result, ~2 temporaries
            working = sum(numel * (n * 4 + 3 * 4) for numel in largest) + self.workers * CHUNK_ELEMENTS * n * stored
        # a patched key: its whole fp32 result, the delta an adapter adds and that delta's factors (at most its size)
        patched = sorted((s.numel for s in self.steps if s.patches), reverse=True)[: self.workers]
        working += sum(numel * 3 * 4 for numel in patched)
        return executor_bytes(self.workers, (s.nbytes for s in self.steps)) + working

    def roles(self) -> list[str]:
        """What each input is to the method: the base and the models it merges, or A, B, C."""
        method = self.recipe.merge_method
        count = len(self.recipe.inputs)
        if method.needs_base:
            return ["base", *(f"model {i}" for i in range(1, count))]
        if method.max_models is not None and count <= 3:
            return ["A", "B", "C"][:count]
        return [f"model {i}" for i in range(1, count + 1)]

    def block_values(self) -> list[dict[str, Any]]:
        """Per block or component (lineage's finest scheme), its merged keys and the numbers the method
        gets there (alpha and any per-key parameter): one row each, in the checkpoint's order."""
        shown = [name for name, param in self.recipe.merge_method.params.items()
                 if name == "alpha" or name in self.recipe.per_key]
        rows: dict[str, dict[str, Any]] = {}
        for step in self.steps:
            if step.action != "merge" or step.params is None:
                continue
            block = block_of(step.key, "lineage") or "other"
            row = rows.setdefault(block, {"block": block, "keys": 0, **{name: set() for name in shown}})
            row["keys"] += 1
            for name in shown:
                row[name].add(step.params.get(name))
        order = {name: i for i, name in enumerate(BLOCK_NAMES["lineage"])}
        ordered = sorted(rows.values(), key=lambda r: order.get(r["block"], len(order)))
        return [{k: sorted(v) if isinstance(v, set) else v for k, v in row.items()} for row in ordered]

    def _block_table(self) -> list[str]:
        """The text table of `block_values` (80 columns): block, merged keys, each parameter's value."""
        rows = self.block_values()
        if not rows:
            return []
        names = [k for k in rows[0] if k not in ("block", "keys")]
        lines = ["  " + f"{'block':<8}{'keys':>6}" + "".join(f"  {n:>10}" for n in names)]
        for row in rows:
            lines.append("  " + f"{row['block']:<8}{row['keys']:>6}" +
                         "".join(f"  {_values_text(row[n]):>10}" for n in names))
        return lines

    def summary(self) -> dict[str, Any]:
        return {
            "method": self.recipe.method,
            "inputs": [i.path for i in self.recipe.inputs],
            "roles": self.roles(),
            "blocks": self.block_values(),
            "prediction_type": self.prediction_type,
            "keys": len(self.steps),
            "steps": self.counts(),
            "dropped": self.dropped,
            "adapters": [{"path": a.path, "strength": a.strength, "modules": len(f.modules),
                          "algorithm": f.algorithm, "dialect": f.dialect}
                         for a, f in zip(self.recipe.adapters, self.adapter_files)],
            "patched_keys": self.patched_keys,
            "output_dtype": self.recipe.dtype,
            "output_bytes": self.output_bytes,
            "memory_estimate_bytes": self.memory_estimate(),
        }

    def describe(self) -> str:
        lines = [f"merge {self.recipe.method} of {len(self.recipe.inputs)} models -> {len(self.steps)} tensors "
                 f"({self.output_bytes / 1e9:.2f} GB, merged tensors as {self.recipe.dtype})",
                 f"  prediction type: {self.prediction_type}"]
        for role, source in zip(self.roles(), self.recipe.inputs):
            lines.append(f"  {role + ':':<9}{source.path}")
        for label, n in self.counts().items():
            lines.append(f"  {n:>5}  {label}")
        if self.recipe.adapters:
            lines.append(f"  then {self.patched_keys} keys patched by {len(self.recipe.adapters)} adapter(s):")
        for adapter, file in zip(self.recipe.adapters, self.adapter_files):
            lines.append(f"    {adapter.path} at {adapter.strength:g}: {len(file.modules)} {file.algorithm} modules "
                         f"({file.dialect})")
        lines.extend(self._block_table())
        if self.dropped:
            shown = ", ".join(self.dropped[:3]) + (", …" if len(self.dropped) > 3 else "")
            lines.append(f"  dropped: {shown}")
        lines.append(f"  memory estimate: {self.memory_estimate() / 2**20:.0f} MiB of buffers "
                     f"({self.workers} workers) beyond the interpreter")
        return "\n".join(lines)


def _values_text(values: list[Any]) -> str:
    """One block's values of a parameter: the value, or the range when keys of the block differ."""
    numbers = [v for v in values if v is not None]
    if not numbers:
        return "-"
    if len(numbers) == 1:
        return f"{numbers[0]:g}" if isinstance(numbers[0], (int, float)) else str(numbers[0])
    return f"{min(numbers):g}..{max(numbers):g}"


def _listing(keys: Sequence[str], most: int = 5) -> str:
    shown = ", ".join(keys[:most])
    return shown + (f", … ({len(keys)} in all)" if len(keys) > most else "")


def _choose_prediction_type(recipe: Recipe, files: Sequence[SafetensorsFile], types: list[str]) -> str:
    chosen = recipe.prediction_type
    if chosen is None:
        if len(set(types)) > 1:
            found = "; ".join(f"{f.path}: {t}" for f, t in zip(files, types))
            raise LineageError(f"the inputs have different prediction types ({found}); say which to keep "
                               f"(recipe `prediction_type`, `lmerge merge --prediction-type`)")
        chosen = types[0]
    if chosen in UNWRITABLE_PREDICTIONS:
        raise LineageError(f"will not write prediction type {chosen!r}: {UNWRITABLE_PREDICTIONS[chosen]}; "
                           f"choose another with `--prediction-type` ({', '.join(MARKERS_FOR_PREDICTION)})")
    if chosen not in types and chosen not in MARKERS_FOR_PREDICTION:
        raise LineageError(f"prediction type {chosen!r} is neither an input's nor one of "
                           f"{', '.join(MARKERS_FOR_PREDICTION)}")
    return chosen


def plan_merge(recipe: Recipe, files: Sequence[SafetensorsFile], workers: int = 2) -> MergePlan:
    """Decide every output key's step from the open inputs' headers."""
    types = [require_sdxl(f.path).prediction_type or "epsilon" for f in files]
    prediction = _choose_prediction_type(recipe, files, types)
    out_dtype = recipe.storage_dtype

    keys: dict[str, None] = {}  # union of the inputs' keys, in the first model's order first
    for f in files:
        keys.update((k, None) for k in f.tensors if k not in MARKER_KEYS)
    mismatched: list[str] = []
    steps: list[Step] = []
    dropped: list[str] = []
    stored_itemsize = 2
    for key in keys:
        infos = [f.tensors.get(key) for f in files]
        first = infos[0]
        if any(i is None for i in infos) or len({i.shape for i in infos if i is not None}) > 1:
            mismatched.append(key)
            if recipe.mismatch == "first" and first is not None:
                steps.append(_copy_step(first, out_dtype, "taken from the first model: inputs disagree"))
            else:
                dropped.append(key)
            continue
        assert first is not None
        if is_pass_through(key) or not first.is_float:
            steps.append(Step(key, "pass", first.dtype, first.shape, reason="pass-through"))
            continue
        params = recipe.params_for(key)
        if params is None:
            steps.append(_copy_step(first, out_dtype, "not merged by the block preset"))
        else:
            steps.append(Step(key, "merge", out_dtype, first.shape, params=params))
            stored_itemsize = max(stored_itemsize, *(dtype_size(i.dtype) for i in infos if i is not None))
    if mismatched and recipe.mismatch == "error":
        details = []
        for f in files:
            missing = [k for k in mismatched if k not in f.tensors]
            if missing:
                details.append(f"{f.path} lacks {len(missing)}: {_listing(missing)}")
        shapes = [k for k in mismatched if all(k in f.tensors for f in files)]
        if shapes:
            details.append("shapes disagree for " + "; ".join(
                f"{k} ({' vs '.join(str(list(f.tensors[k].shape)) for f in files)})" for k in shapes[:5])
                + (f" … ({len(shapes)} in all)" if len(shapes) > 5 else ""))
        raise LineageError("the inputs do not have the same tensors: " + "; ".join(details)
                           + ". Use mismatch 'first' (take them from the first model) or 'drop'.")

    steps.extend(_marker_steps(files, types, prediction))
    steps, adapter_files = _place_adapters(recipe, files, steps)
    return MergePlan(recipe, steps, types, prediction, dropped, workers, stored_itemsize, adapter_files)


def _place_adapters(recipe: Recipe, files: Sequence[SafetensorsFile],
                    steps: list[Step]) -> tuple[list[Step], list[AdapterFile]]:
    """The steps with the recipe's adapters' patches on their keys, and the adapters opened. Each adapter
    is checked against the output's header (module names, shapes) as `lmerge apply` checks it."""
    if not recipe.adapters:
        return steps, []
    from lineage.adapters.apply import AdapterInput, plan_apply  # the adapter formats: only for a recipe with adapters

    output: dict[str, TensorInfo] = {}  # each kept key's header entry from the input it is read from
    for step in steps:
        holder = next((f for f in (files[step.source], *files) if step.key in f.tensors), None)
        if holder is not None:
            output[step.key] = holder.tensors[step.key]
    placed = plan_apply(recipe.inputs[0].path, output, [AdapterInput(a.path, a.strength) for a in recipe.adapters])
    patched = []
    for step in steps:
        patches = placed.patches.get(step.key)
        if patches and step.action not in ("merge", "copy"):
            adapter = recipe.adapters[patches[0].adapter].path
            raise LineageError(f"module {patches[0].module.name} would change {step.key}, which the merge passes "
                               f"through unchanged ({step.reason})", adapter)
        patched.append(replace(step, patches=tuple(patches)) if patches else step)
    return patched, placed.files


def _copy_step(info: TensorInfo, out_dtype: str, reason: str) -> Step:
    dtype = out_dtype if info.is_float else info.dtype
    return Step(info.name, "copy", dtype, info.shape, reason=reason)


def _marker_steps(files: Sequence[SafetensorsFile], types: list[str], prediction: str) -> list[Step]:
    """The chosen prediction type's markers: copied from the first input of that type, else written empty."""
    for idx, (f, t) in enumerate(zip(files, types)):
        if t == prediction:
            return [Step(k, "pass", f.tensors[k].dtype, f.tensors[k].shape, source=idx, reason="prediction marker")
                    for k in f.tensors if k in MARKER_KEYS]
    return [Step(k, "marker", "F32", (0,), reason="prediction marker") for k in MARKERS_FOR_PREDICTION[prediction]]
