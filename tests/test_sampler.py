"""sampler/ against the diffusers DDIM schedulers (reference only; the product never imports them).

All tensors are tiny [2, 4, 8, 8] latents and all "models" are closed-form functions, so the whole
file runs in a couple of seconds.
"""

import math

import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler

from sampler import (
    Schedule,
    add_noise,
    classifier_free_guidance,
    ddim_inversion_step,
    ddim_step,
    invert,
    inversion_timesteps,
    predict_x0_and_eps,
    sample,
    sdedit_start,
    state_dtype,
)

PREDICTIONS = ["epsilon", "v_prediction"]
SHAPE = (2, 4, 8, 8)

# The published SD-2.1 scheduler configs (base: PNDM class name, eps; 768: DDIM class name, v).
SD21_BASE_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.10.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}


def reference_kwargs(prediction_type, **over):
    kw = dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type=prediction_type,
    )
    kw.update(over)
    return kw


def fake_model(t_scale=1.0):
    """A deterministic model output depending on x and t: a fixed random pattern plus a t-dependent
    multiple of x. Not a real denoiser; only used to compare step arithmetic."""
    pattern = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))

    def model_fn(x, t):
        t = float(t)
        return 0.3 * math.cos(t / 150.0) * x + 0.8 * math.sin(t / 300.0 + 0.2) * pattern

    return model_fn


def latents(seed=0, scale=1.0):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)) * scale


