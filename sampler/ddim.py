"""Deterministic DDIM (Song et al., eta = 0) and DDIM inversion, as used in TokenFlow Sec. 3.

Notation: a_t = alpha_bar_t = schedule.alphas_cumprod[t]; the forward process is
    x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps.
A DDIM step moves a sample from timestep s to timestep r along that line, keeping the predicted
noise fixed:
    x_r = sqrt(a_r) x0_pred + sqrt(1 - a_r) eps_pred,    x0_pred = (x_s - sqrt(1 - a_s) eps_pred) / sqrt(a_s)
Sampling uses r < s; inversion runs the same map with r > s ("applying the algorithm in reverse
order", Sec. 3). No model code here: a model is a function model_fn(x, t) -> model output, where
t is a Python int and the output is eps or v depending on schedule.prediction_type. In `invert`
and `sample`, x arrives in the state dtype (float32): a model in a reduced dtype casts it itself.

Arithmetic: the alpha terms are computed in float32 (the schedule's dtype) and cast to x's dtype,
in the same order of operations as the diffusers reference, which keeps parity to 1e-6. A step
computes in x's dtype: a model output of another dtype (a float16/bfloat16 UNet) is cast up to it
first. `invert` and `sample` keep their state (the latents between steps) in at least float32
whatever dtype the model runs in (`state_dtype`): in bfloat16, with 8 bits of mantissa, rounding
x_t at every one of 50 steps costs more than the model's own rounding (an exact-noise toy:
reconstruction RMSE 0.0192 with a bfloat16 state, 0.0010 with a float32 state and a bfloat16 model).
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from sampler.schedule import Schedule

ModelFn = Callable[[torch.Tensor, int], torch.Tensor]


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the DDIM state is kept in for latents of `dtype`: float32, or float64 if given.
    Only the model runs in a reduced dtype; model_fn casts x to it and its output is cast back."""
    return torch.promote_types(dtype, torch.float32)


def _alpha_like(schedule: Schedule, t, x: torch.Tensor) -> torch.Tensor:
    """a_t as a float32 tensor broadcastable against x: 0-dim for an int t, [B, 1, 1, ...] for a
    per-sample timestep tensor t of shape [B]."""
    if isinstance(t, torch.Tensor) and t.ndim > 0:
        if t.ndim != 1 or t.shape[0] != x.shape[0]:
            raise ValueError(
                f"per-sample timesteps must have shape [batch]=[{x.shape[0]}], got {tuple(t.shape)}"
            )
        a = schedule.alpha_at(t.to(x.device))
        return a.view(-1, *([1] * (x.ndim - 1)))  # [B] -> [B, 1, 1, ...]
    # A 0-dim CPU tensor mixes with a tensor on any device as a scalar: no copy per step.
    return schedule.alpha_at(int(t))


def predict_x0_and_eps(schedule: Schedule, model_output: torch.Tensor, t, x: torch.Tensor, model_t=None):
    """Turn the model output at x = x_t into (x0_pred, eps_pred).
    epsilon:      eps = out,                             x0 = (x - sqrt(1 - a_t) eps) / sqrt(a_t)
    v_prediction: x0 = sqrt(a_t) x - sqrt(1 - a_t) v,    eps = sqrt(a_t) v + sqrt(1 - a_t) x

    model_t: the timestep label the model was given, when it is not t (DDIM inversion feeds x_t
    with the next timestep's label). A v output only means something at the level the model was
    told, so then eps = sqrt(a_m) v + sqrt(1 - a_m) x (what an eps-model would have said for the
    same call) and x0 = (x - sqrt(1 - a_t) eps) / sqrt(a_t). Irrelevant for epsilon models.
    """
    if model_output.shape != x.shape:
        raise ValueError(f"model output shape {tuple(model_output.shape)} != sample shape {tuple(x.shape)}")
    # the step computes in x's dtype: a 0-dim alpha times a bfloat16 output would stay bfloat16
    model_output = model_output.to(x.dtype)
    a = _alpha_like(schedule, t, x)
    sqrt_a = (a**0.5).to(x.dtype)
    sqrt_1ma = ((1 - a) ** 0.5).to(x.dtype)
    if schedule.prediction_type == "epsilon":
        eps = model_output
        x0 = (x - sqrt_1ma * eps) / sqrt_a
    elif schedule.prediction_type == "v_prediction" and model_t is None:
        x0 = sqrt_a * x - sqrt_1ma * model_output
        eps = sqrt_a * model_output + sqrt_1ma * x
    elif schedule.prediction_type == "v_prediction":
        a_m = _alpha_like(schedule, model_t, x)
        eps = (a_m**0.5).to(x.dtype) * model_output + ((1 - a_m) ** 0.5).to(x.dtype) * x
        x0 = (x - sqrt_1ma * eps) / sqrt_a
    else:  # Schedule validates this on construction; kept for objects mutated afterwards
        raise ValueError(f"unknown prediction_type {schedule.prediction_type!r}")
    return x0, eps


