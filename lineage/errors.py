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


BRIEF_CHARS = 80


def brief(value: object) -> str:
    """A value from a user's file as an error message shows it: its repr (one line, escapes visible),
    cut short, since a name or a shape in a damaged or hostile file can be megabytes long."""
    text = repr(value)
    return text if len(text) <= BRIEF_CHARS else f"{text[:BRIEF_CHARS - 20]}… ({len(text):,} characters)"
