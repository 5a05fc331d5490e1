"""SDXL's two text encoders in plain PyTorch, with the single file's parameter names (docs/models.md).

- CLIP-L (`conditioner.embedders.0.transformer.`): Hugging Face `CLIPTextModel` names
  (`text_model.encoder.layers.N.self_attn.q_proj`, ...), quick-GELU, 12 layers of width 768.
- OpenCLIP-G (`conditioner.embedders.1.model.`): OpenCLIP names, the attention's query, key and value
  fused in one `attn.in_proj_weight` [3·width, width], GELU, 32 layers of width 1280, and a
  `text_projection` applied as `x @ P` to the pooled token.

Both are causal transformers over 77 tokens with pre-norm residual layers. Each returns every hidden
state (the token embeddings, then each layer's output) like Hugging Face's `output_hidden_states`:
SDXL takes the penultimate one of both (CLIP-L layer 11, OpenCLIP-G layer 31), and OpenCLIP-G's
pooled output (the end token of the final-normed last layer, projected). The end token is found as
the highest id, as CLIP does (it is the last entry of the vocabulary).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lineage.train.shapes import Shapes, count, first_divisor, shape


@dataclass(frozen=True)
class CLIPLConfig:
    vocab_size: int = 49408
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_width: int = 3072
    context_length: int = 77

    @classmethod
    def from_shapes(cls, shapes: Shapes) -> CLIPLConfig:
        """The config of a CLIP-L state dict (keys after `conditioner.embedders.0.transformer.`)."""
        vocab, width = shape(shapes, "text_model.embeddings.token_embedding.weight", "CLIP-L text encoder")
        return cls(vocab_size=vocab, width=width,
                   layers=count(shapes, r"text_model\.encoder\.layers\.(\d+)\..*"),
                   heads=_heads(width, cls.width // cls.heads, cls.heads),
                   mlp_width=shape(shapes, "text_model.encoder.layers.0.mlp.fc1.weight", "CLIP-L text encoder")[0],
                   context_length=shape(shapes, "text_model.embeddings.position_embedding.weight",
                                        "CLIP-L text encoder")[0])


@dataclass(frozen=True)
class OpenCLIPGConfig:
    vocab_size: int = 49408
    width: int = 1280
    layers: int = 32
    heads: int = 20
    mlp_width: int = 5120
    context_length: int = 77
    projection_dim: int = 1280

    @classmethod
    def from_shapes(cls, shapes: Shapes) -> OpenCLIPGConfig:
        """The config of an OpenCLIP-G state dict (keys after `conditioner.embedders.1.model.`)."""
        vocab, width = shape(shapes, "token_embedding.weight", "OpenCLIP-G text encoder")
        return cls(vocab_size=vocab, width=width,
                   layers=count(shapes, r"transformer\.resblocks\.(\d+)\..*"),
                   heads=_heads(width, cls.width // cls.heads, cls.heads),
                   mlp_width=shape(shapes, "transformer.resblocks.0.mlp.c_fc.weight", "OpenCLIP-G text encoder")[0],
                   context_length=shape(shapes, "positional_embedding", "OpenCLIP-G text encoder")[0],
                   projection_dim=shape(shapes, "text_projection", "OpenCLIP-G text encoder")[1])


def _heads(width: int, head_width: int, heads: int) -> int:
    """Heads as wide as the reference's (64) where the width allows, else the reference's head count."""
    return width // first_divisor([width], (head_width, width // heads if width % heads == 0 else 0))


class TextOutput(NamedTuple):
    hidden_states: tuple[torch.Tensor, ...]  # [B, T, width] each: the embeddings, then every layer's output
    last_hidden_state: torch.Tensor  # the last layer's output after the final LayerNorm
    pooled: torch.Tensor  # the end token of last_hidden_state (OpenCLIP-G: projected by text_projection)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """The GELU approximation OpenAI's CLIP was trained with."""
    return x * torch.sigmoid(1.702 * x)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, T, width] query/key/value -> [B, T, width]: each token attends to itself and the ones before."""
    q, k, v = (x.unflatten(-1, (heads, -1)).transpose(1, 2) for x in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(2)


class TextEncoder(nn.Module):
    """What both encoders share: run the layers, keep every hidden state, pool at the end token."""

    gradient_checkpointing = False

    def run_layers(self, x: torch.Tensor, layers: nn.ModuleList) -> list[torch.Tensor]:
        hidden = [x]
        for layer in layers:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
            hidden.append(x)
        return hidden

    @staticmethod
    def end_tokens(x: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        return x[torch.arange(x.shape[0], device=x.device), input_ids.argmax(dim=-1)]


# -- CLIP-L: Hugging Face CLIPTextModel names ----------------------------------------------------------

class CLIPAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj = nn.Linear(width, width), nn.Linear(width, width)
        self.v_proj, self.out_proj = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(causal_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads))


class CLIPMLP(nn.Module):
    def __init__(self, width: int, mlp_width: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, mlp_width), nn.Linear(mlp_width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(quick_gelu(self.fc1(x)))


class CLIPLayer(nn.Module):
    def __init__(self, c: CLIPLConfig):
        super().__init__()
        self.self_attn = CLIPAttention(c.width, c.heads)
        self.layer_norm1 = nn.LayerNorm(c.width)
        self.mlp = CLIPMLP(c.width, c.mlp_width)
        self.layer_norm2 = nn.LayerNorm(c.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Module):
    def __init__(self, c: CLIPLConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(c.vocab_size, c.width)
        self.position_embedding = nn.Embedding(c.context_length, c.width)
        # Kept because single files carry it; positions are computed, not read from it, since merges
        # (A1111's among them) have stored damaged copies of it (fractional or shuffled ids).
        self.register_buffer("position_ids", torch.arange(c.context_length).unsqueeze(0))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.token_embedding(input_ids) + self.position_embedding(positions)


class CLIPTextL(TextEncoder):
    """CLIP ViT-L/14's text encoder: input_ids [B, T] -> TextOutput (pooled not projected, as CLIPTextModel)."""

    def __init__(self, config: CLIPLConfig | None = None):
        super().__init__()
        self.config = config = config or CLIPLConfig()  # SDXL 1.0 base by default
        self.text_model = nn.Module()
        self.text_model.embeddings = CLIPEmbeddings(config)
        self.text_model.encoder = nn.Module()
        self.text_model.encoder.layers = nn.ModuleList(CLIPLayer(config) for _ in range(config.layers))
        self.text_model.final_layer_norm = nn.LayerNorm(config.width)

    def forward(self, input_ids: torch.Tensor) -> TextOutput:
        m = self.text_model
        hidden = self.run_layers(m.embeddings(input_ids), m.encoder.layers)
        last = m.final_layer_norm(hidden[-1])
        return TextOutput(tuple(hidden), last, self.end_tokens(last, input_ids))


