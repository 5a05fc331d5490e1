"""Keys and dialect headers for the adapter files we write (docs/adapters.md, "Key dialects").

A planner that writes an adapter asks `adapter_key(dialect, module, role)` for each tensor's key, so
every writer spells a dialect through the one table in adapters/dialects.py, and `dialect_metadata`
for the header entries the dialect itself needs: PEFT keeps each module's alpha outside the tensors,
in diffusers' `lora_adapter_metadata` (per component `r`, `lora_alpha`, `rank_pattern`,
`alpha_pattern`, `target_modules`: the `LoraConfig` diffusers builds when loading). kohya keeps alpha
as a tensor (`<module>.alpha`) and needs no entry.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping

from lineage.errors import LineageError

from .dialects import DIALECTS, PEFT_CONFIG_KEY, PEFT_PREFIXES, WRITABLE_DIALECTS, Dialect, peft_target
from .modules import Module, reference_modules


def writable_dialect(name: str) -> Dialect:
    if name not in WRITABLE_DIALECTS:
        raise LineageError(f"cannot write the {name!r} key dialect; choose one of {', '.join(WRITABLE_DIALECTS)}")
    return DIALECTS[name]


def adapter_key(dialect: str, module: Module | str, role: str) -> str:
    """The file key of `role` (lora_down, alpha, lokr_w1, ...) for `module` (a Module or a kohya name)."""
    target = reference_modules()[module] if isinstance(module, str) else module
    try:
        return writable_dialect(dialect).key(target, role)
    except KeyError:
        raise LineageError(f"the {dialect} dialect has no key for {role} (module {target.name})") from None


def lora_shapes(module: Module, rank: int) -> dict[str, tuple[int, ...]]:
    """The shapes kohya's LoRA (and LoCon) store for `module` at `rank`: `lora_down` (r, in) or, for a
    convolution, (r, in, kh, kw) with the layer's own kernel; `lora_up` (out, r), or (out, r, 1, 1) for a
    convolution; `alpha` a scalar. PEFT's lora_A / lora_B have the same shapes."""
    out, inp, kernel = module.shape[0], module.shape[1], tuple(module.shape[2:])
    return {"lora_down": (rank, inp, *kernel), "lora_up": (out, rank, *((1,) * len(kernel))), "alpha": ()}


def _most_common(values: Mapping[str, float]) -> float:
    return Counter(values.values()).most_common(1)[0][0]


def peft_config(ranks: Mapping[str, int], alphas: Mapping[str, float | None]) -> dict[str, object]:
    """diffusers' adapter metadata for a PEFT LoRA of `ranks` (kohya name -> rank) with `alphas` (kohya
    name -> alpha; None means alpha = rank, a scale of 1): per component the most common rank and alpha,
    the others as patterns, each module named as PEFT configs name it (`peft_target`)."""
    inventory = reference_modules()
    config: dict[str, object] = {}
    for component, prefix in PEFT_PREFIXES.items():
        names = [n for n in ranks if inventory[n].component == component]
        if not names:
            continue
        paths = {n: peft_target(inventory[n]) for n in names}
        rank_of = {paths[n]: ranks[n] for n in names}
        alpha_of = {paths[n]: float(alphas.get(n) if alphas.get(n) is not None else ranks[n]) for n in names}
        r, alpha = _most_common(rank_of), _most_common(alpha_of)
        config.update({
            f"{prefix}.r": r,
            f"{prefix}.lora_alpha": alpha,
            f"{prefix}.rank_pattern": {p: v for p, v in rank_of.items() if v != r},
            f"{prefix}.alpha_pattern": {p: v for p, v in alpha_of.items() if v != alpha},
            f"{prefix}.target_modules": sorted(paths.values()),
        })
    return config


def _peft_header(ranks: Mapping[str, int], alphas: Mapping[str, float | None]) -> dict[str, str]:
    return {PEFT_CONFIG_KEY: json.dumps(peft_config(ranks, alphas), indent=2, sort_keys=True)}


# Dialect -> the header entries it needs besides the tensors (dialects not listed need none).
DIALECT_HEADERS: dict[str, Callable[[Mapping[str, int], Mapping[str, float | None]], dict[str, str]]] = {
    "peft": _peft_header,
}


def dialect_metadata(dialect: str, ranks: Mapping[str, int], alphas: Mapping[str, float | None]) -> dict[str, str]:
    """The header entries `dialect` needs for LoRA modules of `ranks` and `alphas` (kohya name -> value)."""
    writable_dialect(dialect)
    header = DIALECT_HEADERS.get(dialect)
    return header(ranks, alphas) if header else {}


# Modules that one loader applies only together: A1111 patches OpenCLIP-G attention (one fused
# MultiheadAttention) from an adapter only when q, k, v and out of that layer are all present.
ALL_OR_NONE_GROUPS: tuple[tuple[re.Pattern[str], tuple[str, ...]], ...] = (
    (re.compile(r"^(lora_te2_text_model_encoder_layers_\d+_self_attn_)(?:q|k|v|out)_proj$"),
     ("q_proj", "k_proj", "v_proj", "out_proj")),
)


def incomplete_groups(names: Iterable[str]) -> dict[str, list[str]]:
    """Modules of `names` whose all-or-none group is incomplete: module -> the group's missing names.
    A writer completes these (e.g. with zero factors) or reports them: A1111 would ignore them."""
    present = set(names)
    incomplete = {}
    for name in sorted(present):
        for pattern, members in ALL_OR_NONE_GROUPS:
            match = pattern.match(name)
            if match:
                missing = [match.group(1) + m for m in members if match.group(1) + m not in present]
                if missing:
                    incomplete[name] = missing
    return incomplete
