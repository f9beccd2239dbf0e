"""The `tiny` model: SD-2.1's architecture at a fraction of the width, with seeded random weights.

It exercises every code path of the pipeline (and its outputs: videos, run facts) without weights,
so a fresh clone can run an edit on a CPU in about a minute. Its edits are noise-coloured, not art:
the tokenizer is the real CLIP BPE (from the open_clip_torch package), the networks are random.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from clip_text.model import TextConfig, TextEncoder
from clip_text.tokenizer import Tokenizer
from sampler.schedule import Schedule
from unet.model import UNet, UNetConfig
from vae.model import VAE, VAEConfig

from .loading import ModelConfig, Models


def build_tiny_models(seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Models:
    torch.manual_seed(seed)
    ucfg = UNetConfig.tiny()
    unet = UNet(ucfg)
    vae = VAE(VAEConfig.tiny())
    text = TextEncoder(replace(TextConfig.tiny(), width=ucfg.cross_attention_dim))
    schedule = Schedule()
    config = ModelConfig(
        source="tiny", layout="random", prediction_type=schedule.prediction_type,
        sample_size=ucfg.sample_size * vae.downsample_factor, schedule=schedule, dtype=dtype, device=device,
    )
    models = [m.to(device, dtype).eval().requires_grad_(False) for m in (unet, vae, text)]
    return Models(*models, Tokenizer.from_open_clip(), config)
