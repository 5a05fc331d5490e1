"""What the executor runs: jobs, each reading some tensors of the inputs and producing planned output tensors.

A planner turns a task into a list of jobs: the merge planner (merge/planner.py) one job per output
key; an extraction would make one job per weight pair (a key of each checkpoint -> `lora_down`,
`lora_up`, `alpha`), an apply one job per patched key (a checkpoint key and the adapter's keys -> one
key), a format conversion one job per renamed or reshaped key. Each job declares

- its sources: the tensors it reads, as (input index, key) pairs, from any of the run's inputs;
- its outputs: the tensors it produces, each a key, a safetensors dtype and a shape, as many as it
  likes and of any shape (nothing ties them to the sources' shapes);
- its compute function, which the executor calls on a worker thread with a `JobContext`
  (lineage/engine/executor.py): a reader for each source and a tensor view of each output to fill.

The outputs of all jobs, in job order, are the output file's tensors in file order, so the header is
known before any work starts. Nothing here imports torch: a planner can describe its work (what
`--dry-run` shows) without it.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lineage.io.safetensors import dtype_size

if TYPE_CHECKING:
    from .executor import JobContext


@dataclass(frozen=True)
class Source:
    """A tensor a job reads: `key` of the run's input number `input`."""

    input: int
    key: str


@dataclass(frozen=True)
class Output:
    """A tensor a job produces, as it is stored in the output file."""

    key: str
    dtype: str  # safetensors dtype name, e.g. "F16"
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * dtype_size(self.dtype)


@dataclass(frozen=True)
class Job:
    """One unit of work: read `sources`, fill `outputs` (see the module docstring). `compute` must
    fill every output completely; it may keep no reference to the context after it returns."""

    sources: tuple[Source, ...]
    outputs: tuple[Output, ...]
    compute: Callable[[JobContext], None]

    @property
    def nbytes(self) -> int:
        return sum(o.nbytes for o in self.outputs)
