"""The four SDXL models under one module whose state_dict() keys are the single file's (docs/models.md).

    SDXL.model.diffusion_model                  UNet          model.diffusion_model.…
    SDXL.conditioner.embedders["0"].transformer  CLIP-L        conditioner.embedders.0.transformer.…
    SDXL.conditioner.embedders["1"].model        OpenCLIP-G    conditioner.embedders.1.model.…
    SDXL.first_stage_model                      VAE           first_stage_model.…

so `SDXL(config).load_state_dict(single_file_tensors, strict=True)` needs no renaming. A part left out
of the config (a UNet-only file has no text encoders or VAE) is simply absent.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

from torch import nn

from lineage.io.safetensors import TensorInfo
from lineage.sdxl.layout import COMPONENT_PREFIXES
from lineage.train.text_encoders import CLIPLConfig, CLIPTextL, OpenCLIPGConfig, OpenCLIPTextG
from lineage.train.unet import UNet, UNetConfig
from lineage.train.vae import VAE, VAEConfig

# part name (as in lineage.sdxl.layout.COMPONENT_PREFIXES) -> (module class, config class)
MODELS: dict[str, tuple[type[nn.Module], type]] = {
    "unet": (UNet, UNetConfig),
    "clip_l": (CLIPTextL, CLIPLConfig),
    "clip_g": (OpenCLIPTextG, OpenCLIPGConfig),
    "vae": (VAE, VAEConfig),
}
PART_NAMES = {"unet": "UNet", "clip_l": "CLIP-L text encoder", "clip_g": "OpenCLIP-G text encoder", "vae": "VAE"}


@dataclass(frozen=True)
class SDXLConfig:
    """One config per part; None leaves the part out. The defaults are SDXL 1.0 base."""

    unet: UNetConfig | None = UNetConfig()
    clip_l: CLIPLConfig | None = CLIPLConfig()
    clip_g: OpenCLIPGConfig | None = OpenCLIPGConfig()
    vae: VAEConfig | None = VAEConfig()

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(f.name for f in fields(self) if getattr(self, f.name) is not None)


def component_shapes(header: Mapping[str, TensorInfo | tuple[int, ...]], part: str) -> dict[str, tuple[int, ...]]:
    """The shapes of one part's tensors, keyed without the part's prefix."""
    prefix = COMPONENT_PREFIXES[part]
    return {key[len(prefix):]: tuple(value.shape if isinstance(value, TensorInfo) else value)
            for key, value in header.items() if key.startswith(prefix)}


def config_from_checkpoint(header: Mapping[str, TensorInfo | tuple[int, ...]],
                           parts: tuple[str, ...] = tuple(MODELS)) -> SDXLConfig:
    """The config of the parts a checkpoint holds, read from its tensor shapes (key -> TensorInfo or shape);
    parts not asked for, or absent from the file, are None."""
    configs = dict.fromkeys(MODELS)
    for part in parts:
        shapes = component_shapes(header, part)
        configs[part] = MODELS[part][1].from_shapes(shapes) if shapes else None
    return SDXLConfig(**configs)


class SDXL(nn.Module):
    def __init__(self, config: SDXLConfig | None = None):
        super().__init__()
        self.config = config = config or SDXLConfig()  # SDXL 1.0 base by default
        for part in config.parts:
            model_class = MODELS[part][0]
            self._mount(COMPONENT_PREFIXES[part], model_class(getattr(config, part)))

    def _mount(self, prefix: str, module: nn.Module) -> None:
        """Place `module` at the dotted path `prefix`, creating the containers on the way."""
        *path, leaf = prefix.rstrip(".").split(".")
        node: nn.Module = self
        for name in path:
            child = dict(node.named_children()).get(name)
            if child is None:
                child = nn.ModuleDict()
                node.add_module(name, child)
            node = child
        node.add_module(leaf, module)

    def part(self, name: str) -> nn.Module | None:
        """The module of one part ("unet", "clip_l", "clip_g", "vae"), or None when it is left out."""
        if getattr(self.config, name) is None:
            return None
        return self.get_submodule(COMPONENT_PREFIXES[name].rstrip("."))

    @property
    def unet(self) -> UNet | None:
        return self.part("unet")

    @property
    def clip_l(self) -> CLIPTextL | None:
        return self.part("clip_l")

    @property
    def clip_g(self) -> OpenCLIPTextG | None:
        return self.part("clip_g")

    @property
    def vae(self) -> VAE | None:
        return self.part("vae")

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of keeping them (less memory)."""
        for part in self.config.parts:
            self.part(part).gradient_checkpointing = enabled
