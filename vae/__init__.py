"""The Stable Diffusion VAE (see model.py); key layouts in keys.py."""

from .model import LATENT_SCALE, VAE, VAEConfig

__all__ = ["VAE", "VAEConfig", "LATENT_SCALE"]
