"""Reading a model's sizes back from a checkpoint's tensor shapes (for the configs' `from_shapes`).

A checkpoint stores widths and depths but not everything a module needs: the number of attention
heads and of GroupNorm groups are not in any shape. SDXL's values (64-channel heads, 32 groups) are
used where the widths allow; files generated at reduced widths (lineage.sdxl.synthetic, e.g. 10
channels) fall back to the next candidate that divides every width.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping

from lineage.errors import CheckpointError

Shapes = Mapping[str, tuple[int, ...]]


def first_divisor(widths: Iterable[int], candidates: Iterable[int]) -> int:
    """The first candidate that divides every width (1 when none does)."""
    widths = list(widths)
    for candidate in candidates:
        if candidate > 0 and all(w % candidate == 0 for w in widths):
            return candidate
    return 1


def norm_groups(widths: Iterable[int]) -> int:
    """GroupNorm groups: SDXL's 32 where every normalised width allows, else their common divisor."""
    widths = list(widths)
    return first_divisor(widths, (32, math.gcd(*widths)))


def count(shapes: Shapes, pattern: str) -> int:
    """How many distinct indices `{i}` the keys matching `pattern` (a regex with one `(\\d+)`) use."""
    regex = re.compile(pattern)
    return len({m.group(1) for key in shapes if (m := regex.fullmatch(key))})


def shape(shapes: Shapes, key: str, what: str) -> tuple[int, ...]:
    """The shape of `key`, or a one-line error naming the part the checkpoint lacks."""
    try:
        return shapes[key]
    except KeyError:
        raise CheckpointError(f"not an SDXL {what}: no tensor {key!r}") from None
