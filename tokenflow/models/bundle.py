"""What a model build gives a run: the four parts (`Models`) and where they came from (`ModelFacts`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from clip_text.model import TextEncoder
from clip_text.tokenizer import Tokenizer
from sampler.schedule import Schedule
from unet.model import UNet
from vae.model import VAE


@dataclass
class ModelFacts:
    """The facts of one build, for the run and its report (not a setting: tokenflow.config.ModelConfig is that)."""

    source: str  # what was read: a hub id, a folder, a file, or "random"
    layout: str  # "diffusers", "ldm" or "random"
    prediction_type: str  # "epsilon" or "v_prediction"
    sample_size: int  # image side in pixels the model was trained at (512 or 768)
    schedule: Schedule
    dtype: torch.dtype
    device: str
    kind: str = "sd2"  # a tokenflow.models.presets.KINDS key
    preset: Optional[str] = None  # the preset whose architecture a random build has (None: read from files)


@dataclass
class Models:
    unet: UNet
    vae: VAE
    text_encoder: TextEncoder
    tokenizer: Tokenizer
    config: ModelFacts
