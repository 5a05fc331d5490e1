"""Which weights of an SDXL checkpoint an adapter may change, and what each such module is called.

An adapter "module" is one adapted weight, named the way kohya's sd-scripts name it (docs/adapters.md):
the weight's key without its component prefix and `.weight`, dots turned into underscores, behind the
component's tag (`lora_unet_`, `lora_te1_`, `lora_te2_`). OpenCLIP-G (the second text encoder) is stored
in OpenCLIP's layout but adapted under Hugging Face's CLIP names; its fused attention input
`in_proj_weight` is three modules (q, k, v), each a third of its rows.

The inventory is built from a checkpoint header (`sdxl_modules`), so every generated size (tiny, small,
full) gets its own shapes. Which keys are modules, and under which name, is the table `RULES` below.
"""
from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from lineage.errors import LineageError
from lineage.sdxl.layout import COMPONENT_PREFIXES, base_inventory

# Component -> kohya's module-name tag.
COMPONENT_TAGS: dict[str, str] = {"unet": "lora_unet_", "clip_l": "lora_te1_", "clip_g": "lora_te2_"}
ADAPTED_COMPONENTS: tuple[str, ...] = tuple(COMPONENT_TAGS)


@dataclass(frozen=True)
class Rule:
    """Keys of `component` matching `pattern` (relative to the component prefix) are adapted under the
    names `names` (templates on the pattern's groups, in Hugging Face / sgm dotted form). Several names
    split the weight's rows evenly between them, in order. `conv` rules belong to LoCon's extra set:
    adapted only when convolutions are enabled (kohya's `conv_dim`)."""

    component: str
    pattern: re.Pattern[str]
    names: tuple[str, ...]
    conv: bool = False


def _rule(component: str, pattern: str, *names: str, conv: bool = False) -> Rule:
    return Rule(component, re.compile(pattern), names or (r"\1",), conv)


# kohya's default targets: in the UNet the linear layers of every transformer (Transformer2DModel:
# proj_in/out, both attentions, the feed-forward); in the text encoders the attention and MLP layers.
# LoCon adds the residual blocks' layers (ResnetBlock2D: both 3x3 convolutions, the time-embedding
# projection, the 1x1 skip) and the down/up samplers. Never adapted: time_embed, label_emb, conv_in,
# the output convolution, norms, embeddings.
_TEXT_LAYER = r"text_model.encoder.layers.\1"
RULES: tuple[Rule, ...] = (
    _rule("unet", r"^(.*\.(?:transformer_blocks\.\d+\.(?:attn[12]\.(?:to_q|to_k|to_v|to_out\.0)|ff\.net\.(?:0\.proj|2))"
                  r"|proj_in|proj_out))\.weight$"),
    _rule("unet", r"^((?:input_blocks|middle_block|output_blocks)\.[\d.]*"
                  r"(?:in_layers\.2|out_layers\.3|emb_layers\.1|skip_connection|op|conv))\.weight$", conv=True),
    _rule("clip_l", r"^(text_model\.encoder\.layers\.\d+\.(?:self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12]))\.weight$"),
    _rule("clip_g", r"^transformer\.resblocks\.(\d+)\.attn\.in_proj_weight$",
          _TEXT_LAYER + ".self_attn.q_proj", _TEXT_LAYER + ".self_attn.k_proj", _TEXT_LAYER + ".self_attn.v_proj"),
    _rule("clip_g", r"^transformer\.resblocks\.(\d+)\.attn\.out_proj\.weight$", _TEXT_LAYER + ".self_attn.out_proj"),
    _rule("clip_g", r"^transformer\.resblocks\.(\d+)\.mlp\.c_fc\.weight$", _TEXT_LAYER + ".mlp.fc1"),
    _rule("clip_g", r"^transformer\.resblocks\.(\d+)\.mlp\.c_proj\.weight$", _TEXT_LAYER + ".mlp.fc2"),
)


class HasShape(Protocol):
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Module:
    """One adaptable weight: its kohya name, component, checkpoint key, the row slice of that key it
    covers (OpenCLIP-G q/k/v only, else None), its shape ((out, in) or (out, in, kh, kw)) and whether
    it belongs to LoCon's extra (convolution) set."""

    name: str
    component: str
    key: str
    rows: tuple[int, int] | None
    shape: tuple[int, ...]
    conv: bool

    @property
    def spatial(self) -> bool:
        """A convolution with a kernel larger than 1x1 (kohya gives these the conv rank)."""
        return len(self.shape) == 4 and self.shape[2:] != (1, 1)


def kohya_name(component: str, dotted: str) -> str:
    """`lora_unet_` + `input_blocks.4.1.proj_in` with dots as underscores."""
    return COMPONENT_TAGS[component] + dotted.replace(".", "_")


def _modules_of_key(key: str, shape: tuple[int, ...], component: str, conv: bool) -> list[Module]:
    relative = key[len(COMPONENT_PREFIXES[component]):]
    for rule in RULES:
        if rule.component != component or (rule.conv and not conv):
            continue
        match = rule.pattern.match(relative)
        if not match:
            continue
        parts = len(rule.names)
        if shape[0] % parts:
            raise LineageError(f"{key} has {shape[0]} rows, which do not split into {parts} equal parts")
        height = shape[0] // parts
        return [Module(kohya_name(component, match.expand(template)), component, key,
                       (i * height, (i + 1) * height) if parts > 1 else None,
                       (height, *shape[1:]), rule.conv)
                for i, template in enumerate(rule.names)]
    return []


def sdxl_modules(tensors: Mapping[str, HasShape], *, conv: bool = False,
                 components: Iterable[str] = ADAPTED_COMPONENTS) -> list[Module]:
    """The adaptable modules of an SDXL single-file checkpoint whose header is `tensors` (key -> info
    with a `.shape`), in the header's key order: kohya's default set (722 UNet + 72 CLIP-L + 192
    OpenCLIP-G modules at full size), plus LoCon's convolution set when `conv`."""
    wanted = tuple(components)
    unknown = set(wanted) - set(ADAPTED_COMPONENTS)
    if unknown:
        raise LineageError(f"unknown adapter components {sorted(unknown)}; choose from {', '.join(ADAPTED_COMPONENTS)}")
    modules = []
    for key, info in tensors.items():
        component = next((c for c in wanted if key.startswith(COMPONENT_PREFIXES[c])), None)
        if component is not None:
            modules.extend(_modules_of_key(key, tuple(info.shape), component, conv))
    return modules


def modules_by_name(tensors: Mapping[str, HasShape], *, conv: bool = True,
                    components: Iterable[str] = ADAPTED_COMPONENTS) -> dict[str, Module]:
    """`sdxl_modules` keyed by kohya name (with the convolution set by default: for lookups)."""
    return {m.name: m for m in sdxl_modules(tensors, conv=conv, components=components)}


@functools.cache
def reference_modules() -> dict[str, Module]:
    """Every adaptable module of the public SDXL 1.0 base (full-size shapes), convolution set included:
    the names an SDXL adapter may use, when no checkpoint is at hand."""
    return modules_by_name(base_inventory())
