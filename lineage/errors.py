"""The one exception type the CLI turns into a clean one-line message.

Every problem with a user's input (a broken file, a wrong model, a bad option) is raised as a
`LineageError` whose message names the file and the problem; anything else reaching the user is a bug.
"""
from __future__ import annotations

import os


class LineageError(Exception):
    """A problem with the user's input, reported without a traceback."""

    def __init__(self, message: str, path: str | os.PathLike | None = None):
        self.path = os.fspath(path) if path is not None else None
        super().__init__(f"{self.path}: {message}" if self.path else message)


class CheckpointError(LineageError):
    """A file that is not a valid checkpoint of the expected kind."""
