"""The stochastic DDPM step (DDIM with eta = 1) and edit-friendly DDPM inversion
(Huberman-Spiegelglas, Kulikov, Michaeli, "An Edit Friendly DDPM Noise Space", CVPR 2024).

Notation as in ddim.py: a_t = alpha_bar_t, t_prev the next (lower) point of the sampling grid,
a_{t_prev} = final_alpha_cumprod after the last step (t_prev = -1).

The DDPM step (DDIM, Song et al. Eq. 12 and 16, at eta = 1) from x_t with a given variance noise z:
    x0_pred, eps_pred  from the model output (predict_x0_and_eps: epsilon or v)
    sigma_t^2 = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    mu_t      = sqrt(a_prev) x0_pred + sqrt(1 - a_prev - sigma_t^2) eps_pred
    x_prev    = mu_t + sigma_t z

Edit-friendly inversion of clean latents x_0 over the grid t_T > ... > t_1:
    noisy versions, drawn independently (not a Markov chain):
        x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) e_t,   e_t ~ N(0, I), one draw per grid point
    noise maps, from t_T down to t_1, with the model (the caller's guided output):
        z_t = (x_prev - mu_t(x_t)) / sigma_t,      x_prev = the noisy version at t_prev (x_0 after t_1)
Sampling from x_{t_T} with the same model and the same maps gives back every x_t and x_0, to float
rounding, at any number of steps: each step's z_t is, by construction, what carries mu_t to x_prev.
Under another prompt or guidance the maps still hold the structure of the original (the "edit").

Where sigma_t = 0 (a_t = a_prev: the last step of a 1000-step grid when final_alpha_cumprod is
alpha_0) the step is deterministic and no noise can move it: its map is zero and that step lands
on mu_t, not on x_prev.

Arithmetic follows ddim.py: alpha terms in float32, in the reference's order of operations (parity
with diffusers' DDIMScheduler.step(eta=1, variance_noise=z) to 1e-6); the state (x_t, z_t) is kept
in at least float32 (`state_dtype`) whatever dtype the model runs in.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from sampler.ddim import ModelFn, _alpha_like, _check_grid, add_noise, predict_x0_and_eps, state_dtype
from sampler.schedule import Schedule


def _mean_and_std(schedule: Schedule, model_output: torch.Tensor, t, t_prev, x: torch.Tensor):
    """(mu_t, sigma_t) of the DDPM step x_t -> x_{t_prev}; sigma_t is 0-dim, or [B, 1, 1, 1] for
    per-sample timesteps. The one place both the step and the noise maps compute them, so that
    sampling with a map reproduces exactly the mean the map was measured against."""
    x0, eps = predict_x0_and_eps(schedule, model_output, t, x)
    a_t = _alpha_like(schedule, t, x)
    a_prev = _alpha_like(schedule, t_prev, x)
    # sigma_t^2 = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)   (Song et al. Eq. 16, eta = 1)
    variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    std = variance**0.5
    # 1 - a_prev - sigma^2 >= 0 in exact arithmetic; the clamp only keeps a rounding below 0 from a NaN
    direction = (1 - a_prev - std**2).clamp(min=0) ** 0.5
    mu = (a_prev**0.5).to(x.dtype) * x0 + direction.to(x.dtype) * eps
    return mu, std.to(x.dtype)


def ddpm_step(schedule: Schedule, model_output: torch.Tensor, t, t_prev, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """One DDPM denoising step (DDIM at eta = 1) x_t -> x_{t_prev} = mu_t + sigma_t z with the given noise z.
    t_prev < 0 lands on final_alpha_cumprod; t, t_prev may be per-sample [B] tensors as in ddim_step."""
    if noise.shape != x.shape:
        raise ValueError(f"ddpm_step: noise shape {tuple(noise.shape)} != sample shape {tuple(x.shape)}")
    mu, std = _mean_and_std(schedule, model_output, t, t_prev, x)
    return mu + std * noise.to(x.dtype)


def ddpm_noise_map(
    schedule: Schedule, model_output: torch.Tensor, t, t_prev, x: torch.Tensor, x_prev: torch.Tensor
) -> torch.Tensor:
    """The edit-friendly noise map of one step: z_t = (x_prev - mu_t) / sigma_t (0 where sigma_t = 0),
    the z for which ddpm_step(model_output, t, t_prev, x, z) returns x_prev."""
    if x_prev.shape != x.shape:
        raise ValueError(f"ddpm_noise_map: x_prev shape {tuple(x_prev.shape)} != sample shape {tuple(x.shape)}")
    mu, std = _mean_and_std(schedule, model_output, t, t_prev, x)
    z = (x_prev.to(x.dtype) - mu) / torch.where(std > 0, std, torch.ones_like(std))
    return torch.where(std > 0, z, torch.zeros_like(z))


def draw_version_noise(
    shape, timesteps, generator: torch.Generator, *, shared: bool = False, dtype: torch.dtype = torch.float32,
    device=None,
) -> dict[int, torch.Tensor]:
    """The e_t of the noisy versions: {t: [n, ...] standard normal} for every t of `timesteps`,
    drawn from `generator` in the order given. shared=True draws one [1, ...] map per step and
    expands it over the n rows of `shape` (every frame of the video sees the same e_t); otherwise
    each row has its own. The draw happens on the CPU so a seed gives the same maps on any device.
    Drawing per frame with a per-frame generator (and shape [1, ...]) makes a frame's e_t
    independent of how frames are batched."""
    shape = tuple(shape)
    ts = [int(t) for t in timesteps]
    one = (1, *shape[1:]) if shared else shape
    out = {}
    for t in ts:
        e = torch.randn(one, generator=generator, dtype=torch.float32)
        out[t] = e.expand(shape).to(device=device, dtype=dtype)
    return out


def noisy_versions(schedule: Schedule, x0: torch.Tensor, noise: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) e_t for every t of `noise` ({t: e_t}, each e_t of x0's
    shape or [1, ...] to share it across the batch); the state dtype (float32 at least)."""
    x0 = x0.to(state_dtype(x0.dtype))
    return {int(t): add_noise(schedule, x0, e.to(x0).expand_as(x0), int(t)) for t, e in noise.items()}