def _move(schedule: Schedule, x0: torch.Tensor, eps: torch.Tensor, t_target, like: torch.Tensor) -> torch.Tensor:
    # x_r = sqrt(a_r) x0_pred + sqrt(1 - a_r) eps_pred   (DDIM, eta = 0)
    a = _alpha_like(schedule, t_target, like)
    return (a**0.5).to(like.dtype) * x0 + ((1 - a) ** 0.5).to(like.dtype) * eps


def ddim_step(schedule: Schedule, model_output: torch.Tensor, t, t_prev, x: torch.Tensor) -> torch.Tensor:
    """One deterministic DDIM denoising step x_t -> x_{t_prev} (t_prev < t; t_prev < 0 lands on
    final_alpha_cumprod, i.e. the clean sample).
        x_{t_prev} = sqrt(a_{t_prev}) x0_pred + sqrt(1 - a_{t_prev}) eps_pred
    """
    x0, eps = predict_x0_and_eps(schedule, model_output, t, x)
    return _move(schedule, x0, eps, t_prev, x)


def ddim_inversion_step(
    schedule: Schedule, model_output: torch.Tensor, t, t_next, x: torch.Tensor, model_t=None
) -> torch.Tensor:
    """One DDIM inversion step x_t -> x_{t_next} (t_next > t; t < 0 means x is the clean sample at
    final_alpha_cumprod). The predictions come from the model output at the current sample x_t:
        x_{t_next} = sqrt(a_{t_next}) x0_pred + sqrt(1 - a_{t_next}) eps_pred,
        x0_pred = (x_t - sqrt(1 - a_t) eps_pred) / sqrt(a_t)
    model_t: the timestep label the model saw (see predict_x0_and_eps; only matters for v).
    Default None converts a v output at a_t, exactly as diffusers' DDIMInverseScheduler.step does
    even though its pipeline labels the call with t_next; `invert` passes model_t=t_next.
    """
    x0, eps = predict_x0_and_eps(schedule, model_output, t, x, model_t=model_t)
    return _move(schedule, x0, eps, t_next, x)


