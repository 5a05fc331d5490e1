"""JSON from files we do not control, read strictly; JSON we write, refused when another reader would choke.

Python's `json` module is lenient where JSON (RFC 8259) and stricter parsers such as serde_json (the
one the safetensors library and most tools use) are not:

- it accepts `NaN` and `Infinity`, and turns numbers too large for a float (`1e400`) into infinity;
- it keeps the last of duplicate keys without a word;
- it decodes `"\\ud800"` into a lone surrogate, a string that later fails wherever it is encoded
  (printing it, storing it in SQLite);
- it raises ValueError for integers of more than 4,300 digits and RecursionError for deep nesting.

`loads` refuses every one of these with a `JSONError` that says what was wrong, so a caller turns
one exception into its one-line message. Integers are bounded to 64 bits, the widest any format here
stores. `dumps` refuses NaN and infinities (which `json.dumps` would write as invalid JSON) and names
where the value sits.
"""
from __future__ import annotations

import json
import math
import re
from typing import Any

from lineage.errors import brief

MAX_INTEGER = 2**64 - 1
_MAX_INTEGER_DIGITS = len(str(MAX_INTEGER))
# A \uD800-\uDFFF escape: the only way a surrogate gets into a decoded string (UTF-8 cannot encode one).
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


class JSONError(ValueError):
    """Text that is not strict JSON, or a value that cannot be written as JSON."""


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise JSONError(f"key {brief(key)} appears twice in one object")
            seen.add(key)
    return obj


def _number_text(text: str) -> str:
    return text if len(text) <= 24 else f"{text[:12]}…({len(text)} characters)"


def _integer(text: str) -> int:
    if len(text.lstrip("-")) > _MAX_INTEGER_DIGITS or abs(value := int(text)) > MAX_INTEGER:
        raise JSONError(f"integer {_number_text(text)} is out of range (more than 64 bits)")
    return value


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JSONError(f"number {_number_text(text)} is out of range")
    return value


def _constant(name: str) -> Any:
    raise JSONError(f"{name} is not a JSON number")


def _check_strings(value: Any) -> None:
    """Refuse lone surrogates anywhere in a decoded document (keys and values)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                raise JSONError(f"string {brief(item)} holds a lone UTF-16 surrogate (not valid Unicode)")
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def loads(text: str | bytes) -> Any:
    """Parse strict JSON (bytes must be UTF-8); raise JSONError for anything else."""
    if isinstance(text, (bytes, bytearray, memoryview)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as e:
            raise JSONError(f"not UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        value = json.loads(text, object_pairs_hook=_object, parse_int=_integer, parse_float=_float,
                           parse_constant=_constant)
    except json.JSONDecodeError as e:
        raise JSONError(f"{e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise JSONError("nested too deeply") from None
    if _SURROGATE_ESCAPE.search(text):  # only an escape can produce a surrogate: skip the walk otherwise
        _check_strings(value)
    return value


def nonfinite_path(value: Any) -> str | None:
    """Where in `value` a NaN or infinite float sits ("params.weights[1]"), or None when there is none."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        where, item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return where or "the value"
        if isinstance(item, dict):
            stack.extend((f"{where}.{k}" if where else str(k), v) for k, v in item.items())
        elif isinstance(item, (list, tuple)):
            stack.extend((f"{where}[{i}]", v) for i, v in enumerate(item))
    return None


def dumps(value: Any, **options: Any) -> str:
    """`json.dumps` that refuses NaN and infinities (naming where they are) instead of writing invalid JSON."""
    try:
        return json.dumps(value, allow_nan=False, **options)
    except ValueError:
        where = nonfinite_path(value)
        if where is None:
            raise
        raise JSONError(f"{where} is not a finite number") from None
