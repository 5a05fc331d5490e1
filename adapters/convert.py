"""`lineage.adapters.convert(...)`: an adapter file in another key dialect (kohya <-> PEFT), as a planner on
the one executor (lineage/engine/executor.py) — docs/adapters.md, "Converting between dialects".

    import lineage.adapters
    lineage.adapters.convert("lora.safetensors", "lora_peft.safetensors", to="peft")
    lineage.adapters.convert("lora_peft.safetensors", "back.safetensors", to="kohya")

Every tensor is copied byte for byte under its key in the target dialect, one job per tensor, in the
order the safetensors library writes (by dtype, then by name), so the same adapter always gives the
same file data and a file saved by that library (kohya's scripts, diffusers, PEFT) comes back from a
round trip with the very same data section. Alpha moves between a
tensor per module (kohya) and diffusers' adapter config in the header (PEFT) as the same number, and
our record remembers the alpha tensors' dtype: a round trip kohya -> PEFT -> kohya gives back every
tensor bit for bit. What the target cannot hold (LoKr, LoHa, full diffs, Tucker `lora_mid` or DoRA
scales in PEFT) is refused before anything is written. The output is written atomically, never onto
the input, and recorded as a `convert` node whose parent is the input.
"""
from __future__ import annotations

import json
import os
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lineage.engine.jobs import Job, Output, Source
from lineage.errors import LineageError
from lineage.graph.metadata import LINEAGE_RECORD_KEY
from lineage.io.atomic import file_destination
from lineage.io.safetensors import DTYPES

from .dialects import DIALECTS, PEFT_CONFIG_KEY
from .metadata import adapter_record
from .reader import AdapterFile, AdapterModule, open_adapter
from .writer import adapter_key, dialect_metadata, writable_dialect

if TYPE_CHECKING:
    from lineage.engine.executor import JobContext

# Header entries that describe the file itself (its hashes, its own record, its dialect's config):
# not carried over to the converted file, which gets its own.
SELF_DESCRIBING = ("sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256", PEFT_CONFIG_KEY,
                   LINEAGE_RECORD_KEY)
ALPHA_DTYPE_FIELD = "alpha_dtype"  # in our record: the dtype of the source's alpha tensors
# The safetensors library's dtype order: it writes tensors from the last of these to the first, each
# dtype's tensors by name.
SAFETENSORS_DTYPE_ORDER = ("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32",
                           "F64", "I64", "U64")


@dataclass(frozen=True)
class ConvertResult:
    path: str
    autov3: str
    source_dialect: str
    dialect: str
    modules: int
    node: str | None  # the registry node; None with record=False or when recording failed
    record_error: str | None = None


def _refusal(adapter: AdapterFile, to: str) -> str | None:
    """Why `adapter` cannot be written in dialect `to`, or None."""
    holds = set(DIALECTS[to].suffixes) | {"alpha"}
    for module in adapter.modules.values():
        missing = sorted(set(module.keys) - holds)
        if missing:
            return (f"cannot convert to {to}: module {module.name} is {module.algorithm} with "
                    f"{', '.join(missing)}, which {to} cannot hold ({to} holds "
                    f"{', '.join(sorted(DIALECTS[to].suffixes))}); keep it in kohya's format")
    return None


def _alpha_dtype(adapter: AdapterFile, module: AdapterModule) -> str:
    """The dtype to write a module's alpha tensor in: the source's own, else what our record says the
    alpha tensors had before an earlier conversion, else the factors' dtype (what kohya writes)."""
    if "alpha" in module.keys:
        return adapter.tensors[module.keys["alpha"]].dtype
    try:
        record = json.loads(adapter.metadata.get(LINEAGE_RECORD_KEY, "{}"))
    except ValueError:
        record = {}
    recorded = record.get(ALPHA_DTYPE_FIELD) if isinstance(record, dict) else None
    first = next(iter(module.keys.values()))
    return recorded if isinstance(recorded, str) and recorded in DTYPES else adapter.tensors[first].dtype


def _copy(ctx: JobContext) -> None:
    ctx.sources[0].copy_to(ctx.outputs[0])


def _alpha_job(output: Output, value: float) -> Job:
    def fill(ctx: JobContext) -> None:
        ctx.outputs[0].fill_(value)
    return Job((), (output,), fill)


