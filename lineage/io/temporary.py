"""Files that appear at their path only once complete, and leave nothing behind when the process is killed.

Until it is complete, a file being written lives
- as an anonymous file (Linux O_TMPFILE) in the destination's directory: the kernel frees it when its
  last descriptor closes, also when the process is killed, so there is nothing to clean up; or
- under a hidden name beside the destination (`.NAME.<random>.partial`): where O_TMPFILE is missing
  (other systems, some file systems), and for the instant between giving a complete anonymous file a
  name and renaming that name over an existing destination.
A hidden name is watched by a guard: a tiny `sh` process in a session of its own (so signals sent to
our process group spare it) that blocks reading a pipe only we hold open. When we exit or are
killed, the kernel closes the pipe and the guard removes the name, unless we told it first that the
name is no longer ours to remove (it was renamed into place, or someone else's file took it). Where
there is no `sh`, the name is unguarded and only removed by our own error handling.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from typing import TypeVar

from lineage.errors import LineageError

T = TypeVar("T")

# $1: the name to remove unless told "keep". Signals are ignored: only the pipe's end ends the guard.
GUARD_SCRIPT = 'trap "" HUP INT TERM QUIT; read answer; [ "$answer" = keep ] || rm -f -- "$1"'


def open_anonymous(directory: str) -> int | None:
    """A descriptor of a new anonymous file in `directory` (read-write), or None where the platform or
    the file system has none."""
    if not hasattr(os, "O_TMPFILE") or not os.path.isdir("/proc/self/fd"):
        return None
    try:
        return os.open(directory, os.O_TMPFILE | os.O_RDWR, 0o600)
    except OSError:  # no anonymous files here (or the directory is not writable: the named path says so)
        return None


class GuardedName:
    """A hidden name beside a destination that a guard process removes if we die while holding it."""

    def __init__(self, path: str):
        self.path = path
        sh = shutil.which("sh")
        self._guard = None if sh is None else subprocess.Popen(
            [sh, "-c", GUARD_SCRIPT, "lineage-guard", path], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True)

    def release(self) -> None:
        """The name is no longer ours to remove: end the guard without touching it."""
        if self._guard is not None:
            assert self._guard.stdin is not None
            try:
                self._guard.stdin.write(b"keep\n")
                self._guard.stdin.close()
            except BrokenPipeError:  # the guard is gone already
                pass
            self._guard.wait()
            self._guard = None

    def remove(self) -> None:
        """Remove the file under the name (if any) and end the guard."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        self.release()


def claim_hidden_name(destination: str, create: Callable[[str], T]) -> tuple[T, GuardedName]:
    """Call `create(name)` with an unused hidden name beside `destination`, guarded from before the
    name exists; a `create` that finds the name taken (FileExistsError) is tried with another."""
    directory, base = os.path.split(os.path.abspath(destination))
    for _ in range(100):
        name = GuardedName(os.path.join(directory, f".{base}.{os.urandom(4).hex()}.partial"))
        try:
            return create(name.path), name
        except FileExistsError:
            name.release()  # someone else's file: not ours to remove
        except BaseException:
            name.release()
            raise
    raise LineageError("cannot find an unused temporary name beside the output", destination)


def create_hidden(destination: str) -> tuple[int, GuardedName]:
    """A new, empty, private file under a guarded hidden name beside `destination`, opened read-write."""
    try:
        return claim_hidden_name(destination, lambda path: os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as e:
        raise LineageError(f"cannot create output ({e.strerror})", destination) from None


def link_anonymous(fd: int, destination: str) -> None:
    """Give the complete anonymous file `fd` the name `destination` (replacing what is there): linked
    straight to it when the name is free, else under a guarded hidden name then renamed over it."""
    directory = os.path.dirname(os.path.abspath(destination))
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        # With a dir fd os.link calls linkat, which follows the /proc link to the file (link() would not).
        def link(path: str) -> None:
            os.link(f"/proc/self/fd/{fd}", os.path.basename(path), dst_dir_fd=dir_fd)

        try:
            link(destination)
            return
        except FileExistsError:
            pass
        _, name = claim_hidden_name(destination, link)
        try:
            os.replace(name.path, destination)
        except BaseException:
            name.remove()
            raise
        name.release()
    finally:
        os.close(dir_fd)
