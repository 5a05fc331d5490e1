"""Streaming safetensors reading and writing.

Format: 8-byte little-endian header length N, N bytes of JSON header, then the data section.
The header maps tensor names to {dtype, shape, data_offsets=[begin, end]} (relative to the data
section) and may hold "__metadata__" (str -> str).

Reading never maps or loads a whole file: each tensor is read with `pread` into its own buffer,
so memory is bounded by the tensors a caller holds. Writing plans the header from the tensors'
dtypes and shapes first, then streams the tensors in that order into a temporary file (in large
direct-I/O blocks, see `direct_write`) that is fsynced and put in place only when every tensor is
written; a failure or a kill leaves no trace of it (see `temporary`).
"""
from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from lineage.errors import CheckpointError, LineageError, brief
from lineage.io import strict_json
from lineage.io.atomic import file_destination, new_file_mode
from lineage.io.direct_write import BlockWriter, write_all
from lineage.io.inputs import open_input
from lineage.io.temporary import GuardedName, create_hidden, link_anonymous, open_anonymous
from lineage.lazy import LazyDict, torch

# safetensors dtype name -> bytes per element: headers are checked with this alone, without torch.
DTYPE_SIZES: dict[str, int] = {"BOOL": 1, "U8": 1, "I8": 1, "U16": 2, "I16": 2, "U32": 4, "I32": 4, "U64": 8, "I64": 8,
                               "F16": 2, "BF16": 2, "F32": 4, "F64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
# safetensors dtype name -> torch dtype, built on first use (so torch is imported only then).
DTYPES: Mapping[str, torch.dtype] = LazyDict(lambda: {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "U16": torch.uint16,
    "I16": torch.int16,
    "U32": torch.uint32,
    "I32": torch.int32,
    "U64": torch.uint64,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
})
DTYPE_NAMES: Mapping[torch.dtype, str] = LazyDict(lambda: {v: k for k, v in DTYPES.items()})
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"})

# A header larger than this is not a checkpoint header (the safetensors library uses 100 MB too).
MAX_HEADER_BYTES = 100_000_000
# Sizes and offsets are 64-bit in the format (the library reads them as u64).
MAX_COUNT = strict_json.MAX_INTEGER


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a file and what it is."""

    name: str
    dtype: str  # safetensors dtype name, e.g. "F16"
    shape: tuple[int, ...]
    begin: int  # absolute file offset of the first byte
    end: int  # absolute file offset past the last byte

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES


def dtype_size(dtype: str) -> int:
    return DTYPE_SIZES[dtype]


def _tensor_info(path: str, name: str, entry: object, data_start: int, data_len: int) -> TensorInfo:
    """One header entry, checked as strictly as the safetensors library checks it (or more)."""
    tensor = f"tensor {brief(name)}"
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise CheckpointError(f"invalid safetensors header: entry {brief(name)} lacks dtype/shape/data_offsets", path)
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise CheckpointError(f"{tensor} has unknown dtype {brief(dtype)}", path)
    if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
        raise CheckpointError(f"{tensor} has an invalid shape {brief(shape)}", path)
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise CheckpointError(f"{tensor} has invalid data_offsets {brief(offsets)}", path)
    begin, end = offsets
    if begin > end:
        raise CheckpointError(f"{tensor} has out-of-range data_offsets {offsets} (they end before they begin)", path)
    if end > data_len:
        raise CheckpointError(f"truncated file: {tensor} ends at data byte {end} but the data section has "
                              f"only {data_len} bytes", path)
    elements = _element_count(shape)
    if elements is None or elements * dtype_size(dtype) * 8 > MAX_COUNT:
        raise CheckpointError(f"{tensor}: shape {brief(shape)} is too large for any file", path)
    expected = elements * dtype_size(dtype)
    if end - begin != expected:
        raise CheckpointError(
            f"{tensor}: shape {brief(shape)} of {dtype} needs {expected} bytes but data_offsets span {end - begin}",
            path)
    return TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + end)


def _is_count(value: object) -> bool:
    """A size or offset: a non-negative 64-bit integer (JSON true/false are not numbers)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_COUNT


def _element_count(shape: list[int]) -> int | None:
    """The number of elements, or None when the running product leaves 64 bits (the library's
    overflow check, in the same order); stopping there also keeps a million-dimension shape cheap."""
    count = 1
    for dim in shape:
        count *= dim
        if count > MAX_COUNT:
            return None
    return count


def _check_layout(path: str, tensors: dict[str, TensorInfo], data_start: int, file_size: int) -> None:
    """Tensors must tile the data section exactly, as the safetensors library requires: no overlap,
    no gap between two tensors, no bytes after the last one."""
    covered, previous = data_start, None
    for info in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
        if info.begin < covered:
            raise CheckpointError(f"tensors {brief(previous)} and {brief(info.name)} have overlapping data_offsets",
                                  path)
        if info.begin > covered:
            where = (f"between tensors {brief(previous)} and {brief(info.name)}" if previous is not None
                     else f"before tensor {brief(info.name)}")
            raise CheckpointError(f"{info.begin - covered} bytes {where} belong to no tensor "
                                  "(data_offsets must be contiguous)", path)
        covered, previous = info.end, info.name
    if covered < file_size:
        raise CheckpointError(f"{file_size - covered} bytes after the last tensor belong to no tensor "
                              "(data_offsets must cover the whole data section)", path)


def _parse_header(path: str, raw: bytes, file_size: int,
                  header_len: int) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    try:
        header = strict_json.loads(raw)
    except strict_json.JSONError as e:
        raise CheckpointError(f"invalid safetensors header JSON ({e})", path) from None
    if not isinstance(header, dict):
        raise CheckpointError("invalid safetensors header: JSON is not an object", path)

    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError("invalid safetensors header: __metadata__ must map strings to strings", path)

    data_start = 8 + header_len
    tensors = {name: _tensor_info(path, name, entry, data_start, file_size - data_start)
               for name, entry in header.items()}
    _check_layout(path, tensors, data_start, file_size)
    return tensors, metadata


class SafetensorsFile:
    """An open safetensors file: its header is parsed and checked, tensors are read on demand.

    >>> with SafetensorsFile("model.safetensors") as f:
    ...     for name in f.keys():
    ...         t = f.read(name)
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._fd = open_input(self.path)  # a FIFO, device, directory or broken link is refused here
        try:
            self._read_header()
        except BaseException:
            self.close()
            raise

    def _read_header(self) -> None:
        self.file_size = os.fstat(self._fd).st_size
        if self.file_size == 0:
            raise CheckpointError("empty file", self.path)
        head = os.pread(self._fd, 8, 0)
        if len(head) < 8:
            raise CheckpointError(f"not a safetensors file: only {len(head)} bytes", self.path)
        (header_len,) = struct.unpack("<Q", head)
        past_end = 8 + header_len > self.file_size
        if past_end or header_len > MAX_HEADER_BYTES or os.pread(self._fd, 1, 8) != b"{":
            if head[:2] == b"PK" or head[:1] == b"\x80":
                raise CheckpointError(
                    "this is a pickle checkpoint (.ckpt/.pt/.bin), which can run arbitrary code when loaded; "
                    "convert it with `lmerge convert` first", self.path)
            if past_end:
                raise CheckpointError(
                    f"header length {header_len} runs past the end of the file ({self.file_size} bytes)", self.path)
            raise CheckpointError("not a safetensors file: no JSON header after the length prefix", self.path)
        raw = os.pread(self._fd, header_len, 8)
        self.header_len = header_len
        self.data_start = 8 + header_len
        self.tensors, self.metadata = _parse_header(self.path, raw, self.file_size, header_len)

    # -- mapping-like access ---------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def __len__(self) -> int:
        return len(self.tensors)

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"has no tensor {name!r}", self.path) from None

    def read(self, name: str) -> torch.Tensor:
        """Read one tensor into a new CPU tensor of its stored dtype."""
        info = self.info(name)
        raw = torch.empty(info.nbytes, dtype=torch.uint8)
        self.read_into(info, raw)
        return raw.view(info.torch_dtype).reshape(info.shape)

    def read_into(self, info: TensorInfo, buffer: torch.Tensor) -> None:
        """Fill the first `info.nbytes` bytes of a contiguous uint8 tensor with the tensor's bytes."""
        view = buffer.numpy().data.cast("B")[: info.nbytes]
        done = 0
        while done < info.nbytes:
            n = os.preadv(self._fd, [view[done:]], info.begin + done)
            if n == 0:
                raise CheckpointError(f"truncated file while reading tensor {info.name!r}", self.path)
            done += n

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.tensors:
            yield name, self.read(name)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            self.close()


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """The tensor table and metadata of a safetensors file, without reading any tensor data."""
    with SafetensorsFile(path) as f:
        return f.tensors, f.metadata


# ---------------------------------------------------------------------------------------------
# Writing


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor as stored in safetensors (C order, native little-endian), without a copy
    when the tensor is already a contiguous CPU tensor."""
    t = tensor.detach().to("cpu").contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else memoryview(b"")


class SafetensorsWriter:
    """Write a safetensors file tensor by tensor, atomically.

    The plan (name -> (dtype name, shape), in file order) fixes the header up front. Tensors are
    then written in the plan's order with `write`; `close` checks that all were written, fsyncs and
    puts the file in place. Until then it is a temporary (lineage/io/temporary.py) that neither an
    error, `abort` nor a kill leaves behind, and the destination is untouched. With `hash_data`, the
    writer takes the sha256 of the data section as it goes (`data_sha256`: the output's AutoV3,
    without reading it back). `metadata_room` bytes of header are kept free for metadata known
    only at the end (`update_metadata`), such as the hashes.
    """

    def __init__(self, path: str | os.PathLike, plan: Mapping[str, tuple[str, tuple[int, ...]]],
                 metadata: Mapping[str, str] | None = None, *, hash_data: bool = False, metadata_room: int = 0):
        self.path = file_destination(path)  # a symlink's target; directories, devices and pipes are refused
        metadata = dict(metadata or {})
        _check_metadata(metadata, self.path)

        header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
        self._slots: dict[str, tuple[str, tuple[int, ...]]] = {}
        offset = 0
        for name, (dtype, shape) in plan.items():
            if dtype not in DTYPES:
                raise LineageError(f"cannot write tensor {name!r}: unknown dtype {dtype!r}", self.path)
            nbytes = math.prod(shape) * dtype_size(dtype)
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._slots[name] = (dtype, tuple(shape))
            offset += nbytes
        raw = _encode(header) + b" " * metadata_room  # JSON may end in spaces: the room is valid header
        raw += b" " * (-len(raw) % 8)  # align the data section to 8 bytes, as the safetensors library does
        self.data_start = 8 + len(raw)
        self.size = self.data_start + offset
        self._names = list(self._slots)  # tensors arrive in this order
        self._written = 0
        self._header, self._header_len = header, len(raw)
        self._new_header: bytes | None = None
        self._hash_data = hash_data

        directory = os.path.dirname(os.path.abspath(self.path))
        anonymous = open_anonymous(directory)
        self._name: GuardedName | None = None  # the hidden name while there is one
        if anonymous is not None:
            self._fd = anonymous
        else:
            self._fd, self._name = create_hidden(self.path)
        self._blocks: BlockWriter | None = None
        try:
            os.fchmod(self._fd, new_file_mode())  # created private; give the file the user's usual mode
            reopen = self._name.path if self._name is not None else f"/proc/self/fd/{self._fd}"
            self._blocks = BlockWriter(self._fd, self.path, reopen, self.size,
                                       hash_from=self.data_start if hash_data else None)
            self._blocks.append(struct.pack("<Q", len(raw)) + raw)
        except BaseException:
            self.abort()
            raise

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next planned tensor (tensors come in the plan's order)."""
        if name not in self._slots:
            raise LineageError(f"tensor {name!r} was not in the write plan", self.path)
        dtype, shape = self._slots[name]
        if DTYPE_NAMES.get(tensor.dtype) != dtype or tuple(tensor.shape) != shape:
            raise LineageError(
                f"tensor {name!r} is {DTYPE_NAMES.get(tensor.dtype, tensor.dtype)} {list(tensor.shape)}, "
                f"planned {dtype} {list(shape)}", self.path)
        expected = self._names[self._written] if self._written < len(self._names) else None
        if name != expected:
            raise LineageError(f"tensor {name!r} written out of order: the plan has {expected!r} next", self.path)
        assert self._blocks is not None
        self._blocks.append(tensor_bytes(tensor))
        self._written += 1

    def data_sha256(self) -> str:
        """sha256 of the data section written (AutoV3); every planned tensor must be written."""
        if not self._hash_data:
            raise LineageError("the writer was not asked to hash its data (hash_data=True)", self.path)
        self._check_complete()
        assert self._blocks is not None
        return self._blocks.sha256()

    def update_metadata(self, metadata: Mapping[str, str]) -> None:
        """Replace the metadata before `close`, for values known only once the data is written (hashes).
        The data section is already placed, so the new header must fit in the first one and the
        `metadata_room` kept after it; what it leaves free is padded with spaces."""
        _check_metadata(metadata, self.path)
        raw = _encode({**self._header, "__metadata__": dict(metadata)})
        if len(raw) > self._header_len:
            raise LineageError(f"the final metadata needs {len(raw) - self._header_len} bytes more header than "
                               "was kept for it (metadata_room); nothing was written", self.path)
        self._new_header = raw + b" " * (self._header_len - len(raw))  # written at close, over the first

    def _check_complete(self) -> None:
        if self._written < len(self._slots):
            missing = self._names[self._written:]
            raise LineageError(f"{len(missing)} planned tensors were never written (first: {missing[0]!r})", self.path)

    def close(self) -> None:
        """Finish: fsync, then put the file at its destination in one step (link or rename)."""
        if self._fd < 0:
            return
        try:
            self._check_complete()
            assert self._blocks is not None
            self._blocks.finish()
            if self._new_header is not None:
                self._pwrite(self._new_header, 8)
            os.fsync(self._fd)
            if self._name is None:
                link_anonymous(self._fd, self.path)
            else:
                os.replace(self._name.path, self.path)
                self._name.release()
                self._name = None
            os.close(self._fd)
            self._fd = -1
        except OSError as e:
            self.abort()
            raise LineageError(f"cannot put the output in place ({e.strerror}); nothing was written",
                               self.path) from None
        except BaseException:
            self.abort()
            raise
        dir_fd = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def _pwrite(self, data: bytes, offset: int) -> None:
        try:
            write_all(self._fd, memoryview(data), offset)
        except OSError as e:
            raise LineageError(f"write failed ({e.strerror}); nothing was written at the destination",
                               self.path) from None

    def abort(self) -> None:
        """Drop the partial output; the destination is untouched."""
        if self._blocks is not None:
            self._blocks.abort()
            self._blocks = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._name is not None:
            self._name.remove()
            self._name = None

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _check_metadata(metadata: Mapping[Any, Any], path: str) -> None:
    for k, v in metadata.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise LineageError(f"metadata must map strings to strings, got {k!r}: {type(v).__name__}", path)


def _encode(header: Mapping[str, object]) -> bytes:
    return json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()


def plan_of(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The write plan for tensors already in memory."""
    plan = {}
    for name, t in tensors.items():
        if t.dtype not in DTYPE_NAMES:
            raise LineageError(f"tensor {name!r} has dtype {t.dtype}, which safetensors cannot store")
        plan[name] = (DTYPE_NAMES[t.dtype], tuple(t.shape))
    return plan


def save_file(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
              metadata: Mapping[str, str] | None = None) -> None:
    """Write in-memory tensors to `path` atomically (the small-file convenience over SafetensorsWriter)."""
    with SafetensorsWriter(path, plan_of(tensors), metadata) as w:
        for name, t in tensors.items():
            w.write(name, t)