# ---------------------------------------------------------------- schedule


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_alphas_match_reference(prediction_type):
    ours = Schedule(prediction_type=prediction_type)
    ref = DDIMScheduler(**reference_kwargs(prediction_type))
    assert ours.alphas_cumprod.dtype == torch.float32
    assert torch.equal(ours.alphas_cumprod, ref.alphas_cumprod)
    assert torch.equal(ours.final_alpha_cumprod, ref.final_alpha_cumprod)
    assert ours.alpha_at(-5) == ref.alphas_cumprod[0]  # set_alpha_to_one False
    assert float(Schedule(set_alpha_to_one=True).alpha_at(-1)) == 1.0
    lin = Schedule(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    ref_lin = DDIMScheduler(**reference_kwargs(prediction_type, beta_schedule="linear", beta_start=1e-4, beta_end=0.02))
    assert torch.equal(lin.alphas_cumprod, ref_lin.alphas_cumprod)


def test_alpha_at_tensor():
    s = Schedule()
    t = torch.tensor([-1, 0, 1, 999])
    a = s.alpha_at(t)
    assert a.shape == (4,)
    assert a[0] == s.final_alpha_cumprod and a[1] == s.alphas_cumprod[0]
    assert a[2] == s.alphas_cumprod[1] and a[3] == s.alphas_cumprod[999]


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("num_steps", [10, 50, 500])
def test_timesteps_match_reference(prediction_type, num_steps):
    ours = Schedule(prediction_type=prediction_type).timesteps(num_steps)
    ref = DDIMScheduler(**reference_kwargs(prediction_type))
    ref.set_timesteps(num_steps)
    assert ours.dtype == torch.long
    assert torch.equal(ours, ref.timesteps)


def test_timesteps_sd21_50():
    assert Schedule().timesteps(50).tolist() == list(range(981, 0, -20))


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_timesteps_other_spacings_match_reference(spacing):
    for num_steps in [1, 3, 7, 10, 25, 50, 333, 500, 999]:
        ours = Schedule(timestep_spacing=spacing).timesteps(num_steps)
        ref = DDIMScheduler(**reference_kwargs("epsilon", timestep_spacing=spacing))
        ref.set_timesteps(num_steps)
        assert torch.equal(ours, ref.timesteps), (spacing, num_steps)


def test_timesteps_1000_leading_stays_in_range():
    # diffusers gives 1000, 999, ..., 1 and its step() then indexes alphas_cumprod[1000] (IndexError);
    # we drop the offset just enough to stay in range: every training timestep once.
    ours = Schedule().timesteps(1000)
    assert ours.tolist() == list(range(999, -1, -1))
    ref = DDIMScheduler(**reference_kwargs("epsilon"))
    ref.set_timesteps(1000)
    assert int(ref.timesteps[0]) == 1000
    # the 50 sampling timesteps are on the 1000- and 500-step grids
    sampling = set(Schedule().timesteps(50).tolist())
    assert sampling <= set(ours.tolist())
    assert sampling <= set(Schedule().timesteps(500).tolist())


def test_from_scheduler_config():
    s = Schedule.from_scheduler_config(SD21_BASE_CONFIG)
    assert s == Schedule()
    ref = DDIMScheduler.from_config(SD21_BASE_CONFIG)
    assert torch.equal(s.alphas_cumprod, ref.alphas_cumprod)
    v = Schedule.from_scheduler_config(
        {**SD21_BASE_CONFIG, "_class_name": "DDIMScheduler", "prediction_type": "v_prediction"}
    )
    assert v.prediction_type == "v_prediction"
    t = Schedule.from_scheduler_config({**SD21_BASE_CONFIG, "timestep_spacing": "trailing"})
    assert t.timesteps(50)[0] == 999


@pytest.mark.parametrize(
    "config, needle",
    [
        ({"beta_schedule": "squaredcos_cap_v2"}, "squaredcos_cap_v2"),
        ({"prediction_type": "sample"}, "sample"),
        ({"timestep_spacing": "karras"}, "karras"),
        ({"clip_sample": True}, "clip_sample"),
        ({"trained_betas": [0.1] * 1000}, "trained_betas"),
        ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
        ({"thresholding": True}, "thresholding"),
    ],
)
def test_from_scheduler_config_rejects(config, needle):
    with pytest.raises(ValueError, match=needle):
        Schedule.from_scheduler_config({**SD21_BASE_CONFIG, **config})


def test_schedule_bad_inputs():
    s = Schedule()
    for bad in [0, -1, 1001, 2.5, True, "50"]:
        with pytest.raises(ValueError, match="num_steps"):
            s.timesteps(bad)
    with pytest.raises(ValueError, match="1000"):
        s.alpha_at(1000)
    with pytest.raises(ValueError, match="1000"):
        s.alpha_at(torch.tensor([3, 1000]))
    with pytest.raises(ValueError, match="integer"):
        s.alpha_at(torch.tensor([3.0]))
    with pytest.raises(ValueError, match="dict"):
        Schedule.from_scheduler_config([("beta_start", 0.1)])


# ---------------------------------------------------------------- sampling steps


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_ddim_steps_match_reference(prediction_type):
    schedule = Schedule(prediction_type=prediction_type)
    ref = DDIMScheduler(**reference_kwargs(prediction_type))
    ref.set_timesteps(50)
    model_fn = fake_model()
    timesteps = schedule.timesteps(50)
    x_T = latents(1)
    x = x_T
    for i, t in enumerate(ref.timesteps):
        out = model_fn(x, int(t))
        expected = ref.step(out, t, x).prev_sample
        t_prev = int(timesteps[i + 1]) if i + 1 < len(timesteps) else -1
        got = ddim_step(schedule, out, int(t), t_prev, x)
        assert (got - expected).abs().max() <= 1e-6, (prediction_type, int(t))
        x = expected
    # the loop on its own reaches the same end point
    assert (sample(model_fn, x_T, schedule, timesteps) - x).abs().max() <= 1e-6


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_predict_x0_and_eps_consistent(prediction_type):
    """x0 and eps always recombine to x: x_t = sqrt(a) x0 + sqrt(1-a) eps, for both parameterisations."""
    schedule = Schedule(prediction_type=prediction_type)
    x, out = latents(2), latents(3)
    for t in [1, 481, 981]:
        x0, eps = predict_x0_and_eps(schedule, out, t, x)
        a = schedule.alpha_at(t)
        assert torch.allclose(a.sqrt() * x0 + (1 - a).sqrt() * eps, x, atol=1e-5)
    ref = DDIMScheduler(**reference_kwargs(prediction_type))
    ref.set_timesteps(50)
    assert (predict_x0_and_eps(schedule, out, 481, x)[0] - ref.step(out, 481, x).pred_original_sample).abs().max() <= 1e-6


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_per_sample_timesteps(prediction_type):
    schedule = Schedule(prediction_type=prediction_type)
    x, out = latents(4), latents(5)
    t, t_prev = torch.tensor([981, 41]), torch.tensor([961, -1])
    got = ddim_step(schedule, out, t, t_prev, x)
    for b in range(2):
        one = ddim_step(schedule, out[b : b + 1], int(t[b]), int(t_prev[b]), x[b : b + 1])
        assert torch.equal(got[b : b + 1], one)
    with pytest.raises(ValueError, match="batch"):
        ddim_step(schedule, out, torch.tensor([981, 961, 941]), 1, x)


def test_dtype_preserved():
    schedule = Schedule()
    x = latents(6).double()
    assert ddim_step(schedule, x * 0.1, 981, 961, x).dtype == torch.float64
    h = latents(6).half()
    assert ddim_inversion_step(schedule, h * 0.1, 1, 21, h).dtype == torch.float16
    # a step computes in x's dtype: a bfloat16 model output is cast up first, not rounded again
    x = latents(6)
    out = (x * 0.1).bfloat16()
    assert torch.equal(ddim_step(schedule, out, 981, 961, x), ddim_step(schedule, out.float(), 981, 961, x))
    assert [state_dtype(d) for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64)] == [
        torch.float32, torch.float32, torch.float32, torch.float64]


