"""How adapter files name their tensors: one table per key dialect (docs/adapters.md, "Key dialects").

A tensor key is a module name followed by a role suffix. A module name is the dialect's spelling of
one adaptable weight (adapters/modules.py); a role (`lora_down`, `lokr_w1`, `alpha`, ...) is what the
tensor holds for it. Every dialect here is a `Dialect`: how it spells a module (from the SDXL module
inventory) and which suffix each role takes. Detection, the reader, the writer and the compatibility
checks all go through these tables, so a dialect is described once.

- `kohya`: kohya's sd-scripts and LyCORIS: `lora_unet_input_blocks_4_1_..._to_q.lora_down.weight`;
- `peft`: Hugging Face PEFT / diffusers: `unet.down_blocks.1.attentions.0...to_q.lora_A.weight`, text
  encoders under `text_encoder.` / `text_encoder_2.` with Hugging Face CLIP names; alpha lives in the
  `lora_adapter_metadata` header entry, not in the tensors;
- `kohya-diffusers`: kohya's underscore spelling of diffusers block names
  (`lora_unet_down_blocks_1_attentions_0_...`), as diffusers-based trainers write it (read only);
- `lycoris`: SimpleTuner's LyCORIS files, `lycoris_` + the underscored diffusers UNet name (read only).
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from lineage.sdxl.layout import COMPONENT_PREFIXES

from .modules import RULES, Module, reference_modules

# Every role a module's tensors can have (the key suffix after the module name, `.weight` dropped).
ROLES: tuple[str, ...] = (
    "lora_down", "lora_up", "lora_mid", "alpha", "dora_scale",
    "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
    "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
    "diff", "diff_b",
)
# Roles stored as `<role>.weight` (the factors of an nn.Linear / nn.Conv2d in the trainers).
WEIGHT_ROLES: frozenset[str] = frozenset({"lora_down", "lora_up", "lora_mid"})

# Which roles make which algorithm (the first role found decides).
ALGORITHM_ROLES: dict[str, tuple[str, ...]] = {
    "lora": ("lora_down", "lora_up", "lora_mid"),
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
    "diff": ("diff", "diff_b"),
}

# SDXL's UNet in diffusers terms: per resolution level, whether it has attention; two residual blocks
# per level going down, three coming up; a sampler between levels. From it the sgm <-> diffusers block
# prefixes are derived below (input_blocks.4.1 <-> down_blocks.1.attentions.0, ...).
SDXL_LEVEL_ATTENTION: tuple[bool, ...] = (False, True, True)
SDXL_DOWN_LAYERS, SDXL_UP_LAYERS = 2, 3
# Layer names inside a residual block or sampler: sgm -> diffusers.
RESNET_LAYERS: dict[str, str] = {
    "in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut",
    "op": "conv", "conv": "conv",
}
# Component -> the prefix PEFT / diffusers put before a module's path.
PEFT_PREFIXES: dict[str, str] = {"unet": "unet", "clip_l": "text_encoder", "clip_g": "text_encoder_2"}
# diffusers' header entry holding each component's PEFT LoraConfig (r, lora_alpha, alpha_pattern, ...).
PEFT_CONFIG_KEY = "lora_adapter_metadata"
# Leading parts of a path that some library versions have and others not: transformers 4's CLIP text
# models wrap the encoder in `text_model.`, transformers 5's do not.
PEFT_OPTIONAL_ROOTS: tuple[str, ...] = ("text_model.",)


def _sgm_to_diffusers_blocks() -> dict[str, str]:
    levels = len(SDXL_LEVEL_ATTENTION)
    blocks = {"middle_block.0": "mid_block.resnets.0", "middle_block.1": "mid_block.attentions.0",
              "middle_block.2": "mid_block.resnets.1"}
    for level, attention in enumerate(SDXL_LEVEL_ATTENTION):
        for layer in range(SDXL_DOWN_LAYERS):
            n = 1 + level * (SDXL_DOWN_LAYERS + 1) + layer
            blocks[f"input_blocks.{n}.0"] = f"down_blocks.{level}.resnets.{layer}"
            if attention:
                blocks[f"input_blocks.{n}.1"] = f"down_blocks.{level}.attentions.{layer}"
        if level < levels - 1:
            blocks[f"input_blocks.{(level + 1) * (SDXL_DOWN_LAYERS + 1)}.0"] = f"down_blocks.{level}.downsamplers.0"
    for up, attention in enumerate(reversed(SDXL_LEVEL_ATTENTION)):
        for layer in range(SDXL_UP_LAYERS):
            n = up * SDXL_UP_LAYERS + layer
            blocks[f"output_blocks.{n}.0"] = f"up_blocks.{up}.resnets.{layer}"
            if attention:
                blocks[f"output_blocks.{n}.1"] = f"up_blocks.{up}.attentions.{layer}"
        if up < levels - 1:
            last = up * SDXL_UP_LAYERS + SDXL_UP_LAYERS - 1
            blocks[f"output_blocks.{last}.{2 if attention else 1}"] = f"up_blocks.{up}.upsamplers.0"
    return blocks


SGM_TO_DIFFUSERS_BLOCKS: dict[str, str] = _sgm_to_diffusers_blocks()


def module_path(module: Module) -> str:
    """A module's dotted path inside its component: sgm names for the UNet (`input_blocks.4.1.proj_in`),
    Hugging Face CLIP names for both text encoders (`text_model.encoder.layers.0.self_attn.q_proj`)."""
    relative = module.key[len(COMPONENT_PREFIXES[module.component]):]
    for rule in RULES:
        match = rule.pattern.match(relative) if rule.component == module.component else None
        if match:
            part = 0 if module.rows is None else module.rows[0] // module.shape[0]
            return match.expand(rule.names[part])
    raise KeyError(module.name)  # every Module comes from RULES


def diffusers_path(module: Module) -> str:
    """The module's path in diffusers' models: UNet blocks renamed (input_blocks.4.1 -> down_blocks.1.attentions.0,
    in_layers.2 -> conv1, ...); the text encoders' Hugging Face names as they are."""
    path = module_path(module)
    if module.component != "unet":
        return path
    parts = path.split(".")
    block = ".".join(parts[:2]) if parts[0] == "middle_block" else ".".join(parts[:3])
    rest = path[len(block) + 1:]
    return f"{SGM_TO_DIFFUSERS_BLOCKS[block]}.{RESNET_LAYERS.get(rest, rest)}"


