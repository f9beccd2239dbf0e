"""The invert stage's check: the source prompt sampled back from the inversion, and its PSNR.

The page calls the run's own reconstruction (tokenflow.reconstruction, what `output.reconstruction=true`
writes as reconstruction.mp4), so what the app shows is what the command line measures: DDIM samples
x_T back unguided, DDPM samples with the stored noise maps (exact up to float rounding).
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor

from ..inversion import decode_latents
from ..media import from_model_range
from ..reconstruction import psnr, reconstruct_latents
from ..source import SourceVideo

__all__ = ["psnr", "sample_source_back"]


def sample_source_back(src: SourceVideo, on_step: Callable[[int, int], None] | None = None) -> Tensor:
    """The inversion prompt sampled back from `src`'s inversion, decoded -> uint8 [n, H, W, 3].
    on_step(done, total): frame-steps done after each UNet forward (raising in it stops the sampling)."""
    cfg, models = src.cfg, src.models
    n = src.clean.shape[0]
    total, done = n * len(src.inversion.timesteps), 0

    def on_forward(frames: int) -> None:
        nonlocal done
        done += frames
        if on_step is not None:
            on_step(min(done, total), total)

    latents = reconstruct_latents(models.unet, models.config.schedule, src.inversion, src.prompts.source, src.prompts.negative,
                                  guidance_scale=cfg.inversion.source_guidance_scale, batch_size=cfg.inversion.batch_size,
                                  on_forward=on_forward)
    return from_model_range(decode_latents(models.vae, latents, cfg.inversion.batch_size))
