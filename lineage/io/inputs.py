"""Files a command reads: regular files only, anything else refused before it is read.

Reading a named pipe (FIFO) blocks until another process writes to it, a device such as /dev/zero
never ends, and a directory, a dangling symbolic link or a link loop fails later with an error that
does not say why. Every place that opens a user's file (checkpoint headers, hashing, recipes, graph
exports, pickles) goes through `open_input`, which names what the path is instead, in one line.

The path is looked at with `stat` before it is opened (opening some devices has effects of its
own), then opened without blocking and looked at again through the open descriptor, so a file
swapped for a pipe in between is refused too.
"""
from __future__ import annotations

import errno
import os
import stat

from lineage.errors import LineageError

# File type -> how an error names it.
FILE_KINDS: dict[int, str] = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a named pipe (FIFO)",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


def _refuse_kind(path: str, mode: int) -> None:
    kind = stat.S_IFMT(mode)
    if kind != stat.S_IFREG:
        raise LineageError(f"is {FILE_KINDS.get(kind, 'not a regular file')}, not a regular file; "
                           "lineage reads only regular files", path)


def check_input(path: str | os.PathLike) -> os.stat_result:
    """The file's status, or a LineageError saying why `path` cannot be read as a regular file."""
    path = os.fspath(path)
    try:
        status = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise LineageError(f"is a symbolic link to {os.readlink(path)}, which does not exist", path) from None
        raise LineageError("no such file", path) from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise LineageError("is a symbolic link loop (following it leads back to itself)", path) from None
        raise LineageError(f"cannot open ({e.strerror})", path) from None
    _refuse_kind(path, status.st_mode)
    return status


def open_input(path: str | os.PathLike) -> int:
    """A read-only descriptor of the regular file at `path` (the caller closes it)."""
    path = os.fspath(path)
    check_input(path)
    nonblocking = getattr(os, "O_NONBLOCK", 0)  # a pipe swapped in after the check must not block the open
    try:
        fd = os.open(path, os.O_RDONLY | nonblocking | getattr(os, "O_NOCTTY", 0))
    except OSError as e:
        raise LineageError(f"cannot open ({e.strerror})", path) from None
    try:
        _refuse_kind(path, os.fstat(fd).st_mode)
        if nonblocking:
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_input(path: str | os.PathLike) -> bytes:
    """The whole content of a (small) regular file: a recipe, a graph export."""
    path = os.fspath(path)
    try:
        with os.fdopen(open_input(path), "rb") as f:
            return f.read()
    except OSError as e:
        raise LineageError(f"cannot read ({e.strerror})", path) from None
