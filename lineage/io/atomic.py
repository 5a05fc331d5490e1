"""Where a command's output may go, and writing small outputs (recipes, trees, exports, model cards)
so that no reader ever sees half of one.

Every output path goes through `destination` first. It refuses a destination that is one of the
files the command reads (`--save-recipe a.safetensors` would otherwise replace an input model with
a recipe), and decides how the bytes get there without ever replacing something that is not a
regular file with one:

| the path is                                  | written how                                            |
|----------------------------------------------|--------------------------------------------------------|
| a regular file, or nothing yet               | to a temporary file beside it, renamed over it          |
| a symbolic link (to a file, or dangling)     | the same, at the link's final target; the link stays    |
| /dev/stdout, /dev/stderr, /dev/fd/N          | straight to that open descriptor                        |
| a character device (/dev/null) or a FIFO     | written through in place (a FIFO needs a reader)        |
| a directory, block device, socket, link loop | refused                                                 |

Model files (`SafetensorsWriter`) are written only to regular files: `file_destination` refuses
the rows that write through.
"""
from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass

from lineage.errors import LineageError
from lineage.io.inputs import FILE_KINDS
from lineage.io.temporary import create_hidden, link_anonymous, open_anonymous

# /dev/stdout -> /proc/self/fd/1: opening the link again would start a new file description (at
# offset 0, without O_APPEND), so the bytes go to the descriptor the process already has.
_DESCRIPTOR_PATH = re.compile(r"/(?:proc/self|dev)/fd/(\d+)")
_MAX_LINKS = 40  # as the kernel's limit on symbolic links in one lookup


@dataclass(frozen=True)
class Destination:
    """How an output reaches `path`: replacing the regular file `target` atomically, writing to the
    open descriptor `descriptor`, or writing through the device or FIFO at `path` in place."""

    path: str
    target: str | None = None
    descriptor: int | None = None

    @property
    def replaces_a_file(self) -> bool:
        return self.target is not None


def _open_descriptor(path: str) -> int | None:
    """N when `path` is, or links to, /dev/fd/N or /proc/self/fd/N."""
    current = os.path.abspath(path)
    for _ in range(_MAX_LINKS):
        match = _DESCRIPTOR_PATH.fullmatch(current)
        if match:
            return int(match.group(1))
        try:
            link = os.readlink(current)
        except OSError:
            return None
        current = os.path.normpath(os.path.join(os.path.dirname(current), link))
    return None


def _identity(path: str) -> tuple[object, ...]:
    """What makes two paths the same file: device and inode when it exists, else its resolved path."""
    try:
        status = os.stat(path)
    except OSError:
        return ("path", os.path.realpath(path))
    return (status.st_dev, status.st_ino)


def refuse_inputs(path: str | os.PathLike, inputs: Iterable[str | os.PathLike | None]) -> None:
    """Raise if `path` is (or links to) one of `inputs`: writing it would destroy a file the command reads."""
    out = os.fspath(path)
    mine = _identity(out)
    for inp in inputs:
        if inp is not None and _identity(os.fspath(inp)) == mine:
            raise LineageError(f"is one of the inputs of this command ({os.fspath(inp)}); "
                               "choose another output file", out)


def destination(path: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = ()) -> Destination:
    """Check an output path before any work is done; see the module's table for what is allowed."""
    path = os.fspath(path)
    refuse_inputs(path, inputs)
    descriptor = _open_descriptor(path)
    if descriptor is not None:
        return Destination(path, descriptor=descriptor)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:  # a new file, or a dangling link whose target will be created
        return Destination(path, target=os.path.realpath(path))
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise LineageError("is a symbolic link loop; refusing to write there", path) from None
        raise LineageError(f"cannot write here ({e.strerror})", path) from None
    kind = stat.S_IFMT(mode)
    if kind == stat.S_IFREG:
        return Destination(path, target=os.path.realpath(path))
    if kind in (stat.S_IFCHR, stat.S_IFIFO):
        return Destination(path)
    raise LineageError(f"is {FILE_KINDS.get(kind, 'not a regular file')}; refusing to write an output there", path)


def file_destination(path: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = ()) -> str:
    """The regular file a model output replaces (a symlink's target), refusing devices and pipes."""
    found = destination(path, inputs)
    if found.target is None:
        raise LineageError("is not a regular file (a device, pipe or open descriptor); a model file is written "
                           "only to a regular file", found.path)
    return found.target


def _write_all(fd: int, data: bytes, path: str) -> None:
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except OSError as e:
            raise LineageError(f"cannot write ({e.strerror})", path) from None
        view = view[written:]


def _write_through(found: Destination, data: bytes) -> None:
    if found.descriptor is not None:
        _write_all(found.descriptor, data, found.path)
        return
    nonblocking = getattr(os, "O_NONBLOCK", 0)  # so a FIFO without a reader is an error (ENXIO), not a hang
    try:
        fd = os.open(found.path, os.O_WRONLY | nonblocking | getattr(os, "O_NOCTTY", 0))
    except OSError as e:
        problem = "is a named pipe that nobody reads" if e.errno == errno.ENXIO else f"cannot write ({e.strerror})"
        raise LineageError(problem, found.path) from None
    try:
        if nonblocking:
            os.set_blocking(fd, True)
        _write_all(fd, data, found.path)
    finally:
        os.close(fd)


def new_file_mode() -> int:
    """The mode a file created now gets by default: 0o666 less the process's umask (read without changing it
    for good: os.umask only reads it by setting it)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _replace(found: Destination, data: bytes) -> None:
    """Write `data` to a temporary a kill cannot leave behind (lineage.io.temporary: an anonymous file,
    else a guarded hidden name), then put it in place of the target in one rename."""
    target = found.target
    assert target is not None
    fd = open_anonymous(os.path.dirname(target))
    name = None
    try:
        if fd is None:
            fd, name = create_hidden(target)
        # The temporary is private; give it the old file's mode, or the one a plain open() would.
        os.fchmod(fd, os.stat(target).st_mode & 0o7777 if os.path.exists(target) else new_file_mode())
        _write_all(fd, data, found.path)
        os.fsync(fd)
        if name is None:
            link_anonymous(fd, target)
        else:
            os.replace(name.path, target)
            name.release()
    except BaseException as e:
        if name is not None:
            name.remove()
        if isinstance(e, OSError):
            where = found.path if target == os.path.abspath(found.path) else f"{found.path} (-> {target})"
            raise LineageError(f"cannot write here ({e.strerror})", where) from None
        raise
    finally:
        if fd is not None:
            os.close(fd)


def atomic_write(path: str | os.PathLike, data: str | bytes,
                 inputs: Iterable[str | os.PathLike | None] = ()) -> None:
    """Write `data` (text is UTF-8) to `path` as `destination` decides: never onto one of `inputs`,
    never half a file, never a regular file in place of a link, device or pipe."""
    found = destination(path, inputs)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    if found.replaces_a_file:
        _replace(found, raw)
    else:
        _write_through(found, raw)
