"""The original video made ready for editing (Alg. 1, line 1), in one call, for tools and notebooks.

`prepare_source(cfg)` runs the first stages of `pipeline.run_edit` (read, models, encode, prompts,
invert) through the same functions and returns what they made; it writes nothing but the caches
(the inversion cache, the generated sample clip).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .config import RunConfig
from .device import pick_device, pick_dtype
from .edit import PromptEmbeddings
from .inputs import load_video
from .inversion import Inversion, encode_frames, invert_for_run, kept_timesteps
from .inversion_cache import open_for_run
from .media import Video, to_model_range
from .models import build_models
from .prompts import embed_prompts


@dataclass
class SourceVideo:
    """The frames as read and resized, the models, clean latents, prompt embeddings and the inverted
    latents at every kept sampling timestep (float32, on the CPU: steps x [n, 4, h, w]; DDPM: and
    the noise maps, in `inversion`)."""

    cfg: RunConfig
    video: Video
    frames: torch.Tensor  # uint8 [n, H, W, 3]: video.frames, or the chosen positions of it
    models: object  # tokenflow.models.Models
    device: str
    dtype: torch.dtype
    clean: torch.Tensor  # [n, 4, h, w] scaled VAE posterior means
    prompts: PromptEmbeddings | None = None  # None when invert=False
    timesteps: list[int] = field(default_factory=list)
    source_latents: dict[int, torch.Tensor] = field(default_factory=dict)  # inversion.latents
    inversion: Inversion | None = None  # the whole inversion (method, latents, DDPM noise maps, forwards spent)
    warnings: list[str] = field(default_factory=list)


def prepare_source(cfg: RunConfig, positions: list[int] | None = None, invert: bool = True, *, models=None,
                   on_progress: Callable[[int], None] | None = None) -> SourceVideo:
    """Read, load the models, encode, embed the prompts and invert (cached). `positions`: only these
    frames of the selection (a figure of two frames needs no more); `invert=False` stops after encoding.
    `models`: cfg.model's, already built on cfg's device and dtype (None builds them); `on_progress(k)`:
    k more frame-steps of the inversion are done (raising in it, e.g. KeyboardInterrupt, stops the
    inversion with the finished frames cached)."""
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    video = load_video(cfg)
    positions = list(range(video.num_frames)) if positions is None else list(positions)
    bad = [i for i in positions if not 0 <= i < video.num_frames]
    if bad:
        raise ValueError(f"frames {bad} are outside the clip's {video.num_frames} selected frames (0..{video.num_frames - 1})")
    frames = video.frames[positions]
    models = build_models(cfg.model, device=device, dtype=dtype) if models is None else models
    models.unet.set_feed_forward_chunk(cfg.tokenflow.ff_chunk)
    clean = encode_frames(models.vae, to_model_range(frames), cfg.inversion.batch_size)
    src = SourceVideo(cfg=cfg, video=video, frames=frames, models=models, device=device, dtype=dtype, clean=clean)
    if not invert:
        return src
    src.prompts, src.warnings = embed_prompts(models, cfg, device)
    schedule = models.config.schedule
    src.timesteps = schedule.timesteps(cfg.steps).tolist()
    keep = kept_timesteps(src.timesteps, cfg.inversion.skip)
    cache = open_for_run(cfg, video, positions, keep, dtype)
    src.inversion = invert_for_run(cfg, models.unet, schedule, clean, src.prompts, keep,
                                   frame_ids=[video.indices[i] for i in positions], cache=cache, on_progress=on_progress)
    src.source_latents = src.inversion.latents
    return src
