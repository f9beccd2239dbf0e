"""`build_models(model)`: the one way a run gets its models, from the `model` settings.

- `model.source=random`: the preset `model.name`'s architecture with weights seeded by `model.seed`
  (random_weights.py); the tiny presets have no other source.
- anything else (a hub id, a diffusers folder, an ldm .safetensors file): read by `load_models`
  (loading.py), whose kind must be the preset's: `model=sd15` with an SD-2.x folder is one line
  naming both, said before any weight is read.

`build_controlnet(controlnet, model)`: the run's ControlNet (controlnet.checkpoint; null picks the model
kind's canny checkpoint from tokenflow.config.CONTROLNET_CHECKPOINTS, or a seeded random one for the tiny
presets and model.source=random), read by controlnet_loading.py against the preset's UNet configuration,
so a ControlNet of the other family is one line before any weight (its or the model's) is read.
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



def controlnet_source(controlnet, model) -> str:
    """The ControlNet a run loads: controlnet.checkpoint, else "random" for a random model, else the
    model kind's checkpoint for the condition; a condition with none is one line saying what to pass."""
    from ..config import CONTROLNET_CHECKPOINTS

    if controlnet.checkpoint is not None:
        return controlnet.checkpoint
    if model.source == RANDOM:
        return RANDOM
    kind = preset(model.name).model_kind
    source = CONTROLNET_CHECKPOINTS.get((kind.name, controlnet.name))
    if source is None:
        named = [f"controlnet.checkpoint={c}" for (k, _), c in CONTROLNET_CHECKPOINTS.items() if k == kind.name]
        raise ValueError(f"controlnet={controlnet.name} with model={model.name} ({kind.family}) has no default checkpoint: "
                         f"pass controlnet.checkpoint=HUB_ID|FOLDER|FILE of an {kind.family} ControlNet"
                         + (f" (e.g. {named[0]})" if named else " (docs/controlnet.md lists published ones)"))
    return source


def build_controlnet(controlnet, model, *, device: str, dtype: torch.dtype):
    """`controlnet`: tokenflow.config.ControlNetConfig (enabled); `model`: ModelConfig -> unet.controlnet.ControlNet."""
    from .controlnet_loading import build_random_controlnet, load_controlnet

    unet_config = preset(model.name).unet()
    source = controlnet_source(controlnet, model)
    if source == RANDOM:
        return build_random_controlnet(unet_config, seed=model.seed + 1, device=device, dtype=dtype)
    return load_controlnet(source, unet_config, device=device, dtype=dtype, variant=model.variant)


def check_controlnet_fits(net, unet, controlnet, model) -> None:
    """The loaded ControlNet against the loaded UNet (the preset's configuration was checked before reading)."""
    from .controlnet_loading import check_fits

    check_fits(net.config, unet.config, controlnet_source(controlnet, model))
