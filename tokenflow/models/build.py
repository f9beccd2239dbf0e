"""`build_models(model)`: the one way a run gets its models, from the `model` settings.

- `model.source=random`: the preset `model.name`'s architecture with weights seeded by `model.seed`
  (random_weights.py); the tiny presets have no other source.
- anything else (a hub id, a diffusers folder, an ldm .safetensors file): read by `load_models`
  (loading.py), whose kind must be the preset's: `model=sd15` with an SD-2.x folder is one line
  naming both, said before any weight is read.
"""

from __future__ import annotations

import torch

from .bundle import Models
from .loading import load_models
from .presets import RANDOM, preset, with_weights
from .random_weights import build_random


def build_models(model, *, device: str, dtype: torch.dtype) -> Models:
    """`model`: a tokenflow.config.ModelConfig (name, source, seed, variant, prediction_type)."""
    p = preset(model.name)  # an unknown name: one line listing the presets
    if model.source == RANDOM:
        return build_random(p, seed=model.seed, dtype=dtype, device=device)
    if p.random_only:
        raise ValueError(
            f"model={p.name} has random weights only (model.source={RANDOM}), got model.source={model.source}; "
            f"to load weights, name a preset that has them with it (model=NAME: {', '.join(with_weights())})"
        )
    return load_models(model.source, dtype=dtype, device=device, variant=model.variant,
                       prediction_type=model.prediction_type, expect=p)

