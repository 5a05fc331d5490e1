"""SDXL's VAE (autoencoder KL) in plain PyTorch, with the single file's parameter names (docs/models.md).

image [B, 3, H, W] in [-1, 1] ── encoder ── quant_conv ──> mean, logvar [B, 4, H/8, W/8]
latent [B, 4, H/8, W/8] ── post_quant_conv ── decoder ──> image

The encoder halves the resolution at every level of `channel_mult` but the last; the decoder mirrors
it (with one more ResnetBlock per level). Both have a single-head self-attention block in the middle.
Latents are multiplied by `scale_factor` (0.13025 for SDXL) before the UNet sees them; encode and
decode here work on unscaled latents, as diffusers' AutoencoderKL does.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lineage.train.shapes import Shapes, count, norm_groups, shape
from lineage.train.unet import Upsample  # the UNet's own: nearest x2, then a 3x3 conv named `conv`


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    norm_groups: int = 32
    scale_factor: float = 0.13025

    @classmethod
    def from_shapes(cls, shapes: Shapes) -> VAEConfig:
        """The config of a VAE state dict (keys after `first_stage_model.`)."""
        conv_in = shape(shapes, "encoder.conv_in.weight", "VAE")
        levels = count(shapes, r"encoder\.down\.(\d+)\..*")
        widths = [shapes[f"encoder.down.{i}.block.0.conv1.weight"][0] for i in range(levels)]
        return cls(in_channels=conv_in[1], out_channels=shape(shapes, "decoder.conv_out.weight", "VAE")[0],
                   channels=conv_in[0], channel_mult=tuple(w // conv_in[0] for w in widths),
                   num_res_blocks=count(shapes, r"encoder\.down\.0\.block\.(\d+)\..*"),
                   z_channels=shape(shapes, "post_quant_conv.weight", "VAE")[0],
                   norm_groups=norm_groups([conv_in[0], *widths]))


class ResnetBlock(nn.Module):
    def __init__(self, channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, channels, eps=1e-6)
        self.conv1 = nn.Conv2d(channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=1e-6)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if channels != out_channels:
            self.nin_shortcut = nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all h*w positions, with 1x1 convs as projections."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.q, self.k, self.v = (nn.Conv2d(channels, channels, 1) for _ in range(3))
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)
        q, k, v = (proj(n).flatten(2).transpose(1, 2)[:, None] for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)[:, 0].transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # padding on the right and bottom only, as trained


class Level(nn.Module):
    """One resolution of the encoder (`down.i`) or decoder (`up.i`): ResnetBlocks, then a resampling conv."""

    def __init__(self, channels: int, width: int, blocks: int, groups: int, resample: str | None):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(channels if i == 0 else width, width, groups) for i in range(blocks))
        self.resample = resample  # the checkpoint's name for it: "downsample", "upsample" or None
        if resample is not None:
            self.add_module(resample, (Downsample if resample == "downsample" else Upsample)(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        return x if self.resample is None else getattr(self, self.resample)(x)


class Mid(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, c: VAEConfig):
        super().__init__()
        widths = [c.channels * m for m in c.channel_mult]
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(c.in_channels, c.channels, 3, padding=1)
        inputs = [c.channels, *widths[:-1]]  # down.i takes the previous level's width
        self.down = nn.ModuleList(
            Level(inputs[i], w, c.num_res_blocks, c.norm_groups, "downsample" if i != last else None)
            for i, w in enumerate(widths))
        self.mid = Mid(widths[-1], c.norm_groups)
        self.norm_out = nn.GroupNorm(c.norm_groups, widths[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(widths[-1], 2 * c.z_channels, 3, padding=1)


class Decoder(nn.Module):
    def __init__(self, c: VAEConfig):
        super().__init__()
        widths = [c.channels * m for m in c.channel_mult]
        self.conv_in = nn.Conv2d(c.z_channels, widths[-1], 3, padding=1)
        self.mid = Mid(widths[-1], c.norm_groups)
        # up.i works at the resolution of down.i; data flows from up.{last} to up.0
        inputs = [*widths[1:], widths[-1]]  # up.i takes the width of the deeper level up.{i+1}
        self.up = nn.ModuleList(
            Level(inputs[i], w, c.num_res_blocks + 1, c.norm_groups, "upsample" if i != 0 else None)
            for i, w in enumerate(widths))
        self.norm_out = nn.GroupNorm(c.norm_groups, widths[0], eps=1e-6)
        self.conv_out = nn.Conv2d(widths[0], c.out_channels, 3, padding=1)


class VAE(nn.Module):
    def __init__(self, config: VAEConfig | None = None):
        super().__init__()
        self.config = config = config or VAEConfig()  # SDXL 1.0 base by default
        self.gradient_checkpointing = False
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.z_channels, 2 * config.z_channels, 1)
        self.post_quant_conv = nn.Conv2d(config.z_channels, config.z_channels, 1)

    def _run(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(module, x, use_reentrant=False)
        return module(x)

    def encode(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """image [B, 3, H, W] in [-1, 1] -> (mean, logvar) of the latent distribution, each [B, 4, H/8, W/8]."""
        e = self.encoder
        h = e.conv_in(image)
        for level in e.down:
            h = self._run(level, h)
        h = e.conv_out(F.silu(e.norm_out(self._run(e.mid, h))))
        mean, logvar = self.quant_conv(h).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """latent [B, 4, h, w] (unscaled) -> image [B, 3, 8h, 8w], roughly in [-1, 1]."""
        d = self.decoder
        h = self._run(d.mid, d.conv_in(self.post_quant_conv(latent)))
        for level in reversed(d.up):
            h = self._run(level, h)
        return d.conv_out(F.silu(d.norm_out(h)))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Reconstruct an image through the latent mean."""
        return self.decode(self.encode(image)[0])