def test_classifier_free_guidance():
    u, c = latents(7), latents(8)
    assert torch.allclose(classifier_free_guidance(u, c, 1.0), c, atol=1e-6)  # u + (c - u) rounds
    assert torch.equal(classifier_free_guidance(u, c, 0.0), u)
    assert torch.allclose(classifier_free_guidance(u, c, 7.5), u + 7.5 * (c - u))


# ---------------------------------------------------------------- inversion


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_inversion_steps_match_reference(prediction_type):
    """DDIMInverseScheduler.step(out, t, x) maps x at t - 1000//N (clean sample at alphas_cumprod[0]
    before the first step, since set_alpha_to_one False) to x_t, and its pipeline evaluates the
    model at the TARGET t. Ours names both ends: ddim_inversion_step(out, t - ratio (or -1), t, x)."""
    schedule = Schedule(prediction_type=prediction_type)
    ref = DDIMInverseScheduler(**reference_kwargs(prediction_type))
    ref.set_timesteps(50)
    assert ref.timesteps.tolist() == schedule.timesteps(50).flip(0).tolist()
    model_fn = fake_model()
    x = latents(9, scale=0.5)
    source = -1
    for t in ref.timesteps.tolist():
        out = model_fn(x, t)
        expected = ref.step(out, t, x).prev_sample
        got = ddim_inversion_step(schedule, out, source, t, x)
        assert (got - expected).abs().max() <= 1e-6, (prediction_type, t)
        x, source = expected, t


def test_invert_matches_reference_loop_eps():
    schedule = Schedule()
    ref = DDIMInverseScheduler(**reference_kwargs("epsilon"))
    ref.set_timesteps(50)
    model_fn = fake_model()
    x0 = latents(10, scale=0.5)
    keep = schedule.timesteps(50).tolist()
    seen = []
    kept = invert(model_fn, x0, schedule, 50, keep, progress=lambda it: (seen.append(len(it)), it)[1])
    assert seen == [50]
    assert sorted(kept) == sorted(keep)
    x = x0
    for t in ref.timesteps.tolist():
        x = ref.step(model_fn(x, t), t, x).prev_sample
        assert (kept[t] - x).abs().max() <= 1e-6, t


def gaussian_eps(schedule, var):
    """The exact noise prediction for data ~ N(0, var I): x_t ~ N(0, (a var + 1 - a) I), so
    E[eps | x_t] = sqrt(1 - a) x_t / (a var + 1 - a). Smooth in x and t: DDIM converges on it."""

    def eps_fn(x, t):
        a = schedule.alpha_at(t)
        return (1 - a).sqrt() * x / (a * var + 1 - a)

    return eps_fn


def gaussian_v(schedule, var):
    eps_fn = gaussian_eps(schedule, var)

    def v_fn(x, t):
        a = schedule.alpha_at(t)
        eps = eps_fn(x, t)
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        return a.sqrt() * eps - (1 - a).sqrt() * x0

    return v_fn


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_invert_then_sample_reconstructs(prediction_type):
    var = 0.25
    schedule = Schedule(prediction_type=prediction_type)
    model_fn = (gaussian_eps if prediction_type == "epsilon" else gaussian_v)(schedule, var)
    x0 = latents(11, scale=var**0.5)
    errors = []
    for n in [10, 50, 200]:
        timesteps = schedule.timesteps(n)
        kept = invert(model_fn, x0, schedule, n, timesteps.tolist())
        x_T = kept[int(timesteps[0])]
        assert x_T.std() > 0.9  # really noised: a_981 ~ 0.005
        errors.append((sample(model_fn, x_T, schedule, timesteps) - x0).abs().mean().item())
    assert errors[0] > errors[1] > errors[2], errors
    # DDIM is first order: 4x the steps should cut the error ~4x (measured 4.1x); and 200 steps
    # reconstruct to under 2% of the signal (measured 0.9%).
    assert errors[1] / errors[2] > 3.0, errors
    assert errors[2] < 0.02 * x0.abs().mean().item(), errors


