"""Open any SDXL adapter file into modules keyed by kohya name (docs/adapters.md).

`open_adapter(path)` reads the header only (tensors stay on disk; a job reads each role's tensor as
`Source(path, key)`), places every key through the dialect tables (adapters/dialects.py), and refuses
with a one-line error what is not an SDXL adapter: a checkpoint, an SD 1.x adapter, module names that no
SDXL dialect has (some listed, with the dialect guessed), a module whose roles mix algorithms or miss a
factor, factors whose shapes do not agree with each other or with the checkpoint's weight. A truncated
or malformed file is refused by the safetensors reader, which names the file.
"""
from __future__ import annotations

import math
import os
import re
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from lineage.errors import CheckpointError, brief
from lineage.io import strict_json
from lineage.io.safetensors import SafetensorsFile, TensorInfo
from lineage.sdxl.layout import COMPONENT_PREFIXES, MARKER_KEYS

from .dialects import (
    ALGORITHM_ROLES,
    DIALECTS,
    PEFT_CONFIG_KEY,
    PEFT_PREFIXES,
    Dialect,
    algorithm_of,
    peft_config_names,
)
from .modules import HasShape, Module, modules_by_name, reference_modules

# Names only an SD 1.x / 2.x adapter has: kohya's single text encoder tag, and diffusers blocks that
# SDXL's UNet does not have (attention in the first level, a fourth level).
SD1_NAMES = re.compile(r"^lora_te_|^lora_unet_(down_blocks_0_attentions|up_blocks_3_attentions|down_blocks_3_)")
UNKNOWN_LISTED = 5  # unknown module names quoted in the error

# The roles an algorithm cannot do without (each tuple: one of these must be present).
REQUIRED_ROLES: dict[str, tuple[tuple[str, ...], ...]] = {
    "lora": (("lora_down",), ("lora_up",)),
    "lokr": (("lokr_w1", "lokr_w1_a"), ("lokr_w2", "lokr_w2_a")),
    "loha": (("hada_w1_a",), ("hada_w1_b",), ("hada_w2_a",), ("hada_w2_b",)),
    "diff": (("diff", "diff_b"),),
}
# A factor given whole or as a low-rank pair, never both (a loader would pick one and drop the other).
WHOLE_OR_PAIR: dict[str, tuple[tuple[str, tuple[str, str]], ...]] = {
    "lokr": (("lokr_w1", ("lokr_w1_a", "lokr_w1_b")), ("lokr_w2", ("lokr_w2_a", "lokr_w2_b"))),
}
# How many dimensions each role's tensor may have (roles not listed are not checked): 4-D for
# convolution kernels and Tucker cores, 2-D for matrices, 1-D for a bias.
ROLE_NDIMS: dict[str, tuple[int, ...]] = {
    "lora_down": (2, 4), "lora_up": (2, 4), "lora_mid": (4,),
    "lokr_w1": (2,), "lokr_w2": (2, 4), "lokr_t2": (4,),
    **{f"{w}_{s}": (2,) for w in ("lokr_w1", "lokr_w2", "hada_w1", "hada_w2") for s in ("a", "b")},
    "hada_t1": (4,), "hada_t2": (4,), "diff": (2, 4), "diff_b": (1,),
}


@dataclass
class AdapterModule:
    """One adapted module of a file: its kohya name, algorithm, the file key of each role, alpha (None
    when the file gives none: a scale of 1) and the shape of each role's tensor."""

    name: str
    algorithm: str
    keys: dict[str, str]
    alpha: float | None
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def rank(self) -> int | None:
        """The LoRA rank (rows of `lora_down`); None for other algorithms."""
        return self.shapes["lora_down"][0] if "lora_down" in self.shapes else None


@dataclass
class AdapterFile:
    path: str
    dialect: str
    modules: dict[str, AdapterModule]
    metadata: dict[str, str]
    tensors: dict[str, TensorInfo]

    @property
    def algorithms(self) -> set[str]:
        return {m.algorithm for m in self.modules.values()}

    @property
    def algorithm(self) -> str:
        """The file's algorithm: `lora`, `lokr`, `loha`, `diff`, or `mixed`."""
        found = self.algorithms
        return found.pop() if len(found) == 1 else "mixed"


