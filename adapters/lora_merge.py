"""`lineage.adapters.lora_merge(inputs, output, ...)`: several LoRAs / LoCons merged into one, as a planner on
the one executor (lineage/engine/executor.py) — docs/adapters.md, "Merging LoRAs".

    import lineage.adapters
    lineage.adapters.lora_merge(["style.safetensors", ("detail.safetensors", 0.5)], "both.safetensors")

Input i at weight wᵢ changes a module by wᵢ·sᵢ·upᵢ @ downᵢ (sᵢ = its alpha / rank). Their sum is one
LoRA exactly: up = [w₁s₁·up₁ | w₂s₂·up₂ | …] and down = [down₁; down₂; …] stacked, of rank Σrᵢ, with
alpha = rank (each input's weight and scale are folded into its columns of up). That is the default:
one streaming run, one job per module reading that module's factors from every input that has it.
With a rank (or a rank rule, or a size budget) the stacked factors are re-truncated as `lmerge resize`
does (adapters/resize.py: the QR of the stacked factors and the SVD of the small core, never the
full ΔW), reporting the share of each module's ‖ΔW‖² kept. A module present in only some inputs is
merged from those. Inputs may be in any dialect the reader takes; the output is kohya's unless asked
(PEFT). A LoKr, LoHa, full diff or DoRA module is refused, naming its file: it is not a product of two
factors. The output is recorded as a `merge` of the inputs, each edge weighted by its weight.
"""
from __future__ import annotations

import os
import sys
import threading
import types
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lineage.engine.jobs import Job, Source
from lineage.errors import CheckpointError, LineageError
from lineage.io.atomic import file_destination

from .apply import AdapterSpec, adapter_inputs
from .decompose import Factors
from .metadata import adapter_record
from .reader import AdapterFile, AdapterModule, open_adapter
from .resize import (
    LoraLayout,
    LoraResult,
    ModuleResize,
    RankChoice,
    budget_dtype,
    factor_roles,
    fill_lora,
    lora_metadata,
    lora_outputs,
    product_factors,
    require_lora,
    scaled_factors,
    write_jobs,
)
from .writer import writable_dialect

if TYPE_CHECKING:
    import torch

    from lineage.engine.executor import JobContext


@dataclass(kw_only=True)
class LoraMergeResult(LoraResult):
    """A lora-merge's result: each module's rank_in is the sum of the inputs' ranks, and alpha = rank (the
    weights and scales are folded into the factors)."""

    input_autov3: list[str]
    exact: bool  # concatenated (no truncation)


@dataclass(frozen=True)
class Part:
    """One input's share of a module: the input's index, its module and weight."""

    input: int
    module: AdapterModule
    weight: float


