"""Writing small output files (rendered trees, exports, model cards) so a reader never sees half of one."""
from __future__ import annotations

import os
import tempfile

from lineage.errors import LineageError


def atomic_write(path: str | os.PathLike, data: str | bytes) -> None:
    """Write `data` to a temporary file next to `path`, flush it to disk, then rename it over `path`."""
    target = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(target))
    try:
        fd, temporary = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(target)}.", suffix=".tmp")
    except OSError as e:
        raise LineageError(f"cannot write here ({e.strerror})", target) from None
    try:
        with os.fdopen(fd, "wb") as f:
            # mkstemp makes the file private; give it the mode a plain open() would (or the old file's).
            os.fchmod(f.fileno(), os.stat(target).st_mode & 0o7777 if os.path.exists(target) else 0o644)
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, target)
    except BaseException as e:
        os.unlink(temporary)
        if isinstance(e, OSError):
            raise LineageError(f"cannot write ({e.strerror})", target) from None
        raise