def _fail(path: str, problem: str) -> CheckpointError:
    return CheckpointError(problem, path)


def _is_checkpoint(keys: list[str]) -> bool:
    prefixes = tuple(COMPONENT_PREFIXES.values()) + ("cond_stage_model.",)
    return any(k.startswith(prefixes) or k in MARKER_KEYS for k in keys)


def _guess_dialect(keys: list[str]) -> Dialect:
    placed = Counter({name: sum(1 for k in keys if d.parse(k)) for name, d in DIALECTS.items()})
    best, count = placed.most_common(1)[0]
    if count == 0:  # nothing placed: guess by suffixes (kohya's roles vs PEFT's lora_A/lora_B)
        by_suffix = Counter({name: sum(1 for k in keys if d.split(k)) for name, d in DIALECTS.items()})
        best = by_suffix.most_common(1)[0][0]
    return DIALECTS[best]


def _place_keys(path: str, keys: list[str], dialect: Dialect) -> dict[str, dict[str, str]]:
    """kohya module name -> {role: key}; any key no dialect places is an error."""
    others = [d for d in DIALECTS.values() if d is not dialect]
    roles: dict[str, dict[str, str]] = {}
    unknown = []
    for key in keys:
        found = dialect.parse(key) or next((p for d in others if (p := d.parse(key))), None)
        if found is None:
            unknown.append(key)
            continue
        module, role = found
        twin = roles.setdefault(module, {}).setdefault(role, key)
        if twin != key:
            raise _fail(path, f"has module {module}'s {role} twice, as {brief(twin)} and {brief(key)}")
    if unknown:
        sd1 = [k for k in unknown if SD1_NAMES.match(k)]
        if sd1:
            raise _fail(path, f"is an SD 1.x adapter, not SDXL (its module names are SD 1.x's: {_listing(sd1)})")
        known_module = [k for k in unknown if _known_module_prefix(k)]
        if known_module:
            raise _fail(path, f"has {len(known_module)} tensor(s) of SDXL modules in a role no loader we write for "
                              f"knows: {_listing(known_module)}")
        names = sorted({(dialect.split(k) or (k, ""))[0] for k in unknown})
        raise _fail(path, f"has {len(names)} module name(s) that are not SDXL modules in any known dialect "
                          f"(guessed dialect: {dialect.name}): {_listing(names)}")
    return roles


def _listing(items: list[str]) -> str:
    shown = ", ".join(brief(item) for item in sorted(items)[:UNKNOWN_LISTED])
    return shown + (f" and {len(items) - UNKNOWN_LISTED} more" if len(items) > UNKNOWN_LISTED else "")


def _known_module_prefix(key: str) -> bool:
    """True when `key` is an SDXL module's name (in any dialect) followed by a role we do not know."""
    dots = [i for i, c in enumerate(key) if c == "."]
    return any(key[:i] in d.modules for d in DIALECTS.values() for i in dots)


def _peft_alphas(path: str, metadata: Mapping[str, str], modules: Mapping[str, Module]) -> dict[str, float]:
    """kohya name -> alpha from diffusers' `lora_adapter_metadata` (per component `r`, `lora_alpha` and
    `alpha_pattern`), for the modules of a PEFT file; empty when the file carries none."""
    raw = metadata.get(PEFT_CONFIG_KEY)
    if not raw:
        return {}
    try:
        config = strict_json.loads(raw)
    except strict_json.JSONError as e:
        raise _fail(path, f"has a {PEFT_CONFIG_KEY} entry that is not JSON ({e})") from None
    if not isinstance(config, dict):
        raise _fail(path, f"has a {PEFT_CONFIG_KEY} entry that is not a JSON object ({brief(config)})")
    alphas = {}
    for name, module in modules.items():
        prefix = PEFT_PREFIXES[module.component]
        pattern = config.get(f"{prefix}.alpha_pattern") or {}
        if not isinstance(pattern, dict):
            raise _fail(path, f"has a {PEFT_CONFIG_KEY} whose {prefix}.alpha_pattern is not an object "
                              f"({brief(pattern)})")
        default = (f"{prefix}.lora_alpha", config.get(f"{prefix}.lora_alpha"))
        entry, value = next(((f"{prefix}.alpha_pattern[{e!r}]", v) for e, v in pattern.items()
                             if peft_config_names(e, module)), default)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise _fail(path, f"has a {PEFT_CONFIG_KEY} whose {entry} is not a number ({brief(value)})")
            alphas[name] = float(value)
    return alphas