# -- OpenCLIP-G: OpenCLIP names, fused q/k/v --------------------------------------------------------------

class FusedAttention(nn.Module):
    """nn.MultiheadAttention's parameter names: query, key and value rows stacked in in_proj_weight."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.normal_(self.in_proj_weight, std=1 / math.sqrt(width))
        nn.init.zeros_(self.in_proj_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        return self.out_proj(causal_attention(q, k, v, self.heads))


class OpenCLIPMLP(nn.Module):
    def __init__(self, width: int, mlp_width: int):
        super().__init__()
        self.c_fc, self.c_proj = nn.Linear(width, mlp_width), nn.Linear(mlp_width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class OpenCLIPLayer(nn.Module):
    def __init__(self, c: OpenCLIPGConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(c.width)
        self.attn = FusedAttention(c.width, c.heads)
        self.ln_2 = nn.LayerNorm(c.width)
        self.mlp = OpenCLIPMLP(c.width, c.mlp_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class OpenCLIPTextG(TextEncoder):
    """OpenCLIP ViT-bigG/14's text encoder: input_ids [B, T] -> TextOutput with pooled = end token @ text_projection."""

    def __init__(self, config: OpenCLIPGConfig | None = None):
        super().__init__()
        self.config = config = config or OpenCLIPGConfig()  # SDXL 1.0 base by default
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.positional_embedding = nn.Parameter(torch.empty(config.context_length, config.width))
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(OpenCLIPLayer(config) for _ in range(config.layers))
        self.ln_final = nn.LayerNorm(config.width)
        self.text_projection = nn.Parameter(torch.empty(config.width, config.projection_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's temperature; unused by SDXL
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=config.width ** -0.5)

    def forward(self, input_ids: torch.Tensor) -> TextOutput:
        x = self.token_embedding(input_ids) + self.positional_embedding[: input_ids.shape[1]]
        hidden = self.run_layers(x, self.transformer.resblocks)
        last = self.ln_final(hidden[-1])
        return TextOutput(tuple(hidden), last, self.end_tokens(last, input_ids) @ self.text_projection)
