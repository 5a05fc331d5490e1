"""SDXL's conditioning: prompts -> the UNet's cross-attention context and its `y` vector (docs/models.md).

    context [B, 77·k, 2048] = CLIP-L hidden state 11 ‖ OpenCLIP-G hidden state 31 (both the penultimate layer's
                              output, no final LayerNorm), one 77-token chunk after another (k chunks)
    pooled  [B, 1280]       = OpenCLIP-G's end token after the final LayerNorm, @ text_projection (first chunk)
    y       [B, 2816]       = pooled ‖ six 256-wide sinusoidal embeddings of original size (h, w), crop (top, left)
                              and target size (h, w)

A prompt longer than 75 tokens is cut into 75-token chunks, each wrapped in start/end tokens and encoded on its
own, the chunks' hidden states concatenated along the sequence (A1111's convention); every prompt of a batch is
padded with empty chunks to the same count. Emphasis (lineage.train.prompts) multiplies each token's hidden
states by its weight, then rescales the chunk so that its mean is what it was before, as A1111 does.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from lineage.errors import LineageError
from lineage.train.prompts import parse_emphasis
from lineage.train.sdxl import SDXL
from lineage.train.text_encoders import CLIPTextL, OpenCLIPTextG
from lineage.train.tokenizer import CONTEXT_LENGTH, SDXLTokenizer
from lineage.train.unet import timestep_embedding

CHUNK_TOKENS = CONTEXT_LENGTH - 2  # 75 prompt tokens between the start and end tokens
# A1111's default: a full chunk whose last comma is at most this many tokens from its end is cut after
# that comma, so that the tag after it is not split between two chunks.
COMMA_BACKTRACK = 20
MAX_PROMPT_TOKENS = 1000  # beyond this a prompt is a mistake (a pasted file), not a description
SIZE_EMBEDDING_WIDTH = 256  # SDXL's width per size/crop value
SIZE_VALUES = 6  # original height, width, crop top, left, target height, width


class TokenizedPrompts(NamedTuple):
    clip_l_ids: torch.Tensor  # [B, k, 77] long, padded with the end token
    clip_g_ids: torch.Tensor  # [B, k, 77] long, padded with id 0
    weights: torch.Tensor  # [B, k, 77] float: each token's emphasis (1 for start, end and padding)


def prompt_chunks(tokenizer: SDXLTokenizer, prompt: str) -> list[list[tuple[int, float]]]:
    """The (token id, weight) chunks of one prompt, at most 75 tokens each, without start/end tokens.
    An empty prompt is one empty chunk (start, end, padding), as SDXL encodes it."""
    pieces = parse_emphasis(prompt)
    tokenized = [(tokenizer.encode(p.text), p) for p in pieces]
    total = sum(len(ids) for ids, _ in tokenized)
    if total > MAX_PROMPT_TOKENS:
        raise LineageError(f"the prompt has {total} tokens; at most {MAX_PROMPT_TOKENS} are accepted "
                           f"(starting {prompt[:40]!r})")
    chunks: list[list[tuple[int, float]]] = []
    current: list[tuple[int, float]] = []
    last_comma = None  # index in `current` of its last comma, if any
    for ids, piece in tokenized:
        if piece.chunk_break:
            chunks.append(current)
            current, last_comma = [], None
        for token in ids:
            if token == tokenizer.comma_id:
                last_comma = len(current)
            elif len(current) == CHUNK_TOKENS and last_comma is not None and \
                    CHUNK_TOKENS - last_comma <= COMMA_BACKTRACK:
                # A1111: end the full chunk at its last comma, carry the words after it to the next chunk
                chunks.append(current[:last_comma + 1])
                current, last_comma = current[last_comma + 1:], None
            if len(current) == CHUNK_TOKENS:
                chunks.append(current)
                current, last_comma = [], None
            current.append((token, piece.weight))
    if current or not chunks:
        chunks.append(current)
    return chunks


def tokenize_prompts(tokenizer: SDXLTokenizer, prompts: Sequence[str]) -> TokenizedPrompts:
    """Every prompt's chunks as 77-token rows, all prompts padded with empty chunks to the same count."""
    if isinstance(prompts, str):
        raise LineageError("encode_prompts takes a list of prompts, not one string")
    if not prompts:
        raise LineageError("no prompt to encode")
    per_prompt = [prompt_chunks(tokenizer, p) for p in prompts]
    count = max(len(chunks) for chunks in per_prompt)
    rows_l, rows_g, rows_w = [], [], []
    for chunks in per_prompt:
        for chunk in chunks + [[]] * (count - len(chunks)):
            pad = CHUNK_TOKENS - len(chunk)
            ids = [tokenizer.start_id, *(token for token, _ in chunk), tokenizer.end_id]
            rows_l.append(ids + [tokenizer.clip_l_pad_id] * pad)
            rows_g.append(ids + [tokenizer.clip_g_pad_id] * pad)
            rows_w.append([1.0, *(weight for _, weight in chunk), 1.0] + [1.0] * pad)
    shape = (len(prompts), count, CONTEXT_LENGTH)
    return TokenizedPrompts(torch.tensor(rows_l).view(shape), torch.tensor(rows_g).view(shape),
                            torch.tensor(rows_w, dtype=torch.float32).view(shape))


