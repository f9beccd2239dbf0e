"""Pre-processing (paper Sec. 4, Alg. 1 line 1): VAE-encode every frame and DDIM-invert it.

The latents of every frame at every SAMPLING timestep are kept (the source branch of the edit
needs x_t of the original video at each step), on disk in the inversion cache, frame by frame, so a
rerun reuses them and an interrupted run resumes with the frames still missing.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from sampler.ddim import invert
from sampler.schedule import Schedule
from unet.model import UNet
from vae.model import VAE

from .edit import batches
from .inversion_cache import InversionCache

Progress = Callable[[int], None]  # called with the number of frame-steps just finished


@torch.no_grad()
def encode_frames(vae: VAE, images: Tensor, batch_size: int) -> Tensor:
    """images [n, 3, H, W] in [-1, 1] -> scaled clean latents [n, 4, H/8, W/8] (posterior mean;
    TokenFlow does not sample the posterior)."""
    dtype = next(vae.parameters()).dtype
    device = next(vae.parameters()).device
    out = [vae.encode(images[b].to(device, dtype))[0] for b in batches(images.shape[0], batch_size)]
    return vae.scale_latents(torch.cat(out))


@torch.no_grad()
def decode_latents(vae: VAE, latents: Tensor, batch_size: int) -> Tensor:
    """scaled latents [n, 4, h, w] -> images [n, 3, 8h, 8w] in [-1, 1] (float32, on the CPU)."""
    return torch.cat([vae.decode(vae.unscale_latents(latents[b])).float().cpu() for b in batches(latents.shape[0], batch_size)])


@torch.no_grad()
def invert_frames(
    unet: UNet, schedule: Schedule, clean: Tensor, prompt: Tensor, *, inversion_steps: int, keep_timesteps: list[int],
    batch_size: int, cache: InversionCache | None = None, on_progress: Progress | None = None,
    on_reuse: Callable[[int], None] | None = None,
) -> dict[int, Tensor]:
    """DDIM inversion of every frame, without guidance (scale 1, the inversion prompt), as the paper.

    clean: [n, 4, h, w] scaled latents; prompt: [1, 77, C]. Returns {t: [n, 4, h, w]} on the CPU for
    every t in keep_timesteps. Frames found in `cache` are loaded, the others computed and saved.
    Runs inverting the same clip into one cache at once share the work: each computes the frames it
    claims and waits for (then loads) the frames another run claimed (see InversionCache.claim).
    """
    n = clean.shape[0]
    todo = list(range(n)) if cache is None else cache.missing(list(range(n)))
    if on_reuse is not None and len(todo) < n:
        on_reuse(n - len(todo))
    result = {t: torch.empty(n, *clean.shape[1:], dtype=clean.dtype) for t in keep_timesteps}
    computed: set[int] = set()
    while todo:
        mine = todo if cache is None else cache.claim(todo)
        try:
            _invert_into(result, unet, schedule, clean, prompt, mine, inversion_steps, keep_timesteps, batch_size, cache, on_progress)
        finally:
            if cache is not None:
                cache.release(mine)
        computed.update(mine)
        # the other runs' frames: wait for their files; a frame whose run died comes back to claim
        todo = [] if cache is None else cache.wait([i for i in todo if i not in computed])
    for i in range(n):
        if i not in computed:
            for t, x in cache.load(i).items():
                result[t][i] = x.to(result[t].dtype)
    return result


def _invert_into(result, unet, schedule, clean, prompt, todo, inversion_steps, keep_timesteps, batch_size, cache, on_progress):
    """Invert frames `todo` of `clean` into `result` {t: [n, ...]} (and the cache, frame by frame)."""
    for frames in batches(len(todo), batch_size):
        frames = [todo[i] for i in frames]
        context = prompt.expand(len(frames), -1, -1).to(clean)

        def model_fn(x, t, context=context):
            out = unet(x, t, context)
            if on_progress is not None:
                on_progress(len(frames))
            return out

        kept = invert(model_fn, clean[frames], schedule, inversion_steps, keep_timesteps)
        for t, x in kept.items():
            if not torch.isfinite(x).all():
                raise FloatingPointError(f"inversion: non-finite latents at t={t} for frames {frames}")
            result[t][frames] = x.cpu()
        if cache is not None:
            for j, i in enumerate(frames):
                cache.save(i, {t: kept[t][j].cpu() for t in keep_timesteps})
            cache.release(frames)
            cache.refresh(todo)