def _reduced_state_loop(model_fn, x0, schedule, timesteps, dtype):
    """invert + sample as they were before the state was kept in float32: every step's result
    rounded to the model's dtype (the per-step functions keep x's dtype)."""
    x = x0.to(dtype)
    grid = timesteps.tolist()[::-1]
    for s, r in zip([-1] + grid[:-1], grid):
        x = ddim_inversion_step(schedule, model_fn(x, r), s, r, x, model_t=r)
    x_T = x
    for t, t_prev in zip(grid[::-1], grid[::-1][1:] + [-1]):
        x = ddim_step(schedule, model_fn(x, t), t, t_prev, x)
    return x_T, x


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_model_with_a_float32_state_reconstructs_like_float32(dtype):
    """Exact-noise toy: unit-variance latents, the exact eps of N(0, I) data evaluated in `dtype`,
    50 inversion + 50 sampling steps. invert/sample keep x in float32 and only the model runs in
    `dtype`. Measured (RMSE, [2, 4, 32, 32]): float32 reconstructs to 0.0008; a bfloat16 model
    with a float32 state to 0.0008 (x_T 0.0030 from float32's), with a bfloat16 state (the loop
    before) to 0.0194 (x_T 0.0147); float16: 0.0008 (x_T 0.0001) against 0.0029 (x_T 0.0024)."""
    schedule = Schedule()
    timesteps = schedule.timesteps(50)
    x0 = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    exact = gaussian_eps(schedule, 1.0)

    def reduced(x, t):  # the model sees and answers in dtype; the caller keeps its state
        return exact(x.to(dtype), t).to(dtype)

    def rmse(a, b):
        return (a.double() - b.double()).pow(2).mean().sqrt().item()

    def invert_sample(model_fn, x):
        x_T = invert(model_fn, x, schedule, 50, timesteps.tolist())[int(timesteps[0])]
        return x_T, sample(model_fn, x_T, schedule, timesteps)

    ref_T, ref = invert_sample(exact, x0)
    x_T, rec = invert_sample(reduced, x0)
    assert x_T.dtype == rec.dtype == torch.float32
    assert invert(reduced, x0.to(dtype), schedule, 50, [1])[1].dtype == torch.float32  # whatever x0's dtype
    assert rmse(ref, x0) < 0.002
    assert rmse(rec, x0) <= 1.25 * rmse(ref, x0)  # as well as float32, within 25%
    assert rmse(x_T, ref_T) < (0.005 if dtype == torch.bfloat16 else 0.0005)
    old_T, old = _reduced_state_loop(reduced, x0, schedule, timesteps, dtype)
    assert rmse(old, x0) > 3 * rmse(rec, x0)  # what a state in dtype cost
    assert rmse(old_T, ref_T) > 3 * rmse(x_T, ref_T)


def test_v_inversion_equals_equivalent_eps_inversion():
    """`invert` reads a v output at the level the model was told (model_t = target), so a v-model
    inverts exactly like the eps-model it is equivalent to. diffusers reads it at the source level
    (checked in test_inversion_steps_match_reference with the default model_t=None)."""
    var = 0.25
    eps_s, v_s = Schedule(), Schedule(prediction_type="v_prediction")
    x0 = latents(12, scale=var**0.5)
    keep = eps_s.timesteps(50).tolist()
    a = invert(gaussian_eps(eps_s, var), x0, eps_s, 500, keep)
    b = invert(gaussian_v(v_s, var), x0, v_s, 500, keep)
    for t in keep:
        assert (a[t] - b[t]).abs().max() <= 1e-5, t


def test_invert_keeps_sampling_timesteps_from_finer_grids():
    schedule = Schedule()
    model_fn = gaussian_eps(schedule, 0.25)
    keep = schedule.timesteps(50).tolist()
    calls = []

    def counting(x, t):
        calls.append(t)
        return model_fn(x, t)

    kept = invert(counting, latents(13, 0.5), schedule, 1000, keep)
    assert sorted(kept) == sorted(keep)
    # steps 0..981 of the 1000-step grid, model labelled with the target timestep; stops at 981.
    # The first step (x0 at final_alpha_cumprod = alpha_0 -> t = 0) is the identity: no call
    assert calls == list(range(1, 982))
    fine = invert(model_fn, latents(13, 0.5), schedule, 500, keep)
    assert sorted(fine) == sorted(keep)


