"""Identity hashes of a checkpoint file, all computed in one read pass (docs/hashes.md).

| name   | definition                                                                  |
|--------|-----------------------------------------------------------------------------|
| sha256 | sha256 of the whole file                                                    |
| autov1 | sha256 of bytes [0x100000, 0x110000), first 8 hex (A1111's legacy hash)     |
| autov2 | first 10 hex of sha256 (A1111's "Model hash")                               |
| autov3 | sha256 of the safetensors data section, i.e. ignoring metadata (full hex;   |
|        | Civitai shows the first 12, kohya's `sshs_model_hash` is all of it)          |
| crc32  | of the whole file, 8 hex                                                    |

The file is memory-mapped and walked in chunks by two threads (hashlib and zlib-ng release the GIL):
one takes the sha256 and CRC32 of the whole file, the other the sha256 of the data section. The
threads run freely but stay within a window of chunks of each other, and a chunk's pages are dropped
from the mapping once both are past it, so resident memory stays at a few chunks whatever the file
size.
"""
from __future__ import annotations

import hashlib
import mmap
import os
import struct
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass

from zlib_ng import zlib_ng  # CRC32 with carry-less multiply: ~20 GB/s against zlib's ~4

from lineage.errors import CheckpointError
from lineage.io.inputs import open_input

CHUNK = 32 * 1024 * 1024
AUTOV1_RANGE = (0x100000, 0x110000)


@dataclass(frozen=True)
class FileHashes:
    """A file's identity hashes. `hash_file` fills them all (autov3 is None for non-safetensors files);
    a writer that knows only its data section's AutoV3 (a merge hashes it while writing) leaves the
    whole-file hashes None rather than reading the file again."""

    path: str
    sha256: str | None
    autov1: str | None
    autov2: str | None
    autov3: str | None
    crc32: str | None

    def to_dict(self) -> dict[str, str | None]:
        return asdict(self)


def _data_start(head: bytes, size: int) -> int | None:
    """Offset of the safetensors data section, or None when the file is not safetensors."""
    if size < 9:
        return None
    (n,) = struct.unpack("<Q", head[:8])
    if 8 + n > size or head[8:9] != b"{":
        return None
    return 8 + n


def hash_file(path: str | os.PathLike, chunk_size: int = CHUNK,
              on_bytes: Callable[[int], object] | None = None) -> FileHashes:
    """All identity hashes of one file in a single pass; `on_bytes(n)` is told of each n bytes done
    (a progress bar)."""
    path = os.fspath(path)
    fd = open_input(path)  # a FIFO, device, directory or broken link is refused here
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            raise CheckpointError("empty file", path)
        data_start = _data_start(os.pread(fd, 9, 0), size)
        autov1 = _autov1(fd)
        with mmap.mmap(fd, size, access=mmap.ACCESS_READ) as mm:
            sha_file, sha_data, crc = _hash_mapped(mm, size, data_start, chunk_size, on_bytes=on_bytes)
    finally:
        os.close(fd)
    return FileHashes(
        path=path,
        sha256=sha_file,
        autov1=autov1,
        autov2=sha_file[:10],
        autov3=sha_data,
        crc32=f"{crc:08x}",
    )


def _autov1(fd: int) -> str:
    return hashlib.sha256(os.pread(fd, AUTOV1_RANGE[1] - AUTOV1_RANGE[0], AUTOV1_RANGE[0])).hexdigest()[:8]


def file_autov1(path: str | os.PathLike) -> str:
    """A1111's legacy hash alone (one 64 KiB read): what its merges write as an input's `legacy_hash`."""
    fd = open_input(os.fspath(path))
    try:
        return _autov1(fd)
    finally:
        os.close(fd)


def _hash_mapped(mm: mmap.mmap, size: int, data_start: int | None, chunk_size: int, window: int = 8,
                 on_bytes: Callable[[int], object] | None = None) -> tuple[str, str | None, int]:
    chunks = [(a, min(a + chunk_size, size)) for a in range(0, size, chunk_size)]
    view = memoryview(mm)
    sha_file, sha_data = hashlib.sha256(), hashlib.sha256()
    crc = 0
    position = [0, 0]  # chunks each thread has finished
    progress = threading.Condition()
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        nonlocal crc
        other = 1 - worker
        try:
            for i, (a, b) in enumerate(chunks):
                with progress:  # stay within `window` chunks of the other thread, bounding resident pages
                    progress.wait_for(lambda: i < position[other] + window or errors)  # noqa: B023 - called in this iteration
                if errors:
                    return
                if worker == 0:
                    sha_file.update(view[a:b])
                    crc = zlib_ng.crc32(view[a:b], crc)
                elif data_start is not None and b > data_start:
                    sha_data.update(view[max(a, data_start):b])
                with progress:
                    position[worker] = i + 1
                    both_done = position[other] > i
                    progress.notify_all()
                    if both_done and on_bytes is not None:  # counted once, by the second thread, under the lock
                        on_bytes(b - a)
                if both_done:  # the other thread is past this chunk too: drop its pages from our RSS
                    mm.madvise(mmap.MADV_DONTNEED, a, b - a)
        except BaseException as e:  # pragma: no cover - re-raised below
            with progress:
                errors.append(e)
                progress.notify_all()

    threads = [threading.Thread(target=work, args=(w,)) for w in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    view.release()
    if errors:
        raise errors[0]
    return sha_file.hexdigest(), (sha_data.hexdigest() if data_start is not None else None), crc
