"""How well an inversion comes back: sample the inversion prompt from it and compare with the source.

The TokenFlow authors' README asks for a good reconstruction before a good edit, and their code
writes `inverted.mp4` for the user to check it. `reconstruct_latents` samples the source back from
an `inversion.Inversion`:
- DDIM: deterministic DDIM sampling from x_T with the inversion prompt and no guidance, as the
  authors' code makes inverted.mp4; its error is the inversion's (the DDIM path is only
  approximately invertible, and less so the fewer the steps);
- DDPM: sampling with the stored noise maps, the inversion prompt and the source guidance
  (inversion.source_guidance_scale), through the same model function the maps were measured with:
  exact by construction up to float rounding, at any step count.
`psnr` compares frames; against the VAE round trip (decode(encode(frames))) it tells the inversion's
error from the VAE's.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from sampler.ddim import sample
from sampler.ddpm import ddpm_sample
from sampler.schedule import Schedule
from unet.model import UNet

from .edit import batches
from .inversion import Inversion, source_model_fn


@torch.no_grad()
def reconstruct_latents(
    unet: UNet, schedule: Schedule, inversion: Inversion, source: Tensor, negative: Tensor, *, guidance_scale: float = 1.0,
    batch_size: int = 8, on_forward: Callable[[int], None] | None = None,
) -> Tensor:
    """The clean latents [n, 4, h, w] (float32, CPU) sampled back from `inversion`, starting at its
    largest kept timestep. source, negative: the prompts' embeddings [1, 77, C]; guidance_scale: the
    DDPM maps' source guidance (DDIM ignores it and `negative`: it samples unguided, as it inverted).
    on_forward(b): each UNet forward, with the frames it carried."""
    ts = inversion.timesteps
    if not ts:
        raise ValueError("reconstruction: the inversion kept no timesteps")
    start = inversion.latents[ts[0]]
    n = start.shape[0]
    device = source.device
    out = []
    for frames in batches(n, batch_size):
        if inversion.method == "ddpm":
            if inversion.noise_maps is None:
                raise ValueError("reconstruction: a DDPM inversion without its noise maps")
            model_fn = source_model_fn(unet, source, negative, guidance_scale, len(frames), on_forward)
            maps = {t: inversion.noise_maps[t][frames].to(device) for t in ts}
            x0 = ddpm_sample(model_fn, start[frames].to(device), schedule, ts, maps)
        else:
            model_fn = source_model_fn(unet, source, negative, 1.0, len(frames), on_forward)
            x0 = sample(model_fn, start[frames].to(device), schedule, ts)
        out.append(x0.cpu())
    return torch.cat(out)


def squared_error(a: Tensor, b: Tensor) -> tuple[float, int]:
    """(sum of squared differences, number of values) of two frame tensors of one shape, in float64:
    shares of a clip add up to the clip's (torchrun ranks sum theirs)."""
    if a.shape != b.shape:
        raise ValueError(f"psnr: frames of shape {tuple(a.shape)} and {tuple(b.shape)} differ")
    d = a.double() - b.double()
    return float((d * d).sum()), d.numel()


def psnr_from_error(sse: float, count: int, data_range: float = 255.0) -> float:
    """PSNR in dB from a sum of squared errors over `count` values; inf for identical frames."""
    if count <= 0:
        raise ValueError("psnr: no values to compare")
    mse = sse / count
    return math.inf if mse == 0 else 10 * math.log10(data_range**2 / mse)


def psnr(a: Tensor, b: Tensor, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB of frames `a` against `b` (one MSE over every value of the
    clip). uint8 frames: peak 255 unless `data_range` says otherwise; float frames need data_range
    (2.0 for [-1, 1], 1.0 for [0, 1]). Identical frames: inf."""
    if data_range is None:
        if a.dtype != torch.uint8 or b.dtype != torch.uint8:
            raise ValueError(f"psnr: float frames ({a.dtype}, {b.dtype}) need data_range (2.0 for [-1, 1], 1.0 for [0, 1])")
        data_range = 255.0
    return psnr_from_error(*squared_error(a, b), data_range=data_range)


class RunReconstruction:
    """A run's reconstruction of its frames (output.reconstruction=true): the decoded frames, the
    squared errors against the source frames (of the inversion and of the VAE round trip alone,
    summed over this process's frames; torchrun ranks add theirs) and the UNet forwards spent."""

    def __init__(self, frames: Tensor, error: tuple[float, int], vae_error: tuple[float, int], forwards: int, branches: int):
        self.frames = frames  # uint8 [n, H, W, 3]
        self.error, self.vae_error = error, vae_error
        self.unet_frame_forwards, self.branches = forwards, branches

    @staticmethod
    def psnr_db(errors: list[tuple[float, int]]) -> float:
        """PSNR (dB, 3 decimals) of summed (squared error, count) shares."""
        return round(psnr_from_error(sum(e for e, _ in errors), sum(c for _, c in errors)), 3)

    def psnrs(self, shard=None) -> tuple[float, float]:
        """(reconstruction, VAE round trip) PSNR in dB over the clip. Under torchrun (shard: a
        distributed.FrameShard) every rank calls it: the ranks' errors are added, its frames and
        forwards become the whole clip's (frames on rank 0 only, None elsewhere)."""
        errors = [(self.error, self.vae_error)]
        if shard is not None:
            errors = shard.ranks.all_gather((self.error, self.vae_error))
            (self.unet_frame_forwards,) = shard.ranks.sum((self.unet_frame_forwards,))
            self.frames = shard.gather_to_root(self.frames)
        return self.psnr_db([e for e, _ in errors]), self.psnr_db([v for _, v in errors])


def reconstruct_for_run(cfg, models, inversion: Inversion, prompts, clean: Tensor, frames: Tensor) -> RunReconstruction:
    """The run's reconstruction stage: sample the inversion prompt back from `inversion` (DDPM with
    inversion.source_guidance_scale), decode it, and measure it and the VAE round trip of `clean`
    against `frames` (uint8 [n, H, W, 3], the source frames `clean` encodes). cfg: config.RunConfig;
    prompts: edit.PromptEmbeddings."""
    from .inversion import decode_latents
    from .media import from_model_range

    forwards = [0]
    latents = reconstruct_latents(models.unet, models.config.schedule, inversion, prompts.source, prompts.negative,
                                  guidance_scale=cfg.inversion.source_guidance_scale, batch_size=cfg.inversion.batch_size,
                                  on_forward=lambda b: forwards.__setitem__(0, forwards[0] + b))
    batch = cfg.inversion.batch_size
    back = from_model_range(decode_latents(models.vae, latents, batch))
    round_trip = from_model_range(decode_latents(models.vae, clean, batch))
    guided = inversion.method == "ddpm" and cfg.inversion.source_guidance_scale != 1
    return RunReconstruction(back, squared_error(back, frames), squared_error(round_trip, frames), forwards[0], 2 if guided else 1)
