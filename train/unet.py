"""The SDXL UNet in plain PyTorch, with the parameter names of the single-file checkpoint (docs/models.md).

Structure (Stability AI's `sgm` layout, which every SDXL single file uses):

    x ─ input_blocks ─ middle_block ─ output_blocks ─ out ─> prediction
          │ (skips, one per input block) ──────────┘
    t ─ time_embed ─┐
    y ─ label_emb ──┴─ emb: added inside every ResBlock
    context ─ cross-attention of every transformer block (CLIP-L ‖ OpenCLIP-G hidden states)

Each level of `channel_mult` has `num_res_blocks` ResBlocks (each followed by a SpatialTransformer of
`transformer_depth[level]` blocks where that is > 0) and, except the last level, a Downsample. The
output side mirrors it with one extra ResBlock per level, fed by the concatenated skip, and an
Upsample closing every level but the first. `nn.Sequential` indices are the checkpoint's (`in_layers.2`
is a conv because 0 is its GroupNorm and 1 its SiLU), which is why parameter-free layers are kept.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lineage.errors import CheckpointError
from lineage.train.shapes import Shapes, count, first_divisor, norm_groups, shape


@dataclass(frozen=True)
class UNetConfig:
    """SDXL base values by default; the generated test checkpoints use the same structure at smaller widths."""

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 2
    transformer_depth: tuple[int, ...] = (0, 2, 10)  # per level; the middle block uses the last level's
    head_channels: int = 64
    context_dim: int = 2048  # CLIP-L 768 + OpenCLIP-G 1280
    adm_in_channels: int = 2816  # pooled OpenCLIP-G 1280 + 6 size/crop values x 256
    norm_groups: int = 32

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels

    def diffusers_kwargs(self, pooled_width: int = 1280) -> dict:
        """The same UNet as diffusers' `UNet2DConditionModel(**kwargs)` (what our equality tests and the UNet
        benchmark build it with). `pooled_width` is OpenCLIP-G's pooled output, the head of the ADM input; the
        rest is six size/crop embeddings. diffusers' `attention_head_dim` is a head count per level; levels
        without attention get a depth of 1 that their plain blocks ignore."""
        widths = [self.model_channels * m for m in self.channel_mult]
        return dict(
            in_channels=self.in_channels, out_channels=self.out_channels,
            down_block_types=tuple("CrossAttnDownBlock2D" if d else "DownBlock2D" for d in self.transformer_depth),
            up_block_types=tuple("CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(self.transformer_depth)),
            block_out_channels=tuple(widths), layers_per_block=self.num_res_blocks,
            transformer_layers_per_block=tuple(max(d, 1) for d in self.transformer_depth),
            attention_head_dim=tuple(max(w // self.head_channels, 1) for w in widths),
            cross_attention_dim=self.context_dim, use_linear_projection=True, norm_num_groups=self.norm_groups,
            addition_embed_type="text_time", addition_time_embed_dim=(self.adm_in_channels - pooled_width) // 6,
            projection_class_embeddings_input_dim=self.adm_in_channels)

    @classmethod
    def from_shapes(cls, shapes: Shapes) -> UNetConfig:
        """The config of a UNet state dict (keys without the `model.diffusion_model.` prefix)."""
        conv_in = shape(shapes, "input_blocks.0.0.weight", "UNet")
        model_channels = conv_in[0]
        widths, depths, res_blocks = [], [], []
        block = 1
        while f"input_blocks.{block}.0.in_layers.2.weight" in shapes:  # one level per pass
            start = block
            while f"input_blocks.{block}.0.in_layers.2.weight" in shapes:
                block += 1
            res_blocks.append(block - start)
            widths.append(shapes[f"input_blocks.{start}.0.in_layers.2.weight"][0])
            depths.append(count(shapes, rf"input_blocks\.{start}\.1\.transformer_blocks\.(\d+)\..*"))
            block += 1  # the Downsample closing the level
        if not widths or len(set(res_blocks)) != 1:
            raise CheckpointError("not an SDXL UNet: its input blocks do not form levels of equal depth")
        transformer_widths = [w for w, d in zip(widths, depths, strict=True) if d]
        cross_attention = [s for key, s in shapes.items() if key.endswith(".attn2.to_k.weight")]
        skip_widths = [w + v for w in widths for v in widths]  # concatenated inputs of the output ResBlocks
        return cls(
            in_channels=conv_in[1],
            out_channels=shape(shapes, "out.2.weight", "UNet")[0],
            model_channels=model_channels,
            channel_mult=tuple(w // model_channels for w in widths),
            num_res_blocks=res_blocks[0],
            transformer_depth=tuple(depths),
            # SDXL's 64-channel heads, else SDXL's head counts (5, 10, 20 at widths 320, 640, 1280)
            head_channels=first_divisor(transformer_widths, (64, model_channels // 5)),
            context_dim=cross_attention[0][1] if cross_attention else cls.context_dim,
            adm_in_channels=shape(shapes, "label_emb.0.0.weight", "UNet")[1],
            norm_groups=norm_groups([model_channels, *widths, *skip_widths]),
        )


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos | sin] of a batch of (possibly fractional) timesteps, in fp32.
    SDXL also embeds its six size/crop values with it (256 wide each)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    """Two 3x3 convs with the time embedding added between them, plus a (1x1 conv) skip."""

    def __init__(self, channels: int, out_channels: int, emb_dim: int, groups: int):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(groups, channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_channels))
        self.out_layers = nn.Sequential(nn.GroupNorm(groups, out_channels), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = nn.Conv2d(channels, out_channels, 1) if channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Attention(nn.Module):
    """Multi-head attention over `context` (self-attention when it is None); no q/k/v biases in SDXL."""

    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q, k, v = (proj(src).unflatten(-1, (self.heads, -1)).transpose(1, 2)
                   for proj, src in ((self.to_q, x), (self.to_k, context), (self.to_v, context)))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).flatten(2))


class GEGLU(nn.Module):
    """The feed-forward's first layer: one projection to twice the width, half of it gating the other."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Dropout(0.0), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TransformerBlock(nn.Module):
    """Self-attention, cross-attention to the text, GEGLU feed-forward; pre-norm residuals."""

    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.attn1 = Attention(dim, dim, heads)
        self.attn2 = Attention(dim, context_dim, heads)
        self.ff = FeedForward(dim)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """The feature map as a sequence of h*w tokens through `depth` transformer blocks (linear proj in/out)."""

    def __init__(self, channels: int, depth: int, context_dim: int, heads: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList(TransformerBlock(channels, context_dim, heads) for _ in range(depth))
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        return x + self.proj_out(tokens).transpose(1, 2).reshape(b, c, h, w)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Block(nn.ModuleList):
    """One entry of input_blocks / middle_block / output_blocks: its layers in order, each given what it takes."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UNet(nn.Module):
    """SDXL's denoiser: (noisy latent x, timestep t, text context, ADM vector y) -> prediction (ε or v)."""

    def __init__(self, config: UNetConfig | None = None):
        super().__init__()
        self.config = config = config or UNetConfig()  # SDXL 1.0 base by default
        c, mc, emb_dim, groups = config, config.model_channels, config.time_embed_dim, config.norm_groups
        self.gradient_checkpointing = False
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Sequential(nn.Sequential(nn.Linear(c.adm_in_channels, emb_dim), nn.SiLU(),
                                                     nn.Linear(emb_dim, emb_dim)))

        def stage(channels: int, out: int, depth: int) -> list[nn.Module]:
            layers: list[nn.Module] = [ResBlock(channels, out, emb_dim, groups)]
            if depth:
                layers.append(SpatialTransformer(out, depth, c.context_dim, out // c.head_channels, groups))
            return layers

        self.input_blocks = nn.ModuleList([Block([nn.Conv2d(c.in_channels, mc, 3, padding=1)])])
        skip_channels, ch = [mc], mc
        for level, (mult, depth) in enumerate(zip(c.channel_mult, c.transformer_depth, strict=True)):
            for _ in range(c.num_res_blocks):
                self.input_blocks.append(Block(stage(ch, mult * mc, depth)))
                ch = mult * mc
                skip_channels.append(ch)
            if level != len(c.channel_mult) - 1:
                self.input_blocks.append(Block([Downsample(ch)]))
                skip_channels.append(ch)
        self.middle_block = Block([*stage(ch, ch, c.transformer_depth[-1]), ResBlock(ch, ch, emb_dim, groups)])
        self.output_blocks = nn.ModuleList()
        for level in reversed(range(len(c.channel_mult))):
            for i in range(c.num_res_blocks + 1):
                layers = stage(ch + skip_channels.pop(), c.channel_mult[level] * mc, c.transformer_depth[level])
                ch = c.channel_mult[level] * mc
                if level and i == c.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(Block(layers))
        self.out = nn.Sequential(nn.GroupNorm(groups, ch), nn.SiLU(), nn.Conv2d(mc, c.out_channels, 3, padding=1))

    def _run(self, block: Block, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, h, emb, context, use_reentrant=False)
        return block(h, emb, context)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x [B, 4, H, W] noisy latents, t [B] timesteps, context [B, 77·k, 2048], y [B, 2816]."""
        dtype = self.time_embed[0].weight.dtype
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels).to(dtype)) + self.label_emb(y)
        h, skips = x, []
        for block in self.input_blocks:
            h = self._run(block, h, emb, context)
            skips.append(h)
        h = self._run(self.middle_block, h, emb, context)
        for block in self.output_blocks:
            h = self._run(block, torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h)