def plan_conversion(adapter: AdapterFile, to: str) -> list[Job]:
    """One job per output tensor, in the safetensors library's order: copies under the target's keys,
    plus the alpha tensors a kohya file needs when the source kept alpha elsewhere (PEFT's header)."""
    writable_dialect(to)
    refusal = _refusal(adapter, to)
    if refusal:
        raise LineageError(refusal, adapter.path)
    jobs: dict[str, Job] = {}
    for module in adapter.modules.values():
        for role, key in module.keys.items():
            if role not in DIALECTS[to].suffixes:
                continue  # alpha in a dialect that keeps it in the header
            info = adapter.tensors[key]
            out = Output(adapter_key(to, module.name, role), info.dtype, tuple(info.shape))
            jobs[out.key] = Job((Source(0, key),), (out,), _copy)
        if "alpha" in DIALECTS[to].suffixes and "alpha" not in module.keys and module.algorithm == "lora":
            # no alpha in the source means a scale of 1: alpha = rank says so explicitly
            alpha = module.alpha if module.alpha is not None else float(module.rank or 1)
            out = Output(adapter_key(to, module.name, "alpha"), _alpha_dtype(adapter, module), ())
            jobs[out.key] = _alpha_job(out, alpha)
    return sorted(jobs.values(), key=_library_order)


def _library_order(job: Job) -> tuple[int, str]:
    out = job.outputs[0]
    return -SAFETENSORS_DTYPE_ORDER.index(out.dtype), out.key


def conversion_metadata(adapter: AdapterFile, to: str, source_autov3: str | None,
                        output_autov3: str | None) -> dict[str, str]:
    """The source's metadata without what described the source file itself, the target dialect's own
    entries, our record (a conversion of the source) and the output's hashes."""
    metadata = {k: v for k, v in adapter.metadata.items() if k not in SELF_DESCRIBING}
    lora = {n: m for n, m in adapter.modules.items() if m.algorithm == "lora"}
    ranks = {n: m.rank for n, m in lora.items() if m.rank is not None}  # (a LoRA module always has one)
    metadata.update(dialect_metadata(to, ranks, {n: m.alpha for n, m in lora.items()}))
    alpha_dtypes = {_alpha_dtype(adapter, m) for m in lora.values()}
    record = adapter_record("convert", [(os.path.basename(adapter.path), source_autov3)],
                            source_dialect=adapter.dialect, dialect=to,
                            **({ALPHA_DTYPE_FIELD: alpha_dtypes.pop()} if len(alpha_dtypes) == 1 else {}))
    metadata[LINEAGE_RECORD_KEY] = json.dumps(record, ensure_ascii=False)
    if output_autov3:
        metadata["sshs_model_hash"] = output_autov3
        if any(k.startswith("modelspec.") for k in metadata):
            metadata["modelspec.hash_sha256"] = "0x" + output_autov3
    return metadata


def convert(source: str | os.PathLike, output: str | os.PathLike, *, to: str, record: bool = True,
            registry: Any = None, workers: int = 2, progress: bool = True) -> ConvertResult:
    """Write the adapter `source` to `output` in the key dialect `to` (`kohya` or `peft`)."""
    from lineage.engine.executor import run_jobs
    from lineage.engine.inputs import InputFile

    source, output = os.fspath(source), os.fspath(output)
    writable_dialect(to)
    file_destination(output, [source])
    adapter = open_adapter(source)
    jobs = plan_conversion(adapter, to)
    with InputFile(source) as input_file:
        def metadata(input_autov3: list[str | None], output_autov3: str | None) -> dict[str, str]:
            return conversion_metadata(adapter, to, input_autov3[0], output_autov3)

        result = run_jobs([input_file], jobs, output, metadata=metadata, workers=workers, progress=progress,
                          description="convert")
    node, record_error = None, None
    if record:
        from lineage.graph.recording import record_written

        params = {"method": "convert", "source_dialect": adapter.dialect, "dialect": to, "source": Path(source).name}
        node, record_error = record_written(output, result.output_autov3, [source], result.input_autov3[:1],
                                            "convert", params, registry)
    return ConvertResult(output, result.output_autov3, adapter.dialect, to, len(adapter.modules), node, record_error)


class _CallableModule(types.ModuleType):
    """`lineage.adapters.convert(...)` calls `convert` while `lineage.adapters.convert` stays this module
    (a package attribute and a submodule cannot otherwise share the name), as lineage.merge does."""

    def __call__(self, *args: Any, **kwargs: Any) -> ConvertResult:
        return convert(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
