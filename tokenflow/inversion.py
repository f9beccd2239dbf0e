"""Pre-processing (paper Sec. 4, Alg. 1 line 1): VAE-encode every frame and invert it.

Two inversions (`inversion.method`): DDIM (the paper: the deterministic path from the clean
latents up to x_T) and edit-friendly DDPM (Huberman-Spiegelglas et al. 2024: independent noisy
versions x_t of the clean latents at the sampling timesteps, and the noise maps z_t that carry the
sampler from each x_t exactly to the next; sampler/ddpm.py). The latents of every frame at every
kept SAMPLING timestep (DDPM: and its noise maps) are kept (the source branch of the edit needs x_t
of the original video at each step), on disk in the inversion cache, frame by frame, so a rerun
reuses them and an interrupted run resumes with the frames still missing.

DDPM's noise e_t is drawn per frame and step from a generator seeded by (noise seed, frame, t)
(`version_noise`): a frame's maps do not depend on the batch it was inverted in, on which process
inverted it, or on which other timesteps were kept, so a resumed or torchrun run computes the same.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from sampler.ddim import classifier_free_guidance, invert, inversion_timesteps, state_dtype
from sampler.ddpm import ddpm_invert
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
    result = {t: torch.empty(clean.shape[0], *clean.shape[1:], dtype=state_dtype(clean.dtype)) for t in keep_timesteps}

    def compute(todo):
        _invert_into(result, unet, schedule, clean, prompt, todo, inversion_steps, keep_timesteps, batch_size, cache, on_progress)

    def load(i):
        for t, x in cache.load(i).items():
            result[t][i] = x.to(result[t].dtype)

    _through_cache(clean.shape[0], cache, compute, load, on_reuse)
    return result


def _through_cache(n: int, cache: InversionCache | None, compute: Callable[[list[int]], None],
                   load: Callable[[int], None], on_reuse: Callable[[int], None] | None) -> None:
    """Frames 0..n-1: those the cache holds are loaded, the others claimed and computed (and saved
    by `compute`), waiting for (then loading) frames another run claimed."""
    todo = list(range(n)) if cache is None else cache.missing(list(range(n)))
    if on_reuse is not None and len(todo) < n:
        on_reuse(n - len(todo))
    computed: set[int] = set()
    while todo:
        mine = todo if cache is None else cache.claim(todo)
        try:
            compute(mine)
        finally:
            if cache is not None:
                cache.release(mine)
        computed.update(mine)
        # the other runs' frames: wait for their files; a frame whose run died comes back to claim
        todo = [] if cache is None else cache.wait([i for i in todo if i not in computed])
    for i in range(n):
        if i not in computed:
            load(i)


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
        _keep_batch(frames, todo, keep_timesteps, cache, kept, result)


def _keep_batch(frames: list[int], todo: list[int], timesteps: list[int], cache: InversionCache | None,
                latents: dict[int, Tensor], into: dict[int, Tensor], maps: dict[int, Tensor] | None = None,
                maps_into: dict[int, Tensor] | None = None) -> None:
    """One inverted batch of `frames` ({t: [b, 4, h, w]} on the device, and DDPM's maps) into the
    run's tensors `into` / `maps_into` ({t: [n, ...]}) and the cache, frame by frame. One blocking
    device-to-host copy per batch, [T, b, 4, h, w]: the checks, the result and the cache files all
    read it (not one copy per frame and timestep)."""
    host = {"latents": torch.stack([latents[t] for t in timesteps]).cpu()}
    if maps is not None:
        host["noise maps"] = torch.stack([maps[t] for t in timesteps]).cpu()
    for what, values in host.items():
        for k, t in enumerate(timesteps):
            if not torch.isfinite(values[k]).all():
                raise FloatingPointError(f"inversion: non-finite {what} at t={t} for frames {frames}")
    for k, t in enumerate(timesteps):
        into[t][frames] = host["latents"][k]
        if maps is not None:
            maps_into[t][frames] = host["noise maps"][k]
    if cache is not None:
        for j, i in enumerate(frames):
            cache.save(i, {t: host["latents"][k, j] for k, t in enumerate(timesteps)},
                       noise_maps=None if maps is None else {t: host["noise maps"][k, j] for k, t in enumerate(timesteps)})
        cache.release(frames)
        cache.refresh(todo)


# ---------------------------------------------------------------------------------------------
# edit-friendly DDPM inversion


def source_model_fn(unet: UNet, source: Tensor, negative: Tensor, guidance_scale: float, frames: int,
                    on_forward: Callable[[int], None] | None = None):
    """model_fn(x, t) for `frames` frames: the UNet's output on the source prompt, guided at
    `guidance_scale` against the negative prompt (scale 1: the source branch alone, one forward).
    The inversion's noise maps and the reconstruction that samples with them use this same function,
    so sampling the source back meets every mean the maps were measured against. on_forward(b): each
    forward, with the frames it carried."""
    dtype = next(unet.parameters()).dtype
    guided = guidance_scale != 1
    prompts = torch.cat([negative, source]) if guided else source
    context = prompts.repeat_interleave(frames, dim=0).to(source.device, dtype)  # [(2)F, 77, C]

    def model_fn(x: Tensor, t: int) -> Tensor:
        if on_forward is not None:
            on_forward(x.shape[0])
        if not guided:
            return unet(x.to(dtype), t, context[: x.shape[0]])
        uncond, cond = unet(torch.cat([x, x]).to(dtype), t, context).chunk(2)  # [neg | source] x F
        state = state_dtype(uncond.dtype)  # guidance in float32, as the edit loop's
        return classifier_free_guidance(uncond.to(state), cond.to(state), guidance_scale)

    return model_fn


def noise_seed_of(noise_seed: int, frame: int | None, t: int) -> int:
    """The generator seed of the noise e_t of `frame` (None: the draw all frames share) at timestep t:
    a hash of the three, so no two (frame, t) pairs share a draw by arithmetic accident."""
    digest = hashlib.sha256(f"tokenflow-ddpm:{noise_seed}:{'shared' if frame is None else frame}:{t}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def version_noise(frame_ids: list[int], timesteps: list[int], shape, *, noise_seed: int, shared: bool) -> dict[int, Tensor]:
    """{t: e_t [len(frame_ids), *shape]} float32 on the CPU: frame `frame_ids[j]`'s noise at t is
    drawn from its own generator (noise_seed, frame, t), or, shared, one draw per t for every frame."""
    out = {}
    for t in timesteps:
        if shared:
            g = torch.Generator().manual_seed(noise_seed_of(noise_seed, None, t))
            out[t] = torch.randn((1, *shape), generator=g).expand(len(frame_ids), *shape)
        else:
            out[t] = torch.stack([torch.randn(tuple(shape), generator=torch.Generator().manual_seed(noise_seed_of(noise_seed, f, t)))
                                  for f in frame_ids])
    return out


@torch.no_grad()
def ddpm_invert_frames(
    unet: UNet, schedule: Schedule, clean: Tensor, source: Tensor, negative: Tensor, *, timesteps: list[int],
    guidance_scale: float, noise_seed: int, shared_noise: bool, batch_size: int, frame_ids: list[int] | None = None,
    cache: InversionCache | None = None, on_progress: Progress | None = None, on_reuse: Callable[[int], None] | None = None,
    on_forward: Callable[[int], None] | None = None,
) -> tuple[dict[int, Tensor], dict[int, Tensor]]:
    """Edit-friendly DDPM inversion of every frame on the sampling grid `timesteps` (descending; a
    tail of the grid when the edit skips its first steps), with the source prompt guided at
    `guidance_scale` against `negative` (1: the source prompt alone).

    clean: [n, 4, h, w]; source, negative: [1, 77, C]; frame_ids: what seeds each frame's noise (the
    source frame numbers; default 0..n-1). Returns (xs, zs): the noisy versions {t: x_t} and the
    noise maps {t: z_t}, each [n, 4, h, w] float32 on the CPU. Cached like `invert_frames`.
    on_progress(k): k frame-steps done; on_forward(b): one UNet forward of b frames (each of 1
    branch, 2 when guided)."""
    n = clean.shape[0]
    frame_ids = list(range(n)) if frame_ids is None else list(frame_ids)
    if len(frame_ids) != n:
        raise ValueError(f"ddpm inversion: {len(frame_ids)} frame ids for {n} frames")
    state = state_dtype(clean.dtype)
    xs = {t: torch.empty(n, *clean.shape[1:], dtype=state) for t in timesteps}
    zs = {t: torch.empty(n, *clean.shape[1:], dtype=state) for t in timesteps}

    def compute(todo: list[int]) -> None:
        for frames in batches(len(todo), batch_size):
            frames = [todo[i] for i in frames]
            model_fn = source_model_fn(unet, source, negative, guidance_scale, len(frames), on_forward)

            def counted(x, t, model_fn=model_fn, b=len(frames)):
                out = model_fn(x, t)
                if on_progress is not None:
                    on_progress(b)
                return out

            noise = version_noise([frame_ids[i] for i in frames], timesteps, clean.shape[1:], noise_seed=noise_seed,
                                  shared=shared_noise)
            bx, bz = ddpm_invert(counted, clean[frames], schedule, timesteps,
                                 {t: e.to(clean.device) for t, e in noise.items()})
            _keep_batch(frames, todo, timesteps, cache, bx, xs, bz, zs)

    def load(i: int) -> None:
        for t, x in cache.load(i).items():
            xs[t][i] = x.to(state)
        for t, z in cache.load_noise_maps(i).items():
            zs[t][i] = z.to(state)

    _through_cache(n, cache, compute, load, on_reuse)
    return xs, zs


# ---------------------------------------------------------------------------------------------
# a run's inversion, either method


@dataclass
class Inversion:
    """What the edit needs of the original video: x_t at every kept sampling timestep (DDIM: the
    inverted latents; DDPM: the noisy versions) and, for DDPM, the noise maps z_t at the same t."""

    method: str  # ddim | ddpm
    latents: dict[int, Tensor]  # {t: [n, 4, h, w]} float32, CPU
    noise_maps: dict[int, Tensor] | None = None  # DDPM: {t: [n, 4, h, w]}, the map of the step from t
    unet_frame_forwards: int = 0  # frames through the UNet here (0 for frames the cache held)
    unet_branches: int = 1  # prompts each frame-forward carried (2: DDPM with source guidance)

    @property
    def timesteps(self) -> list[int]:
        """The kept sampling timesteps, descending (the edit runs these)."""
        return sorted(self.latents, reverse=True)


def kept_timesteps(timesteps: list[int], skip: int) -> list[int]:
    """The sampling timesteps an inversion keeps when the edit skips its first `skip` steps."""
    return list(timesteps)[skip:]


def inversion_steps_per_frame(cfg, schedule: Schedule, timesteps: list[int]) -> int:
    """The steps each frame's inversion takes to keep `timesteps` (cfg: config.RunConfig): DDPM one
    per kept timestep; DDIM its path up the inversion grid (sampler.ddim.inversion_timesteps)."""
    if cfg.inversion.method == "ddpm":
        return len(timesteps)
    return len(inversion_timesteps(schedule, cfg.inversion.steps, timesteps))


def invert_for_run(
    cfg, unet: UNet, schedule: Schedule, clean: Tensor, prompts, timesteps: list[int], *, frame_ids: list[int],
    cache: InversionCache | None = None, on_progress: Progress | None = None, on_reuse: Callable[[int], None] | None = None,
) -> Inversion:
    """The inversion `cfg.inversion` asks for (cfg: config.RunConfig; prompts: edit.PromptEmbeddings)
    of `clean` [n, 4, h, w], keeping `timesteps` (kept_timesteps of the run's grid)."""
    inv = cfg.inversion
    forwards = [0]

    def count(b: int) -> None:
        forwards[0] += b

    if inv.method == "ddpm":
        xs, zs = ddpm_invert_frames(
            unet, schedule, clean, prompts.source, prompts.negative, timesteps=timesteps,
            guidance_scale=inv.source_guidance_scale, noise_seed=inv.noise_seed, shared_noise=inv.shared_noise,
            batch_size=inv.batch_size, frame_ids=frame_ids, cache=cache, on_progress=on_progress, on_reuse=on_reuse,
            on_forward=count)
        return Inversion("ddpm", xs, zs, forwards[0], 2 if inv.source_guidance_scale != 1 else 1)

    def progress(k: int) -> None:  # DDIM: one forward of k frames per frame-step reported
        count(k)
        if on_progress is not None:
            on_progress(k)

    latents = invert_frames(unet, schedule, clean, prompts.source, inversion_steps=inv.steps, keep_timesteps=timesteps,
                            batch_size=inv.batch_size, cache=cache, on_progress=progress, on_reuse=on_reuse)
    return Inversion("ddim", latents, None, forwards[0], 1)
