"""The tiny models: each Stable Diffusion kind's architecture at a fraction of the width, seeded random weights.

- `tiny` (SD-2.x): 64-channel heads, Linear proj_in/proj_out, exact-GELU text tower, OpenCLIP's tokenizer rules;
- `tiny_sd15` (SD-1.5): 8 heads at every level, 1x1-conv proj_in/proj_out, quick_gelu text tower,
  transformers' tokenizer rules (padding with the end token).
They exercise every code path of the pipeline (and its outputs: videos, run facts) without weights,
so a fresh clone can run an edit on a CPU in about a minute. Their edits are noise-coloured, not art:
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

from . import TINY_SOURCES
from .loading import SD1, SD2, ModelConfig, Models

# model.source -> (kind, UNet config, text config); the text tower is as wide as the UNet's context
TINY = {
    "tiny": (SD2, UNetConfig.tiny(), TextConfig.tiny()),
    "tiny_sd15": (SD1, UNetConfig.tiny_sd15(), replace(TextConfig.tiny(), act="quick_gelu")),
}
assert set(TINY) == set(TINY_SOURCES)


def build_tiny_models(seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu", source: str = "tiny") -> Models:
    if source not in TINY:
        raise ValueError(f"no tiny model {source!r}; there are {', '.join(TINY)}")
    kind, ucfg, tcfg = TINY[source]
    torch.manual_seed(seed)
    unet = UNet(ucfg)
    vae = VAE(VAEConfig.tiny())
    text = TextEncoder(replace(tcfg, width=ucfg.cross_attention_dim))
    schedule = Schedule()
    config = ModelConfig(
        source=source, layout="random", prediction_type=schedule.prediction_type,
        sample_size=ucfg.sample_size * vae.downsample_factor, schedule=schedule, dtype=dtype, device=device,
        kind=kind.name,
    )
    models = [m.to(device, dtype).eval().requires_grad_(False) for m in (unet, vae, text)]
    return Models(*models, Tokenizer.from_open_clip(kind.tokenizer_rules), config)
