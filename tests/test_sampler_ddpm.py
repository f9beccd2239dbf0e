"""sampler/ddpm.py: the DDPM step against diffusers' DDIMScheduler.step(eta=1, variance_noise=z)
(reference only; the product never imports diffusers), and edit-friendly inversion at the sampler
level: sampling with the stored maps gives back every noisy version and x_0.

Tiny [2, 4, 8, 8] latents and closed-form "models": the file runs in a couple of seconds.
"""

import math

import pytest
import torch
from diffusers import DDIMScheduler

from sampler import (
    Schedule,
    ddim_step,
    ddpm_invert,
    ddpm_noise_map,
    ddpm_sample,
    ddpm_step,
    draw_version_noise,
    noisy_versions,
)

PREDICTIONS = ["epsilon", "v_prediction"]
SHAPE = (2, 4, 8, 8)


def reference(prediction_type, steps, **over):
    kw = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
              clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
              prediction_type=prediction_type)
    kw.update(over)
    ref = DDIMScheduler(**kw)
    ref.set_timesteps(steps)
    return ref


def randn(seed, shape=SHAPE):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def toy_model(seed=7):
    """A deterministic, nonlinear function of (x, t): not a denoiser, only for the step arithmetic."""
    pattern = randn(seed)

    def model_fn(x, t):
        return 0.4 * math.cos(t / 150.0) * torch.tanh(x) + 0.8 * math.sin(t / 300.0 + 0.2) * pattern

    return model_fn


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("steps", [10, 50])
def test_ddpm_step_matches_diffusers_eta_1(prediction_type, steps):
    """Every step of a run, the last one (to final_alpha_cumprod) included."""
    schedule = Schedule(prediction_type=prediction_type)
    ref = reference(prediction_type, steps)
    ts = schedule.timesteps(steps).tolist()
    assert ts == ref.timesteps.tolist()
    model_fn = toy_model()
    x = randn(1)
    for i, t in enumerate(ts):
        out, z = model_fn(x, t), randn(100 + i)
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        want = ref.step(out, t, x, eta=1.0, variance_noise=z).prev_sample
        got = ddpm_step(schedule, out, t, t_prev, x, z)
        assert (got - want).abs().max().item() <= 1e-6, (prediction_type, t)
        x = want
    assert t_prev == -1  # the loop did reach the last step


def test_ddpm_step_matches_diffusers_with_alpha_one():
    """set_alpha_to_one: the last step lands on a = 1 (sigma = 0 there: the noise has no effect)."""
    schedule = Schedule(set_alpha_to_one=True)
    ref = reference("epsilon", 10, set_alpha_to_one=True)
    x, out, z = randn(1), randn(2), randn(3)
    for t, t_prev in ((901, 801), (1, -1)):
        want = ref.step(out, t, x, eta=1.0, variance_noise=z).prev_sample
        assert (ddpm_step(schedule, out, t, t_prev, x, z) - want).abs().max().item() <= 1e-6
    assert torch.equal(ddpm_step(schedule, out, 1, -1, x, z), ddpm_step(schedule, out, 1, -1, x, 0 * z))


def test_ddpm_step_with_a_zero_map_is_not_ddim_and_its_noise_moves_it_by_sigma():
    """A zero map is not DDIM (eta = 1 shrinks the eps direction), and a step with noise moves by sigma z."""
    schedule = Schedule()
    x, out, z = randn(1), randn(2), randn(3)
    no_noise = ddpm_step(schedule, out, 501, 481, x, torch.zeros_like(x))
    assert (no_noise - ddim_step(schedule, out, 501, 481, x)).abs().max().item() > 1e-3
    a_t, a_prev = schedule.alpha_at(501), schedule.alpha_at(481)
    sigma = ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
    assert torch.allclose(ddpm_step(schedule, out, 501, 481, x, z) - no_noise, sigma * z, atol=1e-6)


def test_ddpm_step_per_sample_timesteps():
    schedule = Schedule()
    x, out, z = randn(1), randn(2), randn(3)
    got = ddpm_step(schedule, out, torch.tensor([981, 21]), torch.tensor([961, -1]), x, z)
    for b, (t, t_prev) in enumerate(((981, 961), (21, -1))):
        one = ddpm_step(schedule, out[b:b + 1], t, t_prev, x[b:b + 1], z[b:b + 1])
        assert torch.allclose(got[b:b + 1], one, atol=1e-7)
    with pytest.raises(ValueError, match="noise shape"):
        ddpm_step(schedule, out, 981, 961, x, z[:1])