def _alpha(path: str, f: SafetensorsFile, name: str, key: str) -> float:
    """A module's alpha tensor as a number: one finite value of a numeric dtype."""
    info = f.tensors[key]
    count = math.prod(info.shape)
    if count != 1:
        raise _fail(path, f"module {name}: alpha {list(info.shape)} has {count} values, not one")
    if info.dtype == "BOOL":
        raise _fail(path, f"module {name}: alpha is a bool tensor, not a number")
    value = f.read(key).float().item()
    if not math.isfinite(value):
        raise _fail(path, f"module {name}: alpha is {value}")
    return value


# Per algorithm: (rows, columns) of the weight its factors rebuild, from the roles' shapes, columns
# counting the kernel (in * kh * kw); and the pairs of dimensions that must agree (ranks).
def _lora_size(s: Mapping[str, tuple[int, ...]]) -> tuple[int, int]:
    kernel = s["lora_mid"][2:] if "lora_mid" in s else s["lora_down"][2:]
    return s["lora_up"][0], s["lora_down"][1] * math.prod(kernel)


def _lokr_side(s: Mapping[str, tuple[int, ...]], w: str) -> tuple[int, int]:
    if w in s:
        return s[w][0], math.prod(s[w][1:])
    a, b = s[w + "_a"], s[w + "_b"]
    if w == "lokr_w2" and "lokr_t2" in s:  # Tucker: t2 (r, r, kh, kw), w2_a (r, b), w2_b (r, d)
        return a[1], b[1] * math.prod(s["lokr_t2"][2:])
    return a[0], math.prod(b[1:])


def _lokr_size(s: Mapping[str, tuple[int, ...]]) -> tuple[int, int]:
    (a, c), (b, d) = _lokr_side(s, "lokr_w1"), _lokr_side(s, "lokr_w2")
    return a * b, c * d


def _loha_size(s: Mapping[str, tuple[int, ...]]) -> tuple[int, int]:
    if "hada_t1" in s:  # Tucker: t1 (r, r, kh, kw), w1_a (r, out), w1_b (r, in)
        return s["hada_w1_a"][1], s["hada_w1_b"][1] * math.prod(s["hada_t1"][2:])
    return s["hada_w1_a"][0], math.prod(s["hada_w1_b"][1:])


def _diff_size(s: Mapping[str, tuple[int, ...]]) -> tuple[int, int] | None:
    return (s["diff"][0], math.prod(s["diff"][1:])) if "diff" in s else None


SIZES: dict[str, Callable[[Mapping[str, tuple[int, ...]]], tuple[int, int] | None]] = {
    "lora": _lora_size, "lokr": _lokr_size, "loha": _loha_size, "diff": _diff_size,
}
# Dimensions that must be equal: ((role, dim), (role, dim)), checked when both roles are present.
RANK_PAIRS: dict[str, tuple[tuple[tuple[str, int], tuple[str, int]], ...]] = {
    "lora": ((("lora_up", 1), ("lora_down", 0)), (("lora_mid", 0), ("lora_down", 0))),
    "lokr": ((("lokr_w1_a", 1), ("lokr_w1_b", 0)),),
    "loha": ((("hada_w1_a", 1), ("hada_w1_b", 0)), (("hada_w2_a", 1), ("hada_w2_b", 0))),
    "diff": (),
}


