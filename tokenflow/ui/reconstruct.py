"""The invert stage's check: the source prompt sampled back from the inversion, and its PSNR.

DDIM inversion is exact only in the limit of small steps, so sampling the inverted x_T back with the
inversion prompt (no guidance: the inversion ran unguided) shows what the edit's source branch
starts from. `sample_source_back` is the one function the page calls for it.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from sampler.ddim import sample

from ..inversion import decode_latents
from ..media import from_model_range
from ..source import SourceVideo


@torch.no_grad()
def sample_source_back(src: SourceVideo, on_step: Callable[[int, int], None] | None = None) -> Tensor:
    """DDIM sampling of the inversion prompt from the inverted x_T of every frame -> uint8 [n, H, W, 3].
    on_step(done, total) after each step of each batch (raising in it stops the sampling)."""
    unet, schedule = src.models.unet, src.models.config.schedule
    n, batch = src.clean.shape[0], src.cfg.inversion.batch_size
    x_T = src.source_latents[src.timesteps[0]]  # [n, 4, h, w] float32 on the CPU
    total, done = n * len(src.timesteps), 0
    out = []
    for start in range(0, n, batch):
        x = x_T[start:start + batch].to(src.device)
        context = src.prompts.source.expand(x.shape[0], -1, -1).to(src.dtype)

        def model_fn(latents, t, context=context):
            return unet(latents.to(src.dtype), t, context).float()

        def progress(steps, size=x.shape[0]):
            nonlocal done
            for i in steps:
                yield i
                done += size
                if on_step is not None:
                    on_step(done, total)

        out.append(sample(model_fn, x, schedule, src.timesteps, progress=progress))
    latents = torch.cat(out)  # [n, 4, h, w]
    return from_model_range(decode_latents(src.models.vae, latents, batch))


def psnr(a: Tensor, b: Tensor) -> float:
    """Peak signal-to-noise ratio in dB of two uint8 videos [n, H, W, 3] (inf when equal)."""
    if a.shape != b.shape:
        raise ValueError(f"psnr: videos of shapes {tuple(a.shape)} and {tuple(b.shape)}")
    mse = float((a.double() - b.double()).pow(2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)
