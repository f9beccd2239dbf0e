"""ControlNet in Alg. 1's loop, by value: a conditioning scale of 0 is the edit without ControlNet bit
for bit, the guidance window switches it on and off at diffusers' steps, every pass gets its own frames'
residuals on the two edited branches and zeros on the source branch, in every mode and rule."""

from __future__ import annotations

import pytest
import torch

from sampler.schedule import Schedule
from tokenflow.controlnet_guide import ControlNetGuide
from tokenflow.edit import EditSettings, LoopWatch, PromptEmbeddings, edit_video_latents
from tokenflow.models.controlnet_loading import build_random_controlnet
from unet import UNet, UNetConfig

pytestmark = pytest.mark.core



N, STEPS = 5, 6


@pytest.fixture(scope="module")
def loop():
    torch.manual_seed(0)
    unet = UNet(UNetConfig.tiny()).eval()
    controlnet = build_random_controlnet(unet.config, seed=3)
    clean = torch.randn(N, 4, 8, 8)
    schedule = Schedule()
    timesteps = schedule.timesteps(STEPS).tolist()
    source = {t: clean + 0.1 * k * torch.randn_like(clean) for k, t in enumerate(timesteps)}
    prompts = PromptEmbeddings(*(torch.randn(1, 77, 64) for _ in range(3)))
    conditions = (torch.rand(N, 3, 64, 64) > 0.7).float()
    return unet, controlnet, schedule, timesteps, source, clean, prompts, conditions


class StepLatents(LoopWatch):
    def __init__(self):
        super().__init__()
        self.latents, self.controlnet_per_step = [], []

    def step_done(self, step, t, latents):
        self.latents.append(latents.clone())
        self.controlnet_per_step.append(self.controlnet_frame_forwards - sum(self.controlnet_per_step))


def run_loop(loop, guide_kwargs=None, **settings):
    unet, controlnet, schedule, timesteps, source, clean, prompts, conditions = loop
    watch = StepLatents()
    guide = None if guide_kwargs is None else ControlNetGuide(controlnet, conditions, **guide_kwargs)
    s = EditSettings(keyframe_interval=2, batch_size=2, **settings)
    edit_video_latents(unet, schedule, s, prompts, source, clean, timesteps, watch=watch, controlnet=guide)
    return watch


@pytest.mark.parametrize("method", ["pnp", "sdedit"])
def test_scale_zero_is_the_edit_without_controlnet_exactly(loop, method):
    without = run_loop(loop, method=method)
    zero = run_loop(loop, dict(scale=0.0), method=method)
    one = run_loop(loop, dict(scale=1.0), method=method)
    assert zero.controlnet_frame_forwards > 0  # the ControlNet ran, its residuals were zeros
    assert torch.equal(zero.latents[-1], without.latents[-1])
    assert not torch.allclose(one.latents[-1], without.latents[-1], atol=1e-3)


@pytest.mark.parametrize("start,end,guided", [
    (0.0, 1.0, [0, 1, 2, 3, 4, 5]),
    (0.5, 1.0, [3, 4, 5]),
    (0.0, 0.5, [0, 1, 2]),
    (0.2, 0.7, [2, 3]),  # diffusers: step i of N guided unless i/N < start or (i+1)/N > end
])
def test_guidance_window_switches_the_controlnet_at_its_steps(loop, start, end, guided):
    guide = ControlNetGuide(loop[1], loop[7], start=start, end=end)
    assert [i for i in range(STEPS) if guide.active(i, STEPS)] == guided
    without = run_loop(loop)
    windowed = run_loop(loop, dict(start=start, end=end))
    forwards = [n for n in windowed.controlnet_per_step]
    assert [i for i, n in enumerate(forwards) if n > 0] == guided
    first = guided[0]
    for i in range(first):  # before the window: the edit without ControlNet, exactly
        assert torch.equal(windowed.latents[i], without.latents[i])
    assert not torch.allclose(windowed.latents[first], without.latents[first], atol=1e-4)


def test_window_counts_the_steps_sdedit_runs(loop):
    """SDEdit runs the last strength x steps: the window's fractions are of those (4 of 6 steps here)."""
    watch = run_loop(loop, dict(start=0.5, end=1.0), method="sdedit", sdedit_strength=0.67)
    assert len(watch.latents) == 4
    assert [i for i, n in enumerate(watch.controlnet_per_step) if n > 0] == [2, 3]


@pytest.mark.parametrize("mode,rule", [("tokenflow", "paper"), ("tokenflow", "released"), ("fixed_keyframes", "paper"),
                                       ("per_frame", "paper"), ("extended_all", "paper")])
def test_each_pass_gets_its_own_frames_residuals_on_the_edited_branches_only(loop, monkeypatch, mode, rule):
    calls, seen = [], []
    real_residuals = ControlNetGuide.residuals

    def residuals(self, frames, latents, t, negative, target):
        calls.append(list(frames))
        r = real_residuals(self, frames, latents, t, negative, target)
        seen.append((len(frames), r))
        return r

    monkeypatch.setattr(ControlNetGuide, "residuals", residuals)
    watch = run_loop(loop, dict(), mode=mode, propagation=rule)
    assert watch.controlnet_frame_forwards == watch.unet_frame_forwards == sum(len(c) for c in calls)
    first_step = calls[: len(calls) // STEPS]  # every step makes the same passes
    if mode in ("tokenflow", "fixed_keyframes"):
        from tokenflow.edit import keyframes_at

        keyframes = keyframes_at(EditSettings(mode=mode, keyframe_interval=2), N, 0)
        assert first_step[0] == keyframes  # the keyframe pass: the keyframes' own control images
        rest = sorted(f for c in first_step[1:] for f in c)
        want = sorted(range(N)) if rule == "released" else sorted(set(range(N)) - set(keyframes))
        assert rest == want
    elif mode == "per_frame":
        assert first_step == [[0, 1], [2, 3], [4]]
    else:
        assert first_step == [list(range(N))]
    for f, r in seen:  # source third zero, edited thirds not
        for tensor in [*r.down, r.mid]:
            assert tensor.shape[0] == 3 * f
            assert not tensor[:f].any() and tensor[f:].abs().amax() > 0


def test_residuals_follow_each_frames_own_condition(loop):
    """Frame i's residuals come from condition i: swapping two frames' conditions swaps their residuals."""
    unet, controlnet, schedule, timesteps, source, clean, prompts, conditions = loop
    t = timesteps[0]
    r = ControlNetGuide(controlnet, conditions).residuals([1, 3], clean[[1, 3]], t, prompts.negative, prompts.target)
    swapped = conditions.clone()
    swapped[[1, 3]] = conditions[[3, 1]]
    s = ControlNetGuide(controlnet, swapped).residuals([1, 3], clean[[1, 3]], t, prompts.negative, prompts.target)
    single = ControlNetGuide(controlnet, conditions).residuals([3], clean[[3]], t, prompts.negative, prompts.target)
    assert not torch.allclose(r.mid, s.mid)
    # frame 3 with condition 3: the same residuals in a batch of one (rows: source, uncond, cond)
    torch.testing.assert_close(r.mid[[3, 5]], single.mid[[1, 2]], atol=1e-5, rtol=1e-5)
