"""The executor's inputs: safetensors files read with pread and watched for changes while a run reads them.

Why pread rather than a memory map: when another process truncates a mapped file, the next access to
a page past the new end raises SIGBUS and the process dies on the spot, with no message and no
cleanup. pread of a range past the end returns fewer bytes, which becomes a one-line error. The
executor reads into buffers each worker reuses (one copy out of the page cache), so no page is
freshly faulted per tensor and the process's RSS stays at the buffers in flight.

A file can also be rewritten in place without changing its size. Its size, mtime and ctime are taken
when it is opened and compared before every job that reads it and once more after the last read; a
difference fails the run before its output is renamed into place, so no torn output is written or
recorded. (A writer can set mtime back, not ctime.)
"""
from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable

from lineage.errors import CheckpointError
from lineage.io.safetensors import SafetensorsFile, TensorInfo

HASH_CHUNK_BYTES = 16 << 20  # read size of the data-section hash


class InputFile:
    """One input of a run: its parsed header (`header`, a SafetensorsFile) and a descriptor of our own
    that every data read goes through."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            before = os.stat(self.path)
        except OSError:
            before = None  # SafetensorsFile says what is wrong with the path
        self.header = SafetensorsFile(self.path)  # checks the file and its header, with clear errors
        try:
            self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # never waits on a FIFO
            stat = os.fstat(self._fd)
        except OSError as e:
            self.header.close()
            raise CheckpointError(f"cannot open ({e.strerror})", self.path) from None
        # The same file, unchanged, from before the header was read until now: the header describes
        # the bytes this descriptor reads.
        same = before is not None and (stat.st_dev, stat.st_ino) == (before.st_dev, before.st_ino)
        if not same or _state(stat) != _state(before) or stat.st_size != self.header.file_size:
            self.close()
            raise CheckpointError("was replaced or changed while being opened", self.path)
        self._snapshot = _state(stat)

    @property
    def tensors(self) -> dict[str, TensorInfo]:
        return self.header.tensors

    def info(self, key: str) -> TensorInfo:
        return self.header.info(key)

    def read_into(self, offset: int, view: memoryview) -> None:
        """Fill `view` with the file's bytes from `offset` on."""
        done = 0
        while done < len(view):
            try:
                n = os.preadv(self._fd, [view[done:]], offset + done)
            except OSError as e:
                raise CheckpointError(f"cannot be read ({e.strerror})", self.path) from None
            if n == 0:
                raise CheckpointError(f"was truncated while being read (it ends before byte {offset + done}); "
                                      "nothing was written", self.path)
            done += n

    def prefetch(self, begin: int, end: int) -> None:
        """Ask the kernel to start reading [begin, end) into the page cache now, asynchronously, so a
        worker reaching it copies from memory instead of waiting on 128 KiB readaheads."""
        if end > begin and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._fd, begin, end - begin, os.POSIX_FADV_WILLNEED)

    def check_unchanged(self) -> None:
        """Raise if the file's size, mtime or ctime differ from when it was opened."""
        now = _state(os.fstat(self._fd))
        if now == self._snapshot:
            return
        if now[0] < self._snapshot[0]:
            raise CheckpointError(f"was truncated while being read ({self._snapshot[0]} -> {now[0]} bytes); "
                                  "nothing was written", self.path)
        raise CheckpointError("was changed while being read; nothing was written", self.path)

    def data_autov3(self, stop: threading.Event | None = None, on_bytes: Callable[[int], object] | None = None,
                    whole_file: hashlib._Hash | None = None) -> str | None:
        """AutoV3: the sha256 of the data section, read sequentially through one buffer. None when
        `stop` is set before the end. `on_bytes(n)` is told of each n bytes hashed (a progress bar).
        `whole_file`, when given, is fed every byte of the file, header included, in the same read:
        the whole-file sha256 (A1111's identity of a checkpoint) without reading the file twice."""
        digest = hashlib.sha256()
        buffer = bytearray(HASH_CHUNK_BYTES)
        view = memoryview(buffer)
        size, data_start = self.header.file_size, self.header.data_start
        for begin in range(0 if whole_file is not None else data_start, size, HASH_CHUNK_BYTES):
            if stop is not None and stop.is_set():
                return None
            n = min(HASH_CHUNK_BYTES, size - begin)
            self.read_into(begin, view[:n])
            if whole_file is not None:
                whole_file.update(view[:n])
            if begin + n > data_start:
                digest.update(view[max(0, data_start - begin):n])
            if on_bytes is not None:
                on_bytes(n)
        return digest.hexdigest()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.header.close()

    def __enter__(self) -> InputFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _state(stat: os.stat_result) -> tuple[int, int, int]:
    return stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns
