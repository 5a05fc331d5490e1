"""Block tables for per-block ("MBW") merges, as data (docs/blocks.md).

Each scheme is an ordered list of (regular expression on the full single-file key, block name)
rules; the first rule that matches names the key's block. A block template may use the first
captured group as a number (`IN{0:02d}`). A key that matches no rule, or a rule whose block is
None, is "not merged" by that scheme: a block merge keeps the first model's tensor.
"""
from __future__ import annotations

import functools
import re

UNET = r"model\.diffusion_model\."
TEXT = r"conditioner\.embedders\.\d+\."
CLIP_L = r"conditioner\.embedders\.0\."
CLIP_G = r"conditioner\.embedders\.1\."
VAE = r"first_stage_model\."

# supermerger merges only keys with "weight" or "bias" in their names: the others (OpenCLIP-G's
# `positional_embedding` and `text_projection`) keep model A's tensor. Matches exactly those keys.
NEITHER_WEIGHT_NOR_BIAS = r"(?!.*(?:weight|bias))"

_UNET_LEVELS = [
    (UNET + r"input_blocks\.(\d+)\.", "IN{0:02d}"),
    (UNET + r"middle_block\.", "M00"),
    (UNET + r"output_blocks\.(\d+)\.", "OUT{0:02d}"),
    (UNET + r"out\.", "OUT08"),
]

SCHEMES: dict[str, list[tuple[str, str | None]]] = {
    # sd-webui-supermerger since 2025-11: 20 values BASE, IN00..IN08, M00, OUT00..OUT08.
    # time_embed/label_emb follow IN00; the text encoders and the VAE take BASE.
    "supermerger": [
        (NEITHER_WEIGHT_NOR_BIAS, None),
        (TEXT, "BASE"),
        (VAE, "BASE"),
        (UNET + r"(?:time_embed|label_emb)\.", "IN00"),
        *_UNET_LEVELS,
    ],
    # supermerger before 2025-11: the same 20 values, but time_embed/label_emb were not merged.
    "supermerger-legacy": [
        (NEITHER_WEIGHT_NOR_BIAS, None),
        (TEXT, "BASE"),
        (VAE, "BASE"),
        (UNET + r"(?:time_embed|label_emb)\.", None),
        *_UNET_LEVELS,
    ],
    # sd-mecha: text encoders and time/label embeddings in BASE, the VAE in a block of its own.
    "sd-mecha": [
        (TEXT, "BASE"),
        (VAE, "VAE"),
        (UNET + r"(?:time_embed|label_emb)\.", "BASE"),
        *_UNET_LEVELS,
    ],
    # ComfyUI's ModelMergeSDXL: one slider per UNet prefix; text encoders and VAE are not merged.
    "comfyui": [
        (UNET + r"time_embed\.", "time_embed."),
        (UNET + r"label_emb\.", "label_emb."),
        (UNET + r"input_blocks\.(\d+)\.", "input_blocks.{0}"),
        (UNET + r"middle_block\.(\d+)\.", "middle_block.{0}"),
        (UNET + r"output_blocks\.(\d+)\.", "output_blocks.{0}"),
        (UNET + r"out\.", "out."),
    ],
    # Ours, the finest: every UNet block, the three middle parts, and each component on its own.
    "lineage": [
        (CLIP_L, "CLIP_L"),
        (CLIP_G, "CLIP_G"),
        (VAE, "VAE"),
        (UNET + r"time_embed\.", "TIME"),
        (UNET + r"label_emb\.", "LABEL"),
        (UNET + r"input_blocks\.(\d+)\.", "IN{0:02d}"),
        (UNET + r"middle_block\.(\d+)\.", "M{0:02d}"),
        (UNET + r"output_blocks\.(\d+)\.", "OUT{0:02d}"),
        (UNET + r"out\.", "OUT"),
    ],
}

# The block names of each scheme in their conventional order (supermerger's 20-value string order).
BLOCK_NAMES: dict[str, list[str]] = {
    "supermerger": ["BASE", *(f"IN{i:02d}" for i in range(9)), "M00", *(f"OUT{i:02d}" for i in range(9))],
    "sd-mecha": ["BASE", *(f"IN{i:02d}" for i in range(9)), "M00", *(f"OUT{i:02d}" for i in range(9)), "VAE"],
    "comfyui": ["time_embed.", "label_emb.", *(f"input_blocks.{i}" for i in range(9)),
                *(f"middle_block.{i}" for i in range(3)), *(f"output_blocks.{i}" for i in range(9)), "out."],
    "lineage": ["CLIP_L", "CLIP_G", "TIME", "LABEL", *(f"IN{i:02d}" for i in range(9)),
                *(f"M{i:02d}" for i in range(3)), *(f"OUT{i:02d}" for i in range(9)), "OUT", "VAE"],
}
BLOCK_NAMES["supermerger-legacy"] = BLOCK_NAMES["supermerger"]


@functools.cache
def _compiled(scheme: str) -> list[tuple[re.Pattern[str], str | None]]:
    if scheme not in SCHEMES:
        raise KeyError(f"unknown block scheme {scheme!r}; known: {', '.join(SCHEMES)}")
    return [(re.compile(pattern), block) for pattern, block in SCHEMES[scheme]]


def block_of(key: str, scheme: str = "lineage") -> str | None:
    """The block a single-file SDXL key belongs to in `scheme`, or None if the scheme leaves it unmerged."""
    for pattern, block in _compiled(scheme):
        m = pattern.match(key)
        if m:
            if block is None:
                return None
            return block.format(*(int(g) for g in m.groups()))
    return None