def test_noise_map_inverts_the_step():
    """z = ddpm_noise_map(...) is the noise for which ddpm_step lands on the given x_prev."""
    schedule = Schedule(prediction_type="v_prediction")
    x, out, target = randn(1), randn(2), randn(3)
    z = ddpm_noise_map(schedule, out, 501, 481, x, target)
    assert (ddpm_step(schedule, out, 501, 481, x, z) - target).abs().max().item() <= 1e-5


def test_noise_map_is_zero_where_the_step_has_no_variance():
    """1000 steps end on t = 0 -> final_alpha_cumprod = alpha_0: sigma = 0, no division by zero."""
    schedule = Schedule()
    z = ddpm_noise_map(schedule, randn(2), 0, -1, randn(1), randn(3))
    assert torch.equal(z, torch.zeros_like(z))


def test_draw_version_noise_shared_and_independent():
    ts = [901, 801, 701]
    own = draw_version_noise(SHAPE, ts, torch.Generator().manual_seed(0))
    shared = draw_version_noise(SHAPE, ts, torch.Generator().manual_seed(0), shared=True)
    assert sorted(own) == sorted(ts) and all(e.shape == SHAPE for e in own.values())
    assert not torch.equal(own[901][0], own[901][1])  # each frame its own e_t
    assert torch.equal(shared[901][0], shared[901][1])  # one e_t for all frames
    assert not torch.equal(shared[901], shared[801])  # but independent across steps
    again = draw_version_noise(SHAPE, ts, torch.Generator().manual_seed(0))
    assert all(torch.equal(own[t], again[t]) for t in ts)


def test_noisy_versions_are_the_forward_process_not_a_chain():
    schedule = Schedule()
    x0 = randn(1)
    noise = {901: randn(2), 501: randn(3)}
    xs = noisy_versions(schedule, x0, noise)
    for t, e in noise.items():
        a = schedule.alpha_at(t)
        assert torch.allclose(xs[t], a.sqrt() * x0 + (1 - a).sqrt() * e, atol=1e-6)


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("steps", [10, 50])
@pytest.mark.parametrize("shared", [False, True])
def test_sampling_with_the_maps_returns_every_noisy_version_and_x0(prediction_type, steps, shared):
    """Edit-friendly inversion is exact by construction: ddpm_sample from x_T with the same model
    and the stored maps passes through every x_t of the inversion and ends on x_0."""
    schedule = Schedule(prediction_type=prediction_type)
    ts = schedule.timesteps(steps).tolist()
    model_fn = toy_model()
    x0 = randn(1)
    noise = draw_version_noise(SHAPE, ts, torch.Generator().manual_seed(5), shared=shared)
    xs, zs = ddpm_invert(model_fn, x0, schedule, ts, noise)
    assert sorted(xs) == sorted(ts) and sorted(zs) == sorted(ts)
    visited = {}

    def watching(x, t):
        visited[t] = x.clone()
        return model_fn(x, t)

    out = ddpm_sample(watching, xs[ts[0]], schedule, ts, zs)
    assert max((visited[t] - xs[t]).abs().max().item() for t in ts) <= 1e-5
    assert (out - x0).abs().max().item() <= 1e-5
    # starting later (skipping the first steps) is exact as well
    assert (ddpm_sample(model_fn, xs[ts[3]], schedule, ts[3:], zs) - x0).abs().max().item() <= 1e-5


def test_another_model_does_not_reconstruct():
    """The exactness above is about the maps and the model together: a different model_fn (an
    edit) with the same maps lands elsewhere."""
    schedule = Schedule()
    ts = schedule.timesteps(10).tolist()
    x0 = randn(1)
    xs, zs = ddpm_invert(toy_model(7), x0, schedule, ts, draw_version_noise(SHAPE, ts, torch.Generator().manual_seed(5)))
    assert (ddpm_sample(toy_model(8), xs[ts[0]], schedule, ts, zs) - x0).abs().max().item() > 1e-2


def test_ddpm_invert_bad_inputs():
    schedule = Schedule()
    ts = schedule.timesteps(10).tolist()
    noise = draw_version_noise(SHAPE, ts[1:], torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"no noise e_t for timesteps \[901\]"):
        ddpm_invert(toy_model(), randn(1), schedule, ts, noise)
    noise[901] = torch.zeros(3, 4, 8, 8)
    with pytest.raises(ValueError, match="e_t at t=901 has shape"):
        ddpm_invert(toy_model(), randn(1), schedule, ts, noise)
    with pytest.raises(ValueError, match="no noise map for timesteps"):
        ddpm_sample(toy_model(), randn(1), schedule, ts, {})