def test_inversion_timesteps_merge_the_sampling_grid_into_any_inversion_grid():
    schedule = Schedule()
    keep = schedule.timesteps(50).tolist()  # 981, 961, ..., 1
    # grids that contain the sampling timesteps add nothing: 500 steps are 1, 3, ..., 999
    assert inversion_timesteps(schedule, 500, keep) == [t for t in range(1, 982, 2)]
    assert inversion_timesteps(schedule, 50, keep) == keep[::-1]
    # 333 steps (leading, offset 1: 1, 4, 7, ..., 997) miss most sampling timesteps: they are added
    merged = inversion_timesteps(schedule, 333, keep)
    grid = set(schedule.timesteps(333).tolist())
    assert set(merged) == {t for t in grid if t <= 981} | set(keep)
    assert merged == sorted(merged) and merged[-1] == 981
    # the path runs exactly through the merged grid, model labelled with each target
    calls = []
    model_fn = gaussian_eps(schedule, 0.25)
    kept = invert(lambda x, t: (calls.append(t), model_fn(x, t))[1], latents(3, 0.5), schedule, 333, keep)
    assert calls == merged and sorted(kept) == sorted(keep)


def test_invert_with_an_inversion_grid_off_the_sampling_grid_still_reconstructs():
    """7 and 333 inversion steps do not contain the 50 sampling timesteps; the merged path does,
    and sampling from its x_T reconstructs about as well as from the 50-step inversion, whose
    errors mirror the sampler's own (measured: 50 -> 0.0145, 7 -> 0.0142, 333 -> 0.0173)."""
    var = 0.25
    schedule = Schedule()
    model_fn = gaussian_eps(schedule, var)
    x0 = latents(12, scale=var**0.5)
    timesteps = schedule.timesteps(50)
    errors = {}
    for n in (50, 7, 333):
        x_T = invert(model_fn, x0, schedule, n, timesteps.tolist())[int(timesteps[0])]
        errors[n] = (sample(model_fn, x_T, schedule, timesteps) - x0).abs().mean().item()
    signal = x0.abs().mean().item()
    for n in (7, 333):
        assert errors[n] < 1.5 * errors[50] and errors[n] < 0.05 * signal, errors


def test_invert_bad_inputs():
    schedule = Schedule()
    model_fn = gaussian_eps(schedule, 0.25)
    x0 = latents(14)
    with pytest.raises(ValueError, match="out of range"):
        invert(model_fn, x0, schedule, 50, [1, 1000])
    with pytest.raises(ValueError, match="empty"):
        invert(model_fn, x0, schedule, 50, [])
    with pytest.raises(ValueError, match="num_steps"):
        invert(model_fn, x0, schedule, 0, [1])
    with pytest.raises(ValueError, match="shape"):
        invert(lambda x, t: x[:1], x0, schedule, 10, [1])


def test_sample_bad_inputs():
    schedule = Schedule()
    model_fn = gaussian_eps(schedule, 0.25)
    x = latents(15)
    with pytest.raises(ValueError, match="descending"):
        sample(model_fn, x, schedule, [1, 21])
    with pytest.raises(ValueError, match="out of range"):
        sample(model_fn, x, schedule, [1000, 1])
    with pytest.raises(ValueError, match="empty"):
        sample(model_fn, x, schedule, [])


# ---------------------------------------------------------------- SDEdit


def test_sdedit_start():
    schedule = Schedule()
    ref = DDIMScheduler(**reference_kwargs("epsilon"))
    timesteps = schedule.timesteps(50)
    x0, noise = latents(16, 0.5), latents(17)
    x_t, remaining = sdedit_start(schedule, x0, noise, 1.0, timesteps)
    assert torch.equal(remaining, timesteps)
    assert (x_t - ref.add_noise(x0, noise, torch.tensor([981]))).abs().max() <= 1e-6
    x_t, remaining = sdedit_start(schedule, x0, noise, 0.5, timesteps)
    assert remaining.tolist() == timesteps[25:].tolist() and int(remaining[0]) == 481
    assert (x_t - ref.add_noise(x0, noise, torch.tensor([481]))).abs().max() <= 1e-6
    assert torch.equal(x_t, add_noise(schedule, x0, noise, 481))


def test_sdedit_bad_strength():
    schedule = Schedule()
    timesteps = schedule.timesteps(50)
    x0, noise = latents(18), latents(19)
    for bad in [0.0, -0.5, 1.5, float("nan"), "0.5", True, None]:
        with pytest.raises(ValueError, match="strength"):
            sdedit_start(schedule, x0, noise, bad, timesteps)
    with pytest.raises(ValueError, match="no step"):
        sdedit_start(schedule, x0, noise, 0.01, timesteps)  # int(50 * 0.01) == 0
    with pytest.raises(ValueError, match="noise shape"):
        sdedit_start(schedule, x0, noise[:1], 0.5, timesteps)
