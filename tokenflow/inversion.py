"""Pre-processing (paper Sec. 4, Alg. 1 line 1): VAE-encode every frame and DDIM-invert it.

The latents of every frame at every SAMPLING timestep are kept (the source branch of the edit
needs x_t of the original video at each step), on disk in the inversion cache, frame by frame, so a
rerun reuses them and an interrupted run resumes with the frames still missing.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from sampler.ddim import invert, state_dtype
from sampler.schedule import Schedule
from unet.model import UNet
from vae.model import VAE

from .edit import batches
from .inversion_cache import InversionCache

Progress = Callable[[int], None]  # called with the number of frame-steps just finished


def encode_batch(vae: VAE, images: Tensor) -> Tensor:
    """One batch: images [b, 3, H, W] in [-1, 1] (any device) -> scaled latents [b, 4, H/8, W/8] in
    float32 on the VAE's device: they start the DDIM state (see sampler.ddim.state_dtype)."""
    param = next(vae.parameters())
    mean = vae.encode(images.to(param.device, param.dtype))[0]  # the posterior mean
    return vae.scale_latents(mean.to(state_dtype(mean.dtype)))


def decode_batch(vae: VAE, latents: Tensor) -> Tensor:
    """One batch: scaled latents [b, 4, h, w] (any float dtype) -> images [b, 3, 8h, 8w] in the
    VAE's dtype, on its device. The decoder's full-resolution activations set the VAE's memory peak:
    the batch size bounds it (tools.memory_estimate counts it)."""
    return vae.decode(vae.unscale_latents(latents).to(next(vae.parameters()).dtype))


@torch.no_grad()
def encode_frames(vae: VAE, images: Tensor, batch_size: int) -> Tensor:
    """images [n, 3, H, W] in [-1, 1] -> scaled clean latents [n, 4, H/8, W/8], float32 (posterior
    mean; TokenFlow does not sample the posterior), `batch_size` frames per VAE forward."""
    return torch.cat([encode_batch(vae, images[b]) for b in batches(images.shape[0], batch_size)])


@torch.no_grad()
def decode_latents(vae: VAE, latents: Tensor, batch_size: int) -> Tensor:
    """scaled latents [n, 4, h, w] (any float dtype) -> images [n, 3, 8h, 8w] in [-1, 1] (float32, on
    the CPU), `batch_size` latents per VAE forward."""
    return torch.cat([decode_batch(vae, latents[b]).cpu().float() for b in batches(latents.shape[0], batch_size)])


@torch.no_grad()
def invert_frames(
    unet: UNet, schedule: Schedule, clean: Tensor, prompt: Tensor, *, inversion_steps: int, keep_timesteps: list[int],
    batch_size: int, cache: InversionCache | None = None, on_progress: Progress | None = None,
    on_reuse: Callable[[int], None] | None = None,
) -> dict[int, Tensor]:
    """DDIM inversion of every frame, without guidance (scale 1, the inversion prompt), as the paper.

    clean: [n, 4, h, w] scaled latents; prompt: [1, 77, C]. Returns {t: [n, 4, h, w]} on the CPU for
    every t in keep_timesteps, in float32 whatever the UNet's dtype (the DDIM state; only the UNet
    runs in a reduced dtype). Frames found in `cache` are loaded, the others computed and saved.
    Runs inverting the same clip into one cache at once share the work: each computes the frames it
    claims and waits for (then loads) the frames another run claimed (see InversionCache.claim).
    """
    n = clean.shape[0]
    todo = list(range(n)) if cache is None else cache.missing(list(range(n)))
    if on_reuse is not None and len(todo) < n:
        on_reuse(n - len(todo))
    result = {t: torch.empty(n, *clean.shape[1:], dtype=state_dtype(clean.dtype)) for t in keep_timesteps}
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
    dtype = next(unet.parameters()).dtype
    for frames in batches(len(todo), batch_size):
        frames = [todo[i] for i in frames]
        context = prompt.expand(len(frames), -1, -1).to(clean.device, dtype)

        def model_fn(x, t, context=context):
            out = unet(x.to(dtype), t, context)  # the UNet in its dtype; invert keeps x in float32
            if on_progress is not None:
                on_progress(len(frames))
            return out

        kept = invert(model_fn, clean[frames], schedule, inversion_steps, keep_timesteps)
        # one blocking device-to-host copy per batch: [T, b, 4, h, w]; the checks, the result and
        # the cache files all read this host copy (not one copy per frame and timestep)
        host = torch.stack([kept[t] for t in keep_timesteps]).cpu()
        del kept
        for k, t in enumerate(keep_timesteps):
            if not torch.isfinite(host[k]).all():
                raise FloatingPointError(f"inversion: non-finite latents at t={t} for frames {frames}")
            result[t][frames] = host[k]
        if cache is not None:
            for j, i in enumerate(frames):
                cache.save(i, {t: host[k, j] for k, t in enumerate(keep_timesteps)})
            cache.release(frames)
            cache.refresh(todo)
