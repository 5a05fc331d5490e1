"""The key-matching rules of the loaders our adapter files must load in, reproduced for tests from how
each loader behaves (read in their code; none of it is copied): which keys each would leave unloaded.

- `sdxl_torch_modules`: an SDXL model as torch modules named the way kohya's sd-scripts and LyCORIS see
  it (UNet in sgm names with kohya's block classes, both text encoders as Hugging Face CLIP models, the
  OpenCLIP-G attention split into q/k/v), built from a checkpoint header; LyCORIS' own loader runs on it.
- `kohya_lora_names`: kohya's networks/lora.py module naming (Linear and Conv2d layers inside the target
  block classes), with or without convolutions.
- `comfyui_unloaded`: ComfyUI's key map (built from the model's own weight names, with kohya, diffusers
  and `lycoris_` spellings) and its per-module role matching; returns the keys it would warn about.
- `a1111_unloaded`: A1111's name conversion, including its rule that OpenCLIP-G attention is patched
  only when q, k, v and out of a layer are all present; returns unmatched and silently unapplied keys.
"""
from __future__ import annotations

import re

import torch

UNET = "model.diffusion_model."
CLIP_L = "conditioner.embedders.0.transformer."
CLIP_G = "conditioner.embedders.1.model."

# OpenCLIP-G layer -> Hugging Face CLIP names, as transformers' and ComfyUI's converters rename it.
OPENCLIP_TO_HF = {"attn.out_proj": "self_attn.out_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}


def _hf_clip_g(header):
    """(HF path, shape) of OpenCLIP-G's linear layers with in_proj split into q, k, v."""
    out = {}
    for key, info in header.items():
        m = re.match(re.escape(CLIP_G) + r"transformer\.resblocks\.(\d+)\.(.+)", key)
        if not m or len(info.shape) != 2:
            continue
        layer, rest = m.groups()
        prefix = f"text_model.encoder.layers.{layer}."
        if rest == "attn.in_proj_weight":
            width = info.shape[0] // 3
            for p in "qkv":
                out[prefix + f"self_attn.{p}_proj"] = (width, info.shape[1])
        elif rest.removesuffix(".weight") in OPENCLIP_TO_HF:
            out[prefix + OPENCLIP_TO_HF[rest.removesuffix(".weight")]] = tuple(info.shape)
    return out


def _layers(header, prefix):
    return {k[len(prefix):-len(".weight")]: tuple(i.shape) for k, i in header.items()
            if k.startswith(prefix) and k.endswith(".weight") and len(i.shape) >= 2}


# kohya's SDXL UNet block classes, told by a block's children (sdxl_original_unet.py's names).
def _block_class(children: set[str]) -> str | None:
    if "transformer_blocks" in children:
        return "Transformer2DModel"
    if "in_layers" in children:
        return "ResnetBlock2D"
    if children == {"op"}:
        return "Downsample2D"
    if children == {"conv"}:
        return "Upsample2D"
    return None


_CLASSES: dict[str, type] = {}


def _container(name: str | None) -> torch.nn.Module:
    if name is None:
        return torch.nn.Module()
    cls = _CLASSES.setdefault(name, type(name, (torch.nn.Module,), {}))
    return cls()


def _leaf(shape) -> torch.nn.Module:
    if len(shape) == 2:
        return torch.nn.Linear(shape[1], shape[0], bias=False, device="meta")
    return torch.nn.Conv2d(shape[1], shape[0], tuple(shape[2:]), bias=False, device="meta")


def _tree(layers: dict[str, tuple[int, ...]], class_of) -> torch.nn.Module:
    root = torch.nn.Module()
    paths = sorted(layers)
    children: dict[str, set[str]] = {}
    for path in paths:
        parts = path.split(".")
        for i in range(len(parts)):
            children.setdefault(".".join(parts[:i]), set()).add(parts[i])
    for path in paths:
        node = root
        parts = path.split(".")
        for i, part in enumerate(parts[:-1]):
            here = ".".join(parts[:i + 1])
            if not hasattr(node, part):
                node.add_module(part, _container(class_of(here, children.get(here, set()))))
            node = getattr(node, part)
        node.add_module(parts[-1], _leaf(layers[path]))
    return root


def _unet_class(path, children):
    return _block_class(children) if re.fullmatch(r"(input_blocks\.\d+|middle_block|output_blocks\.\d+)\.\d+", path) \
        else None


def _clip_class(path, children):
    return {"self_attn": "CLIPAttention", "mlp": "CLIPMLP"}.get(path.rsplit(".", 1)[-1])


def sdxl_torch_modules(header):
    """(unet, [clip_l, clip_g]) as meta-device torch modules named as kohya and LyCORIS see them."""
    unet = _tree(_layers(header, UNET), _unet_class)
    clip_l = _tree(_layers(header, CLIP_L), _clip_class)
    clip_g = _tree(_hf_clip_g(header), _clip_class)
    return unet, [clip_l, clip_g]


KOHYA_UNET_TARGETS = ("Transformer2DModel",)
KOHYA_UNET_CONV_TARGETS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
KOHYA_TEXT_TARGETS = ("CLIPAttention", "CLIPMLP")


def kohya_lora_names(header, conv: bool) -> set[str]:
    """kohya networks/lora.py: for each module of a target class, every Linear / Conv2d inside it is a
    LoRA module named prefix + '.' + path with dots as underscores; 3x3 convolutions only with conv_dim."""
    unet, (te1, te2) = sdxl_torch_modules(header)
    names = set()
    roots = [("lora_unet", unet, KOHYA_UNET_TARGETS + (KOHYA_UNET_CONV_TARGETS if conv else ())),
             ("lora_te1", te1, KOHYA_TEXT_TARGETS), ("lora_te2", te2, KOHYA_TEXT_TARGETS)]
    for prefix, root, targets in roots:
        for name, module in root.named_modules():
            if type(module).__name__ not in targets:
                continue
            for child_name, child in module.named_modules():
                is_3x3 = isinstance(child, torch.nn.Conv2d) and child.kernel_size != (1, 1)
                if isinstance(child, (torch.nn.Linear, torch.nn.Conv2d)) and (conv or not is_3x3):
                    names.add(f"{prefix}.{name}.{child_name}".replace(".", "_"))
    return names


# ---------------------------------------------------------------------------------------------
# ComfyUI

CLIP_NAMES = ("mlp.fc1", "mlp.fc2", "self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj", "self_attn.out_proj")
# Per module name x: the keys one adapter type consumes, when its first key is present (first match wins).
COMFY_LORA_FORMS = (
    (".lora_up.weight", (".lora_up.weight", ".lora_down.weight", ".lora_mid.weight")),
    ("_lora.up.weight", ("_lora.up.weight", "_lora.down.weight")),
    (".lora_B.weight", (".lora_B.weight", ".lora_A.weight")),
    (".lora.up.weight", (".lora.up.weight", ".lora.down.weight")),
    (".lora_linear_layer.up.weight", (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight")),
)
COMFY_OTHER = (".alpha", ".dora_scale", ".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".hada_t1", ".hada_t2",
               ".lokr_w1", ".lokr_w2", ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2_a", ".lokr_w2_b", ".lokr_t2",
               ".diff", ".diff_b", ".w_norm", ".b_norm")


def comfyui_key_map(header, diffusers_unet: dict[str, str]) -> dict[str, str]:
    """ComfyUI's adapter module name -> model weight, built from the model's own weights. `diffusers_unet`
    maps diffusers UNet paths to sgm paths (ComfyUI derives it from the UNet config)."""
    key_map = {}
    for path in _layers(header, UNET):
        key_map["lora_unet_" + path.replace(".", "_")] = path
        key_map["diffusion_model." + path] = path  # generic names
    for dpath, sgm in diffusers_unet.items():
        key_map["lora_unet_" + dpath.replace(".", "_")] = sgm
        key_map["lycoris_" + dpath.replace(".", "_")] = sgm
        for prefix in ("", "unet."):
            name = prefix + dpath.replace(".to_", ".processor.to_")
            key_map[name.removesuffix(".0") if name.endswith(".to_out.0") else name] = sgm
    for te, tag, peft, layers in (("clip_l", "lora_te1_", "text_encoder.", _layers(header, CLIP_L)),
                                  ("clip_g", "lora_te2_", "text_encoder_2.", _hf_clip_g(header))):
        for path in layers:
            m = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)", path)
            if m and m.group(2) in CLIP_NAMES:
                name = f"text_model_encoder_layers_{m.group(1)}_{m.group(2).replace('.', '_')}"
                key_map[tag + name] = f"{te}.{path}"
                key_map[peft + path] = f"{te}.{path}"
                if te == "clip_l":
                    key_map["lora_te_" + name] = f"{te}.{path}"
    return key_map


def comfyui_unloaded(keys, key_map) -> set[str]:
    """The keys ComfyUI's loader would report as "lora key not loaded"."""
    keys = set(keys)
    loaded = set()
    for x in key_map:
        for first, consumed in COMFY_LORA_FORMS:
            if x + first in keys:
                loaded.update(x + s for s in consumed if x + s in keys)
                break
        loaded.update(x + s for s in COMFY_OTHER if x + s in keys)
    return keys - loaded


# ---------------------------------------------------------------------------------------------
# A1111

A1111_TE2 = re.compile(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)")
A1111_X_PROJ = re.compile(r"(.*)_([qkv]_proj)$")
A1111_TE2_ATTENTION = re.compile(r"(1_model_transformer_resblocks_\d+_attn)_([qkv]_proj|out_proj)")
A1111_PARTS = {"lora_up.weight", "lora_down.weight", "lora_mid.weight", "alpha", "dora_scale", "diff", "diff_b",
               "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "lokr_w1", "lokr_w2",
               "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}


def a1111_module_names(header) -> set[str]:
    """A1111's network_layer_mapping names: the single-file model's module paths, dots as underscores
    (UNet under `diffusion_model_`, text encoders under `0_` / `1_` of the conditioner's embedders)."""
    names = set()
    for key in header:
        if not key.endswith((".weight", "_weight")):
            continue
        if key.startswith("model."):
            path = key[len("model."):]
        elif key.startswith("conditioner.embedders."):
            path = key[len("conditioner.embedders."):]
        else:
            continue
        module = path.rsplit(".", 1)[0]
        names.add(module.replace(".", "_"))
    return names


def _a1111_convert(name: str) -> str:
    m = A1111_TE2.fullmatch(name)
    if m:
        layer, rest = m.groups()
        rest = rest.replace("mlp_fc1", "mlp_c_fc").replace("mlp_fc2", "mlp_c_proj").replace("self_attn", "attn")
        return f"1_model_transformer_resblocks_{layer}_{rest}"
    return name


def a1111_unloaded(keys, header) -> set[str]:
    """Keys A1111 leaves unmatched, or matches but never applies (OpenCLIP-G q/k/v without all four of a
    layer's q, k, v and out)."""
    mapping = a1111_module_names(header)
    unloaded, matched = set(), {}
    for key in keys:
        name, _, part = key.partition(".")
        converted = _a1111_convert(name)
        found = converted in mapping
        if not found:
            m = A1111_X_PROJ.match(converted)
            found = bool(m) and m.group(1) in mapping
        if not found and name.startswith("lora_unet_"):
            found = name.replace("lora_unet", "diffusion_model", 1) in mapping
        elif not found and name.startswith("lora_te1_text_model"):
            found = name.replace("lora_te1_text_model", "0_transformer_text_model", 1) in mapping
        if not found or part not in A1111_PARTS:
            unloaded.add(key)
        else:
            matched.setdefault(converted, []).append(key)
    # OpenCLIP-G attention is one MultiheadAttention: A1111 patches it only from all four of q, k, v, out
    groups: dict[str, list[str]] = {}
    for converted in matched:
        m = A1111_TE2_ATTENTION.fullmatch(converted)
        if m:
            groups.setdefault(m.group(1), []).append(m.group(2))
    for attention, parts in groups.items():
        if set(parts) != {"q_proj", "k_proj", "v_proj", "out_proj"}:
            for part in parts:
                unloaded.update(matched[f"{attention}_{part}"])
    return unloaded
