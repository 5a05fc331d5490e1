"""How a merge parameter varies across the keys of a checkpoint (docs/blocks.md).

A parameter such as `alpha` can be
- one scalar for every key;
- per component (`unet`, `clip_l`, `clip_g`, `vae`);
- per block, in one of the block presets of `lineage.blocks` (supermerger's 20-value XL string in its
  current and legacy meaning, sd-mecha's blocks, ComfyUI's ModelMergeSDXL sliders, our finer set);
- per key, by regular-expression overrides, searched in the key with RE2 (google-re2): its matching
  time grows linearly with the key, so no pattern can hang a merge, also one read back from a
  file's metadata. RE2 has no backreferences or lookaround; such a pattern is refused up front.
The most specific wins: scalar < component < block < override (the last matching override wins).

Convention: every value stored here is in the method's own convention; for `weighted_sum` `alpha`
is the weight of the second model B, as in A1111/supermerger: (1-α)·A + α·B. ComfyUI's slider
ratio is the weight of model 1, the opposite, so block strings given in the `comfyui` preset are
converted on parsing (α = 1 - ratio) and stored as α. A NAME=VALUE string leaves the blocks it does
not name at the scalar value, except in the `comfyui` preset, where they stay at ComfyUI's untouched
slider, ratio 1.0: model 1 kept (α = 0).

A preset may leave keys "not merged" (supermerger before 2025-11 kept time_embed/label_emb of A,
ComfyUI does not merge the text encoders or the VAE): for those `value_for` returns None and the
engine copies the first model's tensor, unless an override names the key.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lineage.errors import LineageError
from lineage.sdxl.blocks import BLOCK_NAMES, block_of
from lineage.sdxl.layout import COMPONENT_PREFIXES, component_of

from .parameters import is_number

PRESETS: tuple[str, ...] = tuple(BLOCK_NAMES)
DEFAULT_PRESET = "supermerger"

# Presets whose block values users write as the weight of the FIRST model (converted to α = 1 - v).
FIRST_MODEL_WEIGHT_PRESETS = frozenset({"comfyui"})

# The value, in the preset's own convention, of a block a NAME=VALUE string does not name, for
# presets whose untouched blocks have a value of their own: ComfyUI's sliders start at ratio 1.0.
# (In other presets an unnamed block keeps the parameter's scalar value.)
UNNAMED_BLOCK_VALUE: dict[str, float] = {"comfyui": 1.0}

# supermerger's 26-value SD 1.x string: BASE, IN00..IN11, M00, OUT00..OUT11. SDXL has no IN09-11 /
# OUT09-11, so such a string converts to the 20-value XL string by dropping those six.
SD1_BLOCK_NAMES: list[str] = ["BASE", *(f"IN{i:02d}" for i in range(12)), "M00", *(f"OUT{i:02d}" for i in range(12))]
SD1_ONLY_BLOCKS = frozenset({"IN09", "IN10", "IN11", "OUT09", "OUT10", "OUT11"})
SD1_STRING_PRESETS = frozenset({"supermerger", "supermerger-legacy"})


def _check_preset(preset: str) -> None:
    if preset not in BLOCK_NAMES:
        raise LineageError(f"unknown block preset {preset!r}; known: {', '.join(PRESETS)}")


def parse_blocks(text: str, preset: str = DEFAULT_PRESET) -> dict[str, float]:
    """Parse a block-weight string into {block name: value in the method's convention}.

    Two forms:
    - positional numbers in the preset's block order, e.g. supermerger's 20 values
      "BASE,IN00,…,IN08,M00,OUT00,…,OUT08" (a 26-value SD 1.x string is accepted and converted);
    - named values, e.g. "IN04=0.3,M00=1" (blocks not named keep the parameter's scalar value, or
      the preset's UNNAMED_BLOCK_VALUE: ComfyUI's untouched sliders keep model 1).
    """
    _check_preset(preset)
    items = [s.strip() for s in text.replace("\n", ",").split(",") if s.strip()]
    if not items:
        raise LineageError("empty block-weight string")
    names = BLOCK_NAMES[preset]
    if all("=" in s for s in items):
        pairs = [s.split("=", 1) for s in items]
        values = {name.strip(): _number(value, name.strip()) for name, value in pairs}
        unknown = [n for n in values if n not in names]
        if unknown:
            raise LineageError(f"unknown block names for preset {preset!r}: {', '.join(unknown)}; "
                               f"known: {', '.join(names)}")
        if preset in UNNAMED_BLOCK_VALUE:
            values = {n: values.get(n, UNNAMED_BLOCK_VALUE[preset]) for n in names}
    elif any("=" in s for s in items):
        raise LineageError("a block-weight string is either all numbers or all NAME=VALUE pairs, not a mix")
    else:
        numbers = [_number(s, f"block {i + 1}") for i, s in enumerate(items)]
        if preset in SD1_STRING_PRESETS and len(numbers) == len(SD1_BLOCK_NAMES):
            values = {n: v for n, v in zip(SD1_BLOCK_NAMES, numbers) if n not in SD1_ONLY_BLOCKS}
        elif len(numbers) == len(names):
            values = dict(zip(names, numbers))
        else:
            accepted = f"{len(names)}" + (f" (or {len(SD1_BLOCK_NAMES)} for an SD 1.x string)"
                                           if preset in SD1_STRING_PRESETS else "")
            raise LineageError(f"preset {preset!r} takes {accepted} block values, got {len(numbers)}: "
                               f"{', '.join(names)}")
    if preset in FIRST_MODEL_WEIGHT_PRESETS:
        values = {n: 1.0 - v for n, v in values.items()}
    return values


def _number(text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise LineageError(f"{what}: {text.strip()!r} is not a number") from None


@functools.lru_cache(maxsize=256)
def _override_pattern(pattern: str) -> Any:
    """An override's pattern compiled by RE2 (see the module doc); a one-line error if RE2 refuses it."""
    import re2  # google-re2

    options = re2.Options()
    options.log_errors = False  # RE2 would also print the error on stderr
    try:
        return re2.compile(pattern, options)
    except re2.error as e:
        reason = e.args[0].decode(errors="replace") if e.args and isinstance(e.args[0], bytes) else str(e)
        raise LineageError(f"key override pattern {pattern!r} is not valid RE2 syntax ({reason}); override "
                           "patterns cannot use backreferences or lookaround") from None


def _table(value: Any, field_name: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise LineageError(f"recipe field `{field_name}` must be a table, got {value!r}")
    return value


def _numbers(value: Any, field_name: str) -> dict[str, float]:
    """A table of numbers (name -> value), each checked."""
    out = {}
    for name, number in _table(value, field_name).items():
        if not is_number(number):
            raise LineageError(f"recipe field `{field_name}.{name}` must be a number, got {number!r}")
        out[str(name)] = float(number)
    return out


@dataclass(frozen=True)
class KeyWeights:
    """How one merge parameter departs from its scalar value, key by key."""

    preset: str | None = None  # block preset naming the keys of `blocks`; None: no block weights
    blocks: Mapping[str, float] = field(default_factory=dict)
    components: Mapping[str, float] = field(default_factory=dict)
    overrides: tuple[tuple[str, float], ...] = ()  # (regular expression searched in the key, value)

    def __post_init__(self) -> None:
        if self.preset is not None:
            _check_preset(self.preset)
            unknown = [b for b in self.blocks if b not in BLOCK_NAMES[self.preset]]
            if unknown:
                raise LineageError(f"unknown blocks for preset {self.preset!r}: {', '.join(unknown)}")
        elif self.blocks:
            raise LineageError("block weights need a preset naming their blocks")
        unknown = [c for c in self.components if c not in COMPONENT_PREFIXES]
        if unknown:
            raise LineageError(f"unknown components {', '.join(unknown)}; known: {', '.join(COMPONENT_PREFIXES)}")
        for pattern, _ in self.overrides:
            _override_pattern(pattern)

    def value_for(self, key: str, scalar: float) -> float | None:
        """The parameter's value for `key` given its scalar value, or None when the preset leaves
        the key unmerged."""
        value: float | None = scalar
        component = component_of(key)
        if component in self.components:
            value = self.components[component]
        if self.preset is not None:
            block = block_of(key, self.preset)
            value = None if block is None else self.blocks.get(block, value)
        for pattern, override in self.overrides:
            if _override_pattern(pattern).search(key):
                value = override
        return value

    def values(self) -> list[tuple[str, float]]:
        """Every value it can give a key, with where it is set (for checking them all up front)."""
        return [*((f"block {name}", v) for name, v in self.blocks.items()),
                *((f"component {name}", v) for name, v in self.components.items()),
                *((f"override {pattern!r}", v) for pattern, v in self.overrides)]

    def to_dict(self) -> dict[str, Any]:
        """The JSON/TOML form (what recipes and the output's record store)."""
        out: dict[str, Any] = {}
        if self.preset is not None:
            out["preset"] = self.preset
            out["blocks"] = dict(self.blocks)
        if self.components:
            out["components"] = dict(self.components)
        if self.overrides:
            out["overrides"] = [{"pattern": p, "value": v} for p, v in self.overrides]
        return out

    @classmethod
    def from_dict(cls, data: Any, field_name: str = "per_key") -> KeyWeights:
        """From the JSON/TOML form, every value type-checked; errors name the field (`field_name` is
        where the table sits in the recipe, e.g. per_key.alpha)."""
        data = _table(data, field_name)
        known = {"preset", "blocks", "components", "overrides"}
        unknown = set(data) - known
        if unknown:
            raise LineageError(f"unknown fields in `{field_name}`: {', '.join(sorted(unknown))}; "
                               f"known: {', '.join(sorted(known))}")
        preset = data.get("preset")
        if preset is not None and not isinstance(preset, str):
            raise LineageError(f"recipe field `{field_name}.preset` must be a preset name, got {preset!r}")
        blocks = data.get("blocks", {})
        if isinstance(blocks, str):  # a block string, in the preset's convention
            blocks = parse_blocks(blocks, preset or DEFAULT_PRESET)
            preset = preset or DEFAULT_PRESET
        overrides = data.get("overrides", [])
        if isinstance(overrides, str) or not isinstance(overrides, Sequence):
            raise LineageError(f"recipe field `{field_name}.overrides` must be a list of "
                               f"{{ pattern, value }} tables, got {overrides!r}")
        pairs = []
        for i, override in enumerate(overrides):
            where = f"{field_name}.overrides[{i}]"
            override = _table(override, where)
            if set(override) != {"pattern", "value"}:
                raise LineageError(f"recipe field `{where}` must have exactly `pattern` and `value`, "
                                   f"got {', '.join(map(str, override)) or 'nothing'}")
            if not isinstance(override["pattern"], str):
                raise LineageError(f"recipe field `{where}.pattern` must be a string, got {override['pattern']!r}")
            if not is_number(override["value"]):
                raise LineageError(f"recipe field `{where}.value` must be a number, got {override['value']!r}")
            pairs.append((override["pattern"], float(override["value"])))
        block_values = _numbers(blocks, f"{field_name}.blocks")
        components = _numbers(data.get("components", {}), f"{field_name}.components")
        try:
            return cls(preset=preset, blocks=block_values, components=components, overrides=tuple(pairs))
        except LineageError as e:  # a preset, block, component or pattern it does not know
            raise LineageError(f"`{field_name}`: {e}") from None
