"""A merge plan's steps as executor jobs (lineage/engine/jobs.py): how each output key is computed.

One job per step, producing that step's key:
- `merge` reads the key from every input. An elementwise method (merge/planner.py: is_elementwise)
  runs chunk by chunk through the worker's reused fp32 buffers, so its working set stays in cache; a
  method with per-tensor statistics (TIES' thresholds) first gets them from every input's whole
  tensor as stored, `method.statistics([flat input 0, flat input 1, ...], params)`, then runs on
  chunks the same way or, on the CPU, when the method has a `stored_loop` (TIES) that takes the
  dtypes, in that one compiled pass from the stored tensors into the output. Other methods get whole
  fp32 tensors. Merged inputs are checked for NaN/Inf, one reduction per chunk over all of them (the
  stored loop checks as it reads);
- `copy` and `pass` read the key from one input: byte for byte when the dtype stays, else converted
  chunk by chunk;
- `marker` reads nothing: its output is empty.
A step with patches (the recipe's adapters on its key) also reads each patch's factors from the
adapter files, the run's inputs after the models: the merged (or copied) tensor is kept whole in
fp32, the patches are added to it by adapters/apply.py's `add_patches_` (what `lmerge apply` does),
and it is rounded to the output dtype once.
Merged tensors are computed on the run's device (`ctx.to_device`: the fp32 pieces, or whole fp32
tensors, go there and the result comes back into the output); statistics (TIES' thresholds) are
computed on the host from the stored tensors, and copies never leave the host.
"""
from __future__ import annotations

import threading
from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import torch

from lineage.adapters.apply import add_patches_, patch_key, patch_sources
from lineage.engine.executor import JobContext, SourceReader
from lineage.engine.finite import all_finite
from lineage.engine.jobs import Job, Output, Source
from lineage.engine.seeding import key_seed
from lineage.errors import LineageError

from .planner import MergePlan, Step, is_elementwise

if TYPE_CHECKING:
    from .methods import StoredLoop


class MergeJobs:
    """The jobs of one merge plan, and what running them found: `nonfinite` lists (input path, key)
    of merged input tensors holding NaN or Inf (or, with `fail_on_nonfinite`, the first one fails).
    `input_paths` are the run's inputs: the recipe's models, then its adapters."""

    def __init__(self, plan: MergePlan, input_paths: Sequence[str], fail_on_nonfinite: bool = False):
        self.plan = plan
        self.input_paths = list(input_paths)
        self.models = len(plan.recipe.inputs)  # the run's inputs before the adapters
        self.method = plan.recipe.merge_method
        self.elementwise = is_elementwise(self.method)
        self.fail_on_nonfinite = fail_on_nonfinite
        self.nonfinite: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    @property
    def adapter_paths(self) -> list[str]:
        return self.input_paths[self.models:]

    def jobs(self) -> list[Job]:
        return [self._job(step) for step in self.plan.steps]

    def _job(self, step: Step) -> Job:
        output = (Output(step.key, step.dtype, step.shape),)
        adapters = tuple(patch_sources(step.patches, first_input=self.models))
        if step.action == "merge":
            sources = tuple(Source(i, step.key) for i in range(self.models))
            return Job(sources + adapters, output, partial(self._merge, step))
        if step.patches:
            return Job((Source(step.source, step.key), *adapters), output,
                       partial(patch_key, step.patches, self.adapter_paths))
        if step.action in ("copy", "pass"):
            return Job((Source(step.source, step.key),), output, self._copy)
        return Job((), output, _nothing)  # marker: an empty tensor

    def _note_nonfinite(self, index: int, key: str) -> None:
        path = self.input_paths[index]
        if self.fail_on_nonfinite:
            raise LineageError(f"tensor {key!r} holds NaN or Inf", path)
        with self._lock:
            if (path, key) not in self.nonfinite:
                self.nonfinite.append((path, key))

    def _merge(self, step: Step, ctx: JobContext) -> None:
        params: dict[str, Any] = dict(step.params or {})
        if self.method.random:
            params["seed"] = key_seed(self.plan.recipe.seed, step.key)
        models = ctx.sources[:self.models]
        out = ctx.outputs[0].view(-1)
        # with patches, the merge lands whole in fp32 on the device, to be patched and then rounded once
        result = torch.empty(step.numel, dtype=torch.float32, device=ctx.device) if step.patches else out
        if not self.elementwise:
            inputs = [ctx.to_device(reader.fp32()) for reader in models]
            for index, x in enumerate(inputs):
                if not all_finite(x):
                    self._note_nonfinite(index, step.key)
            result.copy_(self.method.fn(*inputs, **params).reshape(-1))
        else:
            if self.method.statistics is not None:
                params["statistics"] = self.method.statistics([reader.stored() for reader in models], params)
            stored_loop = self._stored_loop(models, result)
            if stored_loop is not None:
                nonfinite = stored_loop(result, [reader.stored() for reader in models], params)
            else:
                nonfinite = []
                for start, host_block in ctx.fp32_chunks(models):
                    block = ctx.to_device(host_block)
                    if not all_finite(block):
                        nonfinite += [index for index, row in enumerate(block) if not all_finite(row)]
                    result[start:start + block.shape[1]].copy_(self.method.fn(*block, **params))
            for index in sorted(set(nonfinite)):
                self._note_nonfinite(index, step.key)
        if step.patches:
            factors = ((r.info.name, r.fp32()) for r in ctx.sources[self.models:])
            add_patches_(result.view(step.shape), step.patches, factors, self.adapter_paths)
            out.copy_(result)

    def _stored_loop(self, models: Sequence[SourceReader], result: torch.Tensor) -> StoredLoop | None:
        """The method's compiled loop over the stored inputs, where it has one that takes these dtypes."""
        if self.method.stored_loop is None or not result.is_cpu:
            return None
        from . import cpu_loops  # imports numba: only when a method with a stored loop runs

        dtypes = (result.dtype, *(reader.dtype for reader in models))
        return self.method.stored_loop if all(d in cpu_loops.STORED_DTYPES for d in dtypes) else None

    @staticmethod
    def _copy(ctx: JobContext) -> None:
        source, out = ctx.sources[0], ctx.outputs[0]
        if source.dtype == out.dtype:
            source.copy_to(out)
            return
        flat = out.view(-1)
        for start, block in ctx.fp32_chunks():
            flat[start:start + block.shape[1]].copy_(block[0])


def _nothing(ctx: JobContext) -> None:
    """A job whose outputs are empty (prediction markers)."""