def classifier_free_guidance(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    # out = out_uncond + w (out_cond - out_uncond); w = 1 is the plain conditional output.
    return uncond + scale * (cond - uncond)


def _check_grid(schedule: Schedule, timesteps, what: str) -> list[int]:
    ts = [int(t) for t in timesteps]
    if not ts:
        raise ValueError(f"{what}: timesteps are empty")
    n = schedule.num_train_timesteps
    bad = [t for t in ts if not 0 <= t < n]
    if bad:
        raise ValueError(f"{what}: timesteps {bad[:5]} are out of range [0, {n - 1}]")
    if any(a <= b for a, b in zip(ts, ts[1:])):
        raise ValueError(f"{what}: timesteps must be strictly descending, got {ts[:5]}...")
    return ts


def inversion_timesteps(schedule: Schedule, num_inversion_steps: int, keep_timesteps: Iterable[int]) -> list[int]:
    """The timesteps DDIM inversion steps through, ascending: the `num_inversion_steps` grid and
    the keep timesteps merged, up to the largest keep timestep (nothing above it is returned).

    Merging makes any inversion step count usable with any sampling grid: a keep timestep the grid
    lacks becomes one more (shorter) step of the same deterministic map, and the sampler later
    starts from exactly the latents it needs."""
    keep = sorted({int(t) for t in keep_timesteps})
    if not keep:
        raise ValueError("invert: keep_timesteps is empty: nothing to return")
    _check_grid(schedule, keep[::-1], "invert keep_timesteps")
    grid = schedule.timesteps(num_inversion_steps).tolist()
    return sorted(t for t in set(grid) | set(keep) if t <= keep[-1])


def invert(
    model_fn: ModelFn,
    x0: torch.Tensor,
    schedule: Schedule,
    num_inversion_steps: int,
    keep_timesteps: Iterable[int],
    progress: Callable[[Iterable], Iterable] | None = None,
) -> dict[int, torch.Tensor]:
    """Deterministic DDIM inversion of clean latents x0 over the `num_inversion_steps` grid.

    Returns {t: x_t} for every t in keep_timesteps (typically the 50 sampling timesteps). Any
    number of inversion steps works: the path visits the inversion grid and the keep timesteps
    together (`inversion_timesteps`), so a keep timestep off the grid (50 sampling steps under 333
    inversion steps, say) is simply one more stop on the way up. On the grids that already contain
    the sampling timesteps (50 under 50, 500 or 1000 steps) nothing is added. The loop stops at the
    largest keep timestep, since nothing above it is returned.

    Convention (as diffusers' DDIMInverseScheduler, the TokenFlow / PnP / null-text inversion code):
    the step from grid point s to the next grid point r calls model_fn(x_s, r), i.e. the current
    latent with the TARGET timestep label. The sampler's step from r back to s calls
    model_fn(x_r, r), so inversion differs from an exact inverse of the sampler only through
    x_s ~= x_r, not through the timestep; it also never asks the model about a timestep below the
    grid. The first step starts from x0 at final_alpha_cumprod (t = -1). For v-prediction the
    output is read at the label's level (model_t=r); diffusers reads it at a_s instead, which on a
    Gaussian toy problem doubles the reconstruction error, while this makes a v-model invert
    exactly like the equivalent eps-model.

    progress: optional wrapper around the step iterable (e.g. tqdm) to show a bar.
    Run under torch.no_grad() with a real model: nothing here needs gradients.
    """
    grid = inversion_timesteps(schedule, num_inversion_steps, keep_timesteps)
    keep = set(int(t) for t in keep_timesteps)
    sources = [-1] + grid[:-1]
    steps = range(len(grid))
    if progress is not None:
        steps = progress(steps)
    kept = {}
    x = x0.to(state_dtype(x0.dtype))  # the state stays float32 for a float16/bfloat16 model
    for i in steps:
        t, t_next = sources[i], grid[i]
        if not torch.equal(schedule.alpha_at(t), schedule.alpha_at(t_next)):
            x = ddim_inversion_step(schedule, model_fn(x, t_next), t, t_next, x, model_t=t_next)
        # else: the step is the identity (x0 -> t = 0 when final_alpha_cumprod is alpha_0, the first
        # step of a 1000-step grid): x_r = x_s whatever the model says, so no model call is spent on it
        if t_next in keep:
            kept[t_next] = x
    return kept


def sample(
    model_fn: ModelFn,
    x_T: torch.Tensor,
    schedule: Schedule,
    timesteps,
    progress: Callable[[Iterable], Iterable] | None = None,
) -> torch.Tensor:
    """Plain deterministic DDIM from x_T at timesteps[0] down to the clean sample.
    model_fn(x, t) returns the (already guided) model output. Each step goes to the next entry
    of `timesteps`, the last one to final_alpha_cumprod; on the leading grid this is exactly the
    reference's t - num_train_timesteps // num_steps."""
    ts = _check_grid(schedule, timesteps, "sample")
    targets = ts[1:] + [-1]
    steps = range(len(ts))
    if progress is not None:
        steps = progress(steps)
    x = x_T.to(state_dtype(x_T.dtype))  # the state stays float32 for a float16/bfloat16 model
    for i in steps:
        x = ddim_step(schedule, model_fn(x, ts[i]), ts[i], targets[i], x)
    return x


def add_noise(schedule: Schedule, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
    """Forward process q(x_t | x0): x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise (t int or [B] tensor)."""
    if noise.shape != x0.shape:
        raise ValueError(f"add_noise: noise shape {tuple(noise.shape)} != x0 shape {tuple(x0.shape)}")
    if isinstance(t, int) and t < 0 or isinstance(t, torch.Tensor) and t.numel() and int(t.min()) < 0:
        raise ValueError(f"add_noise: timestep must be >= 0, got {t}")
    a = _alpha_like(schedule, t, x0)
    return (a**0.5).to(x0.dtype) * x0 + ((1 - a) ** 0.5).to(x0.dtype) * noise


def sdedit_first_step(n_steps: int, strength: float) -> int:
    """SDEdit's first step of a grid of n_steps: int(n_steps * strength) steps run, as the reference
    img2img counts them, so the first (n_steps - that) are skipped (n_steps: none runs)."""
    return n_steps - min(int(n_steps * strength), n_steps)


def sdedit_start(schedule: Schedule, x0: torch.Tensor, noise: torch.Tensor, strength: float, timesteps):
    """SDEdit: skip the first (1 - strength) of the sampling steps, noise x0 straight to the
    timestep reached, and denoise from there. strength 1 starts at timesteps[0] (pure noise
    level), 0.5 halfway. Number of steps kept is int(N * strength) as in the reference img2img.
    Returns (x_t, remaining_timesteps), remaining_timesteps[0] == t."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 < strength <= 1.0:
        raise ValueError(f"sdedit_start: strength must be a number in (0, 1], got {strength!r}")
    ts = _check_grid(schedule, timesteps, "sdedit_start")
    first = sdedit_first_step(len(ts), strength)
    if first == len(ts):
        raise ValueError(f"sdedit_start: strength {strength} of {len(ts)} steps leaves no step to run; raise strength")
    remaining = ts[first:]
    x_t = add_noise(schedule, x0, noise, remaining[0])
    return x_t, torch.tensor(remaining, dtype=torch.long)