def emphasize(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[N, 77, C] hidden states scaled per token by weights [N, 77], each chunk's mean restored (A1111)."""
    weights = weights.to(hidden.dtype)
    original_mean = hidden.mean(dim=(1, 2), keepdim=True)
    weighted = hidden * weights[..., None]
    return weighted * (original_mean / weighted.mean(dim=(1, 2), keepdim=True))


def text_encoders(model: SDXL) -> tuple[CLIPTextL, OpenCLIPTextG]:
    clip_l, clip_g = model.clip_l, model.clip_g
    if clip_l is None or clip_g is None:
        missing = " and ".join(name for name, part in (("CLIP-L", clip_l), ("OpenCLIP-G", clip_g)) if part is None)
        raise LineageError(f"the checkpoint has no {missing} text encoder: prompts cannot be encoded "
                           "(the UNet and VAE still load)")
    return clip_l, clip_g


def encode_prompts(model: SDXL, prompts: Sequence[str], *,
                   tokenizer: SDXLTokenizer | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(context [B, 77·k, 2048], pooled [B, 1280]) of a batch of prompts, on the text encoders' device and dtype.
    `tokenizer` defaults to CLIP's vocabulary shipped with lineage, sized to the model's embedding table."""
    clip_l, clip_g = text_encoders(model)
    vocab_size = min(clip_l.config.vocab_size, clip_g.config.vocab_size)
    tokenizer = tokenizer or SDXLTokenizer.default(vocab_size)
    if tokenizer.bpe.vocab_size > vocab_size:
        raise LineageError(f"the tokenizer has {tokenizer.bpe.vocab_size} tokens but the text encoders "
                           f"only {vocab_size}: use the model's own tokenizer")
    tokens = tokenize_prompts(tokenizer, prompts)
    batch, chunks, _ = tokens.clip_l_ids.shape
    device = clip_l.text_model.embeddings.token_embedding.weight.device
    weights = tokens.weights.flatten(0, 1).to(device)
    clip_l_out = clip_l(tokens.clip_l_ids.flatten(0, 1).to(device))
    clip_g_out = clip_g(tokens.clip_g_ids.flatten(0, 1).to(device))
    context = torch.cat([emphasize(clip_l_out.hidden_states[-2], weights),
                         emphasize(clip_g_out.hidden_states[-2], weights)], dim=-1)
    pooled = clip_g_out.pooled.unflatten(0, (batch, chunks))[:, 0]  # the first chunk's, as A1111
    return context.unflatten(0, (batch, chunks)).flatten(1, 2), pooled


def encode_with_negatives(model: SDXL, prompts: Sequence[str], negative_prompts: Sequence[str], *,
                          tokenizer: SDXLTokenizer | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(context, pooled, negative context, negative pooled) for classifier-free guidance, all with the same
    chunk count. An empty negative prompt (or only whitespace) gives zeros for its context and pooled vector,
    as SDXL does (diffusers' `force_zeros_for_empty_prompt`, A1111 likewise); an empty positive prompt is encoded."""
    if len(prompts) != len(negative_prompts):
        raise LineageError(f"{len(prompts)} prompts but {len(negative_prompts)} negative prompts")
    context, pooled = encode_prompts(model, [*prompts, *negative_prompts], tokenizer=tokenizer)
    empty = torch.tensor([not p.strip() for p in negative_prompts], device=context.device)
    n = len(prompts)
    negative_context = context[n:].masked_fill(empty[:, None, None], 0)
    negative_pooled = pooled[n:].masked_fill(empty[:, None], 0)
    return context[:n], pooled[:n], negative_context, negative_pooled


def micro_conditioning(pooled: torch.Tensor, *, original_size: tuple[int, int], crop: tuple[int, int] = (0, 0),
                       target_size: tuple[int, int], embedding_width: int = SIZE_EMBEDDING_WIDTH) -> torch.Tensor:
    """y [B, pooled width + 6·embedding_width] (SDXL: 1280 + 6·256 = 2816), the input of the UNet's `label_emb`:
    pooled ‖ the sinusoidal embeddings of (original h, w, crop top, left, target h, w). Sizes are in pixels."""
    values = torch.tensor([*original_size, *crop, *target_size], dtype=torch.float32, device=pooled.device)
    sizes = timestep_embedding(values, embedding_width).flatten().to(pooled.dtype)
    return torch.cat([pooled, sizes.expand(pooled.shape[0], -1)], dim=-1)


def size_embedding_width(model: SDXL) -> int:
    """The width of each size/crop embedding this model's UNet takes (SDXL: 256; less in smaller test models):
    what its `label_emb` input has beyond the pooled vector, shared by the six values."""
    unet, clip_g = model.unet, model.clip_g
    if unet is None or clip_g is None:
        return SIZE_EMBEDDING_WIDTH
    return (unet.config.adm_in_channels - clip_g.config.projection_dim) // SIZE_VALUES