def _check_module(path: str, module: AdapterModule, target: Module | None) -> None:
    roles = set(module.keys)
    for choice in REQUIRED_ROLES[module.algorithm]:
        if not roles.intersection(choice):
            raise _fail(path, f"module {module.name} ({module.algorithm}) has no {' or '.join(choice)} tensor")
    for whole, pair in WHOLE_OR_PAIR.get(module.algorithm, ()):
        halves = sorted(roles.intersection(pair))
        if whole in roles and halves:
            raise _fail(path, f"module {module.name} has both {whole} and {', '.join(halves)}: one factor "
                              "spelled twice")
        if len(halves) == 1:
            raise _fail(path, f"module {module.name} has {halves[0]} without its other half")
    s = module.shapes
    for role, shape in s.items():
        if role in ROLE_NDIMS and len(shape) not in ROLE_NDIMS[role]:
            raise _fail(path, f"module {module.name}: {role} {list(shape)} is {len(shape)}-D, not "
                              f"{' or '.join(f'{n}-D' for n in ROLE_NDIMS[role])}")
        if role != "alpha" and 0 in shape:
            raise _fail(path, f"module {module.name}: {role} {list(shape)} is empty (rank 0)")
    for (ra, da), (rb, db) in RANK_PAIRS[module.algorithm]:
        if ra in s and rb in s and not (module.algorithm == "loha" and "hada_t1" in s):
            if len(s[ra]) <= da or len(s[rb]) <= db or s[ra][da] != s[rb][db]:
                raise _fail(path, f"module {module.name}: {ra} {list(s[ra])} and {rb} {list(s[rb])} "
                                  "disagree on the rank")
    if target is None:
        return
    size = SIZES[module.algorithm](s)
    expected = (target.shape[0], math.prod(target.shape[1:]))
    if size is not None and size != expected:
        raise _fail(path, f"module {module.name} rebuilds a {size[0]}x{size[1]} weight, but the checkpoint's "
                          f"{target.key} is {'x'.join(map(str, target.shape))}")
    if "diff" in s and s["diff"] != target.shape:
        raise _fail(path, f"module {module.name}: diff {list(s['diff'])} is not the weight's shape "
                          f"{list(target.shape)}")


def open_adapter(path: str | os.PathLike, *, base: Mapping[str, HasShape] | None = None) -> AdapterFile:
    """Read an adapter file's header into modules keyed by kohya name. With `base` (a checkpoint's
    header: key -> info with `.shape`), every module's factors must also fit that checkpoint's weight."""
    path = os.fspath(path)
    with SafetensorsFile(path) as f:
        keys = f.keys()
        if not keys:
            raise _fail(path, "holds no tensors, so it is not an adapter")
        if _is_checkpoint(keys):
            raise _fail(path, "is a checkpoint, not an adapter (it has model weights such as "
                              f"{brief(next(k for k in keys if _is_checkpoint([k])))})")
        dialect = _guess_dialect(keys)
        placed = _place_keys(path, keys, dialect)
        targets = modules_by_name(base) if base is not None else None
        inventory = reference_modules()
        peft_alphas = _peft_alphas(path, f.metadata, {n: inventory[n] for n in placed})
        modules = {}
        for name, roles in placed.items():
            algorithm = algorithm_of(roles)
            if algorithm is None:
                raise _fail(path, f"module {name} has only {', '.join(sorted(roles))}: no weights to apply")
            mixed = [a for a, rs in ALGORITHM_ROLES.items() if a != algorithm and set(roles).intersection(rs)]
            if mixed:
                raise _fail(path, f"module {name} mixes {algorithm} and {mixed[0]} tensors")
            alpha = _alpha(path, f, name, roles["alpha"]) if "alpha" in roles else peft_alphas.get(name)
            module = AdapterModule(name, algorithm, dict(roles), alpha,
                                   {role: tuple(f.tensors[key].shape) for role, key in roles.items()})
            if targets is not None and name not in targets:
                raise _fail(path, f"module {name} is not in the checkpoint (its component is missing)")
            _check_module(path, module, targets[name] if targets is not None else None)
            modules[name] = module
        return AdapterFile(path, dialect.name, modules, dict(f.metadata), dict(f.tensors))