def ddpm_invert(
    model_fn: ModelFn,
    x0: torch.Tensor,
    schedule: Schedule,
    timesteps,
    noise: dict[int, torch.Tensor],
    progress: Callable[[Iterable], Iterable] | None = None,
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Edit-friendly DDPM inversion (Huberman-Spiegelglas et al. 2024, Sec. 3 / their Alg. 1) of clean
    latents x0 [n, ...] on the sampling grid `timesteps` (descending t_T ... t_1).

    noise: {t: e_t} for every t of the grid (draw_version_noise), each of x0's shape or [1, ...].
    model_fn(x, t) returns the guided model output the sampler will use for reconstruction (source
    prompt, source guidance scale); it is called once per step, on the noisy versions x_t.
    Returns (xs, zs): xs = {t: x_t} the noisy versions, zs = {t: z_t} the noise maps, both [n, ...]
    in the state dtype. The step from t_1 targets x0 itself (final_alpha_cumprod).
    """
    ts = _check_grid(schedule, timesteps, "ddpm_invert")
    missing = [t for t in ts if t not in {int(k) for k in noise}]
    if missing:
        raise ValueError(f"ddpm_invert: no noise e_t for timesteps {missing[:5]}")
    bad = [int(t) for t, e in noise.items() if e.shape != x0.shape and e.shape != (1, *x0.shape[1:])]
    if bad:
        raise ValueError(f"ddpm_invert: e_t at t={bad[0]} has shape {tuple(noise[bad[0]].shape)}, "
                         f"want {tuple(x0.shape)} or {(1, *x0.shape[1:])}")
    x0 = x0.to(state_dtype(x0.dtype))
    xs = noisy_versions(schedule, x0, {t: noise[t] for t in ts})
    targets = ts[1:] + [-1]
    steps = range(len(ts))
    if progress is not None:
        steps = progress(steps)
    zs = {}
    for i in steps:
        t, t_prev = ts[i], targets[i]
        x_prev = xs[t_prev] if t_prev >= 0 else x0
        zs[t] = ddpm_noise_map(schedule, model_fn(xs[t], t), t, t_prev, xs[t], x_prev)
    return xs, zs


def ddpm_sample(
    model_fn: ModelFn,
    x_start: torch.Tensor,
    schedule: Schedule,
    timesteps,
    noise_maps: dict[int, torch.Tensor],
    progress: Callable[[Iterable], Iterable] | None = None,
) -> torch.Tensor:
    """DDPM sampling with given noise maps from x_start at timesteps[0] down to the clean sample
    (DDPM-inversion's sampler: x_prev = mu_t + sigma_t z_t at every step). With ddpm_invert's x_t and
    z_t and the same model_fn it returns x0 to float rounding; the grid may start at any t_s of the
    inversion's grid (skipping the first steps)."""
    ts = _check_grid(schedule, timesteps, "ddpm_sample")
    missing = [t for t in ts if t not in noise_maps]
    if missing:
        raise ValueError(f"ddpm_sample: no noise map for timesteps {missing[:5]}")
    targets = ts[1:] + [-1]
    steps = range(len(ts))
    if progress is not None:
        steps = progress(steps)
    x = x_start.to(state_dtype(x_start.dtype))
    for i in steps:
        t = ts[i]
        x = ddpm_step(schedule, model_fn(x, t), t, targets[i], x, noise_maps[t].to(x))
    return x