class Stacking:
    """The jobs of a merge: per module, read every part's factors and stack them (weights and scales
    folded into up). `write` makes jobs that write the stack as it is; `analyse` jobs keep each stack's
    SVD (through product_factors) for a truncation."""

    def __init__(self, files: Sequence[AdapterFile], weights: Sequence[float]):
        self.files = files
        self.parts: dict[str, list[Part]] = {}
        for index, (file, weight) in enumerate(zip(files, weights)):
            for name, module in file.modules.items():
                self.parts.setdefault(name, []).append(Part(index, module, weight))
        self.layouts = {name: self._layout(name, parts) for name, parts in self.parts.items()}
        self.factors: dict[str, Factors] = {}
        self.norm2: dict[str, float] = {}
        self._lock = threading.Lock()

    def _layout(self, name: str, parts: list[Part]) -> LoraLayout:
        layouts = [LoraLayout.of(p.module, self.files[p.input].tensors) for p in parts]
        first = layouts[0]
        for part, layout in zip(parts[1:], layouts[1:]):
            if (layout.out, layout.down_tail) != (first.out, first.down_tail):
                raise CheckpointError(f"module {name} changes a {layout.out}x{'x'.join(map(str, layout.down_tail))} "
                                      f"weight, {Path(self.files[parts[0].input].path).name} a "
                                      f"{first.out}x{'x'.join(map(str, first.down_tail))} one",
                                      self.files[part.input].path)
        dtypes = {layout.dtype for layout in layouts}
        return LoraLayout(first.out, first.down_tail, first.up_tail, dtypes.pop() if len(dtypes) == 1 else "F32")

    def rank_in(self, name: str) -> int:
        return sum(p.module.rank or 0 for p in self.parts[name])

    def _sources(self, name: str) -> tuple[Source, ...]:
        return tuple(Source(p.input, p.module.keys[r]) for p in self.parts[name] for r in factor_roles(p.module))

    def stack(self, ctx: JobContext, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(up, down) of the module's summed change, 2-D fp32, of rank Σrᵢ."""
        import torch

        ups, downs, readers = [], [], iter(ctx.sources)
        for part in self.parts[name]:
            roles = factor_roles(part.module)
            up, down = scaled_factors([next(readers) for _ in roles], roles, part.module, part.weight,
                                      self.files[part.input].path)
            ups.append(up)
            downs.append(down)
        return torch.cat(ups, dim=1), torch.cat(downs, dim=0)

    def analyse_jobs(self) -> list[Job]:
        def analyse(name: str) -> Any:
            def run(ctx: JobContext) -> None:
                factors = product_factors(*self.stack(ctx, name))
                with self._lock:
                    self.factors[name] = factors
            return run
        return [Job(self._sources(name), (), analyse(name)) for name in self.parts]

    def write_jobs(self, dialect: str) -> list[Job]:
        """One job per module writing its stacked factors as they are (alpha = rank)."""
        jobs = []
        for name in self.parts:
            layout = self.layouts[name]
            outputs = lora_outputs(dialect, name, layout, self.rank_in(name), layout.dtype)
            jobs.append(Job(self._sources(name), tuple(outputs.values()), self._write(name, list(outputs))))
        return jobs

    def _write(self, name: str, roles: list[str]) -> Any:
        def run(ctx: JobContext) -> None:
            up, down = self.stack(ctx, name)
            # ‖up @ down‖² = Σ (upᵀup) ⊙ (down·downᵀ): the change's size without the product
            norm2 = float(((up.T.double() @ up.double()) * (down.double() @ down.T.double())).sum())
            fill_lora(dict(zip(roles, ctx.outputs)), up, down, 1.0)
            with self._lock:
                self.norm2[name] = norm2
        return run


def lora_merge(inputs: Sequence[AdapterSpec], output: str | os.PathLike, *, rank: int | None = None,
               rank_mode: str = "fixed", rank_param: float | None = None, max_rank: int | None = None,
               size: int | str | None = None, params: int | None = None, dialect: str = "kohya",
               record: bool = True, registry: Any = None, workers: int = 2, progress: bool = True) -> LoraMergeResult:
    """Merge the LoRAs `inputs` (paths, (path, weight) pairs or AdapterInputs) into one written to
    `output`: their exact concatenation, or with a rank, rule or budget (as `resize`) its re-truncation.
    See the module docstring."""
    from lineage.engine.executor import run_jobs
    from lineage.engine.inputs import InputFile
    from lineage.graph.recording import record_written
    from lineage.graph.registry import known_autov3

    given = adapter_inputs(inputs)
    if len(given) < 2:
        raise LineageError("give at least two LoRAs to merge")
    output = os.fspath(output)
    writable_dialect(dialect)
    paths = [a.path for a in given]
    file_destination(output, paths)
    files = [open_adapter(p) for p in paths]
    for file in files:
        require_lora(file, "merged")
    stacking = Stacking(files, [a.strength for a in given])
    exact = rank is None and rank_param is None and size is None and params is None
    with ExitStack() as stack:
        opened = [stack.enter_context(InputFile(p)) for p in paths]
        known = known_autov3(paths, registry)
        if exact:
            modules, jobs, input_autov3 = _concatenate(stacking), None, None
        else:
            choice = RankChoice.of(rank=rank, rank_mode=rank_mode, rank_param=rank_param, max_rank=max_rank,
                                   size=size, params=params, dtype=budget_dtype(stacking.layouts.values()),
                                   largest=max(stacking.rank_in(n) for n in stacking.parts))
            found = run_jobs(opened, stacking.analyse_jobs(), None, known_autov3=known, workers=workers,
                             progress=progress, description="analyse")
            modules, jobs = _truncate(stacking, choice, dialect)
            input_autov3, opened, known = list(found.input_autov3), [], []
        summary = {"mode": "concatenate"} if exact else {"mode": "truncate", **choice.summary()}
        clamped = 0 if exact else sum(1 for m in modules if choice.asked() and m.rank < choice.asked())
        result = LoraMergeResult(path=output, autov3="", dialect=dialect, modules=modules, input_autov3=[],
                                 exact=exact, clamped=clamped)
        names = [Path(p).name for p in paths]
        conv = any(len(layout.down_tail) > 1 for layout in stacking.layouts.values())

        def metadata(hashes: list[str | None], output_autov3: str | None) -> dict[str, str]:
            known_hashes = input_autov3 or hashes
            fields = adapter_record("merge", list(zip(names, known_hashes)), method="lora-merge",
                                    weights=[a.strength for a in given], **summary,
                                    modules={m.name: {"rank": m.rank, **({} if exact else {
                                        "retained": round(m.retained, 6), "error": round(m.relative_error, 5)})}
                                             for m in result.modules if m.rank})
            return lora_metadata({m.name: (m.rank, float(m.rank)) for m in result.modules if m.rank}, dialect, (),
                                 conv, Path(output).stem, output_autov3, fields)

        written = run_jobs(opened, jobs if jobs is not None else stacking.write_jobs(dialect), output,
                           metadata=metadata, known_autov3=known, workers=workers, progress=progress and exact,
                           description="merge")
    result.input_autov3 = input_autov3 or list(written.input_autov3)
    result.autov3 = written.output_autov3
    if exact:
        result.modules = [ModuleResize(m.name, m.rank_in, m.rank, m.params, 1.0, 0.0, stacking.norm2[m.name])
                          for m in result.modules]
    if record:
        result.node, result.record_error = record_written(
            output, result.autov3, paths, result.input_autov3, "merge", {"method": "lora-merge", **summary},
            registry, weights=[a.strength for a in given])
    return result


def _concatenate(stacking: Stacking) -> list[ModuleResize]:
    """The modules of an exact merge (their sizes filled in once written)."""
    return [ModuleResize(name, stacking.rank_in(name), stacking.rank_in(name),
                         stacking.rank_in(name) * stacking.layouts[name].cost, 1.0, 0.0, 0.0)
            for name in stacking.parts]


def _truncate(stacking: Stacking, choice: RankChoice, dialect: str) -> tuple[list[ModuleResize], list[Job]]:
    factors = stacking.factors
    modules = choice.truncate(factors, stacking.layouts, {n: stacking.rank_in(n) for n in stacking.parts})
    jobs = [job for m in modules if m.rank
            for job in write_jobs(dialect, m.name, stacking.layouts[m.name], *factors[m.name].split(m.rank), 1.0,
                                  stacking.layouts[m.name].dtype)]
    if not jobs:
        raise LineageError("the merged LoRAs change nothing (every module's sum is zero): there is nothing to write")
    return modules, jobs


class _CallableModule(types.ModuleType):
    """`lineage.adapters.lora_merge(...)` calls `lora_merge` while the name stays this module."""

    def __call__(self, *args: Any, **kwargs: Any) -> LoraMergeResult:
        return lora_merge(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