def peft_target(module: Module) -> str:
    """How a PEFT config (target_modules, rank_pattern, alpha_pattern) names a module: its diffusers
    path without a root some library versions lack. PEFT matches these names as suffixes of the model's
    own module paths, so the shorter name finds the module under either version."""
    path = diffusers_path(module)
    for root in PEFT_OPTIONAL_ROOTS:
        path = path.removeprefix(root)
    return path


def peft_config_names(entry: str, module: Module) -> bool:
    """True when a PEFT config name (`entry`) designates `module`, by PEFT's rule: the entry is the
    module's path or a dot-separated suffix of it."""
    path = diffusers_path(module)
    return path == entry or path.endswith("." + entry)


@dataclass(frozen=True)
class Dialect:
    """One way of naming adapter tensors: `module_name(module)` spells a module (None: this dialect has
    no name for it), `suffixes` maps each role it can hold to its key suffix."""

    name: str
    module_name: Callable[[Module], str | None]
    suffixes: dict[str, str]
    writable: bool

    def key(self, module: Module, role: str) -> str:
        """The file key of `role` for `module`; KeyError if this dialect cannot hold that role or module."""
        name = self.module_name(module)
        if name is None or role not in self.suffixes:
            raise KeyError(f"{self.name} has no key for {module.name} {role}")
        return name + self.suffixes[role]

    @functools.cached_property
    def modules(self) -> dict[str, str]:
        """This dialect's module name -> kohya module name, over every SDXL module."""
        names = {}
        for module in reference_modules().values():
            name = self.module_name(module)
            if name is not None:
                names[name] = module.name
        return names

    @functools.cached_property
    def _roles_by_suffix(self) -> list[tuple[str, str]]:
        return sorted(((s, r) for r, s in self.suffixes.items()), key=lambda sr: -len(sr[0]))

    def parse(self, key: str) -> tuple[str, str] | None:
        """(kohya module name, role) of a file key in this dialect, or None when it is not one."""
        for suffix, role in self._roles_by_suffix:
            if key.endswith(suffix):
                module = self.modules.get(key[:-len(suffix)])
                if module is not None:
                    return module, role
        return None

    def split(self, key: str) -> tuple[str, str] | None:
        """(module name as spelled in the file, role) by suffix alone, for keys `parse` did not place."""
        for suffix, role in self._roles_by_suffix:
            if key.endswith(suffix) and len(key) > len(suffix):
                return key[:-len(suffix)], role
        return None


KOHYA_SUFFIXES: dict[str, str] = {role: f".{role}.weight" if role in WEIGHT_ROLES else f".{role}" for role in ROLES}
PEFT_SUFFIXES: dict[str, str] = {"lora_down": ".lora_A.weight", "lora_up": ".lora_B.weight"}


def _underscored_diffusers(tag: str, components: Iterable[str]) -> Callable[[Module], str | None]:
    wanted = frozenset(components)

    def name(module: Module) -> str | None:
        if module.component not in wanted:
            return None
        if module.component == "unet":
            return tag + diffusers_path(module).replace(".", "_")
        return module.name
    return name


DIALECTS: dict[str, Dialect] = {d.name: d for d in (
    Dialect("kohya", lambda m: m.name, KOHYA_SUFFIXES, writable=True),
    Dialect("peft", lambda m: f"{PEFT_PREFIXES[m.component]}.{diffusers_path(m)}", PEFT_SUFFIXES, writable=True),
    Dialect("kohya-diffusers", _underscored_diffusers("lora_unet_", ("unet", "clip_l", "clip_g")), KOHYA_SUFFIXES,
            writable=False),
    Dialect("lycoris", _underscored_diffusers("lycoris_", ("unet",)), KOHYA_SUFFIXES, writable=False),
)}
WRITABLE_DIALECTS: tuple[str, ...] = tuple(name for name, d in DIALECTS.items() if d.writable)


def algorithm_of(roles: Iterable[str]) -> str | None:
    """The algorithm a module's roles make (lora, lokr, loha, diff), None for none."""
    present = set(roles)
    return next((a for a, rs in ALGORITHM_ROLES.items() if present.intersection(rs)), None)
