"""SDXL's UNet, text encoders and VAE as plain PyTorch modules with the single file's parameter names
(docs/models.md), and their loader.

    from lineage.train import load_sdxl
    sdxl = load_sdxl("model.safetensors", dtype=torch.bfloat16)
    sdxl.unet, sdxl.clip_l, sdxl.clip_g, sdxl.vae
"""
from lineage.train.loading import load_sdxl
from lineage.train.sdxl import SDXL, SDXLConfig, config_from_checkpoint
from lineage.train.text_encoders import CLIPLConfig, CLIPTextL, OpenCLIPGConfig, OpenCLIPTextG, TextOutput
from lineage.train.unet import UNet, UNetConfig, timestep_embedding
from lineage.train.vae import VAE, VAEConfig

__all__ = ["SDXL", "VAE", "CLIPLConfig", "CLIPTextL", "OpenCLIPGConfig", "OpenCLIPTextG", "SDXLConfig", "TextOutput",
           "UNet", "UNetConfig", "VAEConfig", "config_from_checkpoint", "load_sdxl", "timestep_embedding"]
