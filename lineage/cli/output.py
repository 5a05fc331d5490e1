"""Output helpers shared by every area's commands."""
from __future__ import annotations

import json
from typing import Any

import click


def echo_json(value: Any) -> None:
    """Print one JSON document (UTF-8 names kept as they are)."""
    click.echo(json.dumps(value, indent=2, ensure_ascii=False))
