"""`build_random(preset, seed)`: a preset's architecture with seeded random weights (`model.source=random`).

The tiny presets exist only like this: they run every code path of the pipeline on a CPU in about a
minute, their edits noise-coloured (the tokenizer is the real CLIP BPE, the networks are random). A
full-size preset built this way measures memory and speed offline, without its weights.

The weights are drawn on the CPU, so a seed gives the same weights on every device (an inversion
cached on one device stays right on another); each part moves to the device as soon as it is drawn,
so the CPU holds one float32 part at a time. device="meta" builds the shapes alone (no memory, no
drawing): for parameter counts and memory estimates.
"""

from __future__ import annotations

import torch

from clip_text.model import TextEncoder
from clip_text.tokenizer import Tokenizer
from sampler.schedule import Schedule
from unet.model import UNet
from vae.model import VAE

from .bundle import ModelFacts, Models
from .presets import RANDOM, Preset, preset as preset_named


def build_random(preset: Preset | str, seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Models:
    p = preset_named(preset) if isinstance(preset, str) else preset
    device = str(device)
    draw_on = "meta" if device == "meta" else "cpu"
    torch.manual_seed(seed)
    parts = []
    for build in (lambda: UNet(p.unet()), lambda: VAE(p.vae()), lambda: TextEncoder(p.text())):
        with torch.device(draw_on):
            part = build()
        parts.append(part.to(device, dtype).eval().requires_grad_(False))
    unet, vae, text = parts
    kind = p.model_kind
    schedule = Schedule(prediction_type=p.prediction_type)
    facts = ModelFacts(
        source=RANDOM, layout="random", prediction_type=schedule.prediction_type,
        sample_size=unet.config.sample_size * vae.downsample_factor, schedule=schedule, dtype=dtype, device=device,
        kind=kind.name, preset=p.name,
    )
    return Models(unet, vae, text, Tokenizer.from_open_clip(kind.tokenizer_rules), facts)

