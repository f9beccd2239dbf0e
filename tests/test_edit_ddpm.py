"""The edit loop under DDPM inversion and with skipped steps: where it starts, which noise map each
step takes, PnP's injection counted in the whole grid, and the clear errors. No UNet runs here (the
loop's steps are recorded or refused before any forward); the loop's numbers under DDPM are checked
against the Alg. 1 oracle (test_algorithm_oracle.py) and end to end in test_ddpm_exactness.py."""

import math

import pytest
import torch

from sampler import Schedule, add_noise
from tokenflow import edit
from tokenflow.config import ConfigError, InversionConfig, RunConfig
from tokenflow.edit import EditSettings, PromptEmbeddings, denoise_step, edit_start, edit_video_latents

pytestmark = pytest.mark.core

N = 3
SCHEDULE = Schedule()
TS = SCHEDULE.timesteps(10).tolist()


def inverted(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {t: torch.randn(N, 4, 2, 2, generator=g) for t in TS}


def prompts():
    return PromptEmbeddings(*(torch.zeros(1, 77, 64) for _ in range(3)))


@pytest.mark.parametrize("inversion", ["ddim", "ddpm"])
def test_pnp_starts_at_the_inversions_latents_after_the_skipped_steps(inversion):
    source = inverted()
    for skip in (0, 3):
        start, remaining = edit_start(EditSettings(inversion=inversion, skip=skip), SCHEDULE, TS, source, torch.zeros(N, 4, 2, 2))
        assert remaining == TS[skip:]
        assert torch.equal(start, source[TS[skip]])
        assert start.data_ptr() != source[TS[skip]].data_ptr()  # a copy: the loop must not write into the inversion


def test_sdedit_under_ddpm_starts_at_the_inversions_own_noisy_version():
    """No fresh noise: the stored maps belong to the inversion's x_t, so the start is that x_t."""
    source = inverted()
    settings = EditSettings(method="sdedit", sdedit_strength=0.6, inversion="ddpm")
    start, remaining = edit_start(settings, SCHEDULE, TS, source, torch.zeros(N, 4, 2, 2))
    assert remaining == TS[4:]  # int(10 * 0.6) = 6 steps run
    assert torch.equal(start, source[TS[4]])
    # a skip beyond the strength's step wins; one before it changes nothing
    start, remaining = edit_start(EditSettings(method="sdedit", sdedit_strength=0.6, inversion="ddpm", skip=6), SCHEDULE,
                                  TS, source, torch.zeros(N, 4, 2, 2))
    assert remaining == TS[6:] and torch.equal(start, source[TS[6]])
    assert edit_start(EditSettings(method="sdedit", sdedit_strength=0.6, inversion="ddpm", skip=2), SCHEDULE, TS, source,
                      torch.zeros(N, 4, 2, 2))[1] == TS[4:]


def test_sdedit_under_ddim_noises_the_clean_latents_at_the_later_of_skip_and_strength():
    clean = torch.randn(N, 4, 8, 8)
    base = EditSettings(method="sdedit", sdedit_strength=0.6, seed=3)
    at_strength, remaining = edit_start(base, SCHEDULE, TS, {}, clean)
    assert remaining == TS[4:]
    skipped, remaining = edit_start(EditSettings(method="sdedit", sdedit_strength=0.6, seed=3, skip=6), SCHEDULE, TS, {}, clean)
    assert remaining == TS[6:]
    # the same seeded noise map, now at the 7th timestep
    a = SCHEDULE.alphas_cumprod[TS[4]].item()
    noise = (at_strength - math.sqrt(a) * clean) / math.sqrt(1 - a)
    assert torch.allclose(skipped, add_noise(SCHEDULE, clean, noise, TS[6]), atol=1e-5)


def test_start_errors():
    source = inverted()
    with pytest.raises(ValueError, match="inversion.skip=10 skips all 10 sampling steps"):
        edit_start(EditSettings(skip=10), SCHEDULE, TS, source, torch.zeros(N, 4, 2, 2))
    with pytest.raises(ValueError, match=r"method.strength=0.05 of 10 steps leaves no step to run"):
        edit_start(EditSettings(method="sdedit", sdedit_strength=0.05), SCHEDULE, TS, source, torch.zeros(N, 4, 2, 2))
    with pytest.raises(ValueError, match=r"no inverted latents for timesteps \[1\]"):
        edit_start(EditSettings(skip=9), SCHEDULE, TS, {t: x for t, x in source.items() if t != 1}, torch.zeros(N, 4, 2, 2))


def test_each_step_takes_its_own_map_and_pnp_counts_steps_in_the_whole_grid(monkeypatch):
    """Skipping 3 of 10 steps: the run's first step is the grid's 4th, so q/k injection (first 50%
    of the grid: steps 0-4) covers the run's steps 0-1 and feature injection (80%: 0-7) its 0-4."""
    seen = []

    def fake_step(unet, schedule, settings, prompts, latents, source, t, t_prev, pnp, keyframes, watch=None, *, noise=None, controlnet=None):
        seen.append((t, t_prev, bool(pnp.qk_layers), bool(pnp.feature_layers), noise))
        return latents

    monkeypatch.setattr(edit, "denoise_step", fake_step)
    maps = inverted(seed=1)
    edit_video_latents(None, SCHEDULE, EditSettings(mode="per_frame", inversion="ddpm", skip=3), prompts(), inverted(),
                       torch.zeros(N, 4, 2, 2), TS, noise_maps=maps)
    assert [(t, t_prev) for t, t_prev, *_ in seen] == list(zip(TS[3:], TS[4:] + [-1]))
    assert [qk for _, _, qk, _, _ in seen] == [True] * 2 + [False] * 5
    assert [f for _, _, _, f, _ in seen] == [True] * 5 + [False] * 2
    assert all(torch.equal(noise, maps[t]) for t, _, _, _, noise in seen)
    seen.clear()  # DDIM: no map
    edit_video_latents(None, SCHEDULE, EditSettings(mode="per_frame"), prompts(), inverted(), torch.zeros(N, 4, 2, 2), TS)
    assert len(seen) == 10 and all(noise is None for *_, noise in seen)


def test_noise_map_errors_come_before_any_forward():
    """unet=None: a forward would fail with an AttributeError, not these lines."""
    source, clean = inverted(), torch.zeros(N, 4, 2, 2)
    ddpm, ddim = EditSettings(mode="per_frame", inversion="ddpm"), EditSettings(mode="per_frame")
    with pytest.raises(ValueError, match="inversion.method=ddpm samples with the inversion's noise maps; none were given"):
        edit_video_latents(None, SCHEDULE, ddpm, prompts(), source, clean, TS)
    with pytest.raises(ValueError, match="noise maps were given but inversion.method=ddim"):
        edit_video_latents(None, SCHEDULE, ddim, prompts(), source, clean, TS, noise_maps=inverted())
    with pytest.raises(ValueError, match=r"no noise maps for timesteps \[1\]"):
        edit_video_latents(None, SCHEDULE, ddpm, prompts(), source, clean, TS,
                           noise_maps={t: x for t, x in inverted().items() if t != 1})
    with pytest.raises(ValueError, match=r"noise map at t=901 has shape \(1, 4, 2, 2\), the latents \(3, 4, 2, 2\)"):
        edit_video_latents(None, SCHEDULE, ddpm, prompts(), source, clean, TS,
                           noise_maps={**inverted(), 901: torch.zeros(1, 4, 2, 2)})
    with pytest.raises(ValueError, match="noise map shape"):
        denoise_step(None, SCHEDULE, ddpm, prompts(), clean, clean, 901, 801, ddpm.injection(0, 10), None,
                     noise=torch.zeros(1, 4, 2, 2))


def test_settings_read_and_check_the_inversion():
    assert (EditSettings().inversion, EditSettings().skip) == (InversionConfig.method, InversionConfig.skip)
    cfg = RunConfig(inversion=InversionConfig(method="ddpm", skip=4))
    settings = EditSettings.from_config(cfg)
    assert (settings.inversion, settings.skip) == ("ddpm", 4)
    with pytest.raises(ConfigError, match="inversion.method"):
        EditSettings(inversion="dpm")
    with pytest.raises(ConfigError, match="inversion.skip"):
        EditSettings(skip=-1)
