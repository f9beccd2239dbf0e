"""inversion.method=ddpm at the run level, on the tiny random model and a 64 px clip of a few frames:
every technique and mode runs with the stored noise maps, the maps' noise is a function of (noise
seed, frame, timestep) only, skip starts later and inverts less, output.reconstruction writes
reconstruction.mp4 with its PSNR (DDPM's equal to the VAE round trip's: exact), run.json counts
each stage's UNet forwards as the settings imply, and bad values are refused in one line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from tokenflow import edit, pipeline
from tokenflow.config import ConfigError, load_config
from tokenflow.inversion import ddpm_invert_frames, version_noise
from tokenflow.media import read_video
from tokenflow.media.sample_clip import make_sample_clip
from tokenflow.models import build_random
from tokenflow.pipeline import run_edit
from tokenflow.reconstruction import psnr, reconstruct_latents
from tokenflow.inversion import Inversion

FRAMES = 3


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return make_sample_clip(tmp_path_factory.mktemp("clip") / "clip.mp4", frames=FRAMES, size=64, fps=15)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def settings(clip, cache_dir, *overrides):
    return load_config(["model=tiny", "size=64", "steps=3", "inversion.method=ddpm", "progress=false", f"video={clip}",
                        "output.side_by_side=false", f"inversion.cache_dir={cache_dir}", *overrides])


def spied(monkeypatch):
    """What the pipeline hands edit_video_latents: {"source_latents", "noise_maps", "timesteps", "start", "steps"}."""
    seen = {"steps": []}
    real_loop, real_step = pipeline.edit_video_latents, edit.denoise_step

    def loop(unet, schedule, settings, prompts, source_latents, clean, timesteps, watch=None, **kwargs):
        seen.update(source_latents=source_latents, noise_maps=kwargs.get("noise_maps"), timesteps=timesteps)
        return real_loop(unet, schedule, settings, prompts, source_latents, clean, timesteps, watch=watch, **kwargs)

    def step(unet, schedule, settings, prompts, latents, source, t, t_prev, *args, **kwargs):
        seen["steps"].append((t, latents.clone(), kwargs.get("noise")))
        return real_step(unet, schedule, settings, prompts, latents, source, t, t_prev, *args, **kwargs)

    monkeypatch.setattr(pipeline, "edit_video_latents", loop)
    monkeypatch.setattr(edit, "denoise_step", step)
    return seen


# ---------------------------------------------------------------------------------------------
# every technique, mode and propagation rule


@pytest.mark.parametrize("method,mode,rule", [
    ("pnp", "tokenflow", "paper"), ("pnp", "tokenflow", "released"), ("pnp", "fixed_keyframes", "paper"),
    ("pnp", "per_frame", "paper"), ("pnp", "extended_all", "paper"), ("sdedit", "tokenflow", "paper"),
    ("sdedit", "per_frame", "released"),
])
def test_ddpm_runs_in_every_technique_and_mode(clip, cache_dir, tmp_path, monkeypatch, method, mode, rule):
    seen = spied(monkeypatch)
    out = tmp_path / "run"
    facts = run_edit(settings(clip, cache_dir, f"method={method}", f"tokenflow.mode={mode}", f"tokenflow.propagation={rule}",
                              "tokenflow.keyframe_interval=2"), out)
    assert facts.inversion_method == "ddpm" and read_video(out / "edited.mp4").num_frames == FRAMES
    ts = seen["timesteps"]
    maps = seen["noise_maps"]
    # the maps and the noisy versions reach the loop, one [n, 4, 8, 8] of each per sampling timestep
    assert sorted(maps) == sorted(ts) == sorted(seen["source_latents"])
    assert all(tuple(maps[t].shape) == (FRAMES, 4, 8, 8) for t in ts)
    # every step the loop runs samples with its own step's map (a DDIM step would take none)
    run = [t for t, _, _ in seen["steps"]]
    assert run == facts.timesteps and run == (ts if method == "pnp" else ts[3 - int(3 * 0.6):])  # sdedit 0.6 of 3 steps: the last 1
    for t, _, noise in seen["steps"]:  # each row handed to the step is one frame's map of that step
        assert noise is not None and all(any(torch.equal(row, m) for m in maps[t].to(row)) for row in noise)
    # the start: the inversion's own noisy version at the first step run (PnP and SDEdit alike)
    first_t, first_latents, _ = seen["steps"][0]
    assert torch.equal(first_latents, seen["source_latents"][first_t].to(first_latents))


def test_ddim_run_passes_no_noise_maps(clip, cache_dir, tmp_path, monkeypatch):
    seen = spied(monkeypatch)
    facts = run_edit(settings(clip, cache_dir, "inversion.method=ddim", "inversion.steps=6"), tmp_path / "run")
    assert facts.inversion_method == "ddim" and seen["noise_maps"] is None
    assert all(noise is None for _, _, noise in seen["steps"])


# ---------------------------------------------------------------------------------------------
# the noise: per frame and step, whatever the batch, the process or the timesteps kept


def test_each_frames_noise_depends_on_seed_frame_and_timestep_only():
    ts = [981, 641, 321]
    whole = version_noise([0, 1, 2], ts, (4, 8, 8), noise_seed=0, shared=False)
    part = version_noise([2], ts[1:], (4, 8, 8), noise_seed=0, shared=False)  # another batch, fewer timesteps
    for t in ts[1:]:
        assert torch.equal(part[t][0], whole[t][2])
    assert not torch.equal(whole[981][0], whole[981][1])  # frames draw their own
    assert not torch.equal(whole[981][0], whole[641][0])  # and so do timesteps
    assert not torch.equal(version_noise([0], ts, (4, 8, 8), noise_seed=1, shared=False)[981][0], whole[981][0])
    shared = version_noise([0, 1, 2], ts, (4, 8, 8), noise_seed=0, shared=True)
    assert all(torch.equal(shared[t][0], shared[t][i]) for t in ts for i in (1, 2))  # one draw per step for all
    assert torch.equal(version_noise([7], ts, (4, 8, 8), noise_seed=0, shared=True)[641][0], shared[641][0])
    assert abs(float(whole[981].std()) - 1) < 0.2 and abs(float(whole[981].mean())) < 0.2  # standard normal


@pytest.fixture(scope="module")
def tiny():
    models = build_random("tiny", seed=0)
    source = models.text_encoder(models.tokenizer(["a wolf"]))
    negative = models.text_encoder(models.tokenizer(["blurry"]))
    clean = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    return models, source, negative, clean


@pytest.mark.parametrize("shared", [False, True])
def test_maps_do_not_depend_on_the_batch_or_the_frames_inverted_together(tiny, shared):
    models, source, negative, clean = tiny
    schedule = models.config.schedule
    ts = schedule.timesteps(4).tolist()
    kw = dict(timesteps=ts, guidance_scale=1.0, noise_seed=5, shared_noise=shared)
    xs, zs = ddpm_invert_frames(models.unet, schedule, clean, source, negative, batch_size=4, **kw)
    xs1, zs1 = ddpm_invert_frames(models.unet, schedule, clean, source, negative, batch_size=1, **kw)
    # frames 2 and 3 alone, as a torchrun rank or a resumed run would invert them, numbered as in the clip
    xs2, zs2 = ddpm_invert_frames(models.unet, schedule, clean[2:], source, negative, batch_size=2, frame_ids=[2, 3], **kw)
    for t in ts:
        torch.testing.assert_close(xs1[t], xs[t], rtol=0, atol=1e-6)
        torch.testing.assert_close(zs1[t], zs[t], rtol=0, atol=2e-4)  # other batch shapes: other BLAS rounding
        torch.testing.assert_close(xs2[t], xs[t][2:], rtol=0, atol=1e-6)
        torch.testing.assert_close(zs2[t], zs[t][2:], rtol=0, atol=2e-4)
    # the noisy versions are x_t = sqrt(a_t) x0 + sqrt(1 - a_t) e_t with this module's noise
    e = version_noise([0, 1, 2, 3], ts, (4, 8, 8), noise_seed=5, shared=shared)
    a = schedule.alpha_at(ts[0])
    torch.testing.assert_close(xs[ts[0]], a.sqrt() * clean + (1 - a).sqrt() * e[ts[0]], rtol=0, atol=1e-6)


@pytest.mark.parametrize("guidance", [1.0, 3.5])
def test_sampling_with_the_maps_returns_the_clean_latents(tiny, guidance):
    """reconstruct_latents with the maps and the same source guidance gives the clean latents back
    (float rounding); the maps guided at another scale do not."""
    models, source, negative, clean = tiny
    schedule = models.config.schedule
    ts = schedule.timesteps(5).tolist()
    forwards = []
    xs, zs = ddpm_invert_frames(models.unet, schedule, clean, source, negative, timesteps=ts, guidance_scale=guidance,
                                noise_seed=0, shared_noise=True, batch_size=2, on_forward=forwards.append)
    assert forwards == [2] * 2 * len(ts)  # 2 batches of 2 frames per step (each frame 1 or 2 branches in one forward)
    back = reconstruct_latents(models.unet, schedule, Inversion("ddpm", xs, zs), source, negative, guidance_scale=guidance, batch_size=3)
    torch.testing.assert_close(back, clean, rtol=0, atol=1e-4)
    other = reconstruct_latents(models.unet, schedule, Inversion("ddpm", xs, zs), source, negative,
                                guidance_scale=guidance + 2.0, batch_size=3)
    assert (other - clean).abs().max() > 1e-2
    # DDIM sampling from DDIM's own x_T on 5 steps does not come back exactly (the random model is far from linear)
    from sampler.ddim import invert

    unet = models.unet
    ddim = invert(lambda x, t: unet(x, t, source.expand(x.shape[0], -1, -1)), clean, schedule, 5, ts)
    ddim_back = reconstruct_latents(unet, schedule, Inversion("ddim", ddim), source, negative)
    assert (ddim_back - clean).abs().max() > 1e-2


def test_psnr():
    a = torch.zeros(2, 4, 4, 3, dtype=torch.uint8)
    b = a.clone()
    b[0, 0, 0, 0] = 255  # one value of 96 off by the peak: MSE = 255^2 / 96
    assert psnr(a, a) == float("inf")
    assert psnr(a, b) == pytest.approx(10 * torch.log10(torch.tensor(96.0)).item(), abs=1e-6)
    assert psnr(a.float() / 255, b.float() / 255, data_range=1.0) == pytest.approx(psnr(a, b), abs=1e-6)
    with pytest.raises(ValueError, match="data_range"):
        psnr(a.float(), b.float())
    with pytest.raises(ValueError, match="shape"):
        psnr(a, b[:1])


# ---------------------------------------------------------------------------------------------
# skip, guidance and the cache


def test_skip_starts_later_and_inverts_only_the_steps_run(clip, tmp_path, monkeypatch):
    seen = spied(monkeypatch)
    facts = run_edit(settings(clip, tmp_path / "cache", "steps=4", "inversion.skip=1"), tmp_path / "run")
    ts = seen["timesteps"]
    assert len(ts) == 4 and sorted(seen["noise_maps"], reverse=True) == ts[1:]
    assert [t for t, _, _ in seen["steps"]] == ts[1:] == facts.timesteps
    first_t, first_latents, _ = seen["steps"][0]
    assert first_t == ts[1] and torch.equal(first_latents, seen["source_latents"][ts[1]].to(first_latents))
    assert facts.unet_forwards["inversion"]["frame_forwards"] == FRAMES * 3  # 3 of the 4 steps inverted
    # DDIM climbs only as far as the first step run: 8 inversion steps, stopping at ts[1] (t=501 of 751)
    ddim = run_edit(settings(clip, tmp_path / "cache", "steps=4", "inversion.skip=1", "inversion.method=ddim",
                             "inversion.steps=8"), tmp_path / "ddim")
    assert ddim.timesteps == ts[1:]
    assert ddim.unet_forwards["inversion"]["frame_forwards"] == FRAMES * 5  # grid 1, 126, 251, 376, 501 (8 steps of 125)


def test_forwards_counted_as_the_settings_imply(clip, tmp_path):
    """3 frames, 3 steps, per_frame: DDPM inverts 3 steps per frame (x2 branches with source
    guidance), the edit forwards 3 frames x 3 steps with 3 branches each, the reconstruction 3 x 3."""
    facts = run_edit(settings(clip, tmp_path / "cache", "tokenflow.mode=per_frame", "output.reconstruction=true",
                              "inversion.source_guidance_scale=2", "guidance_scale=2"), tmp_path / "run")
    assert facts.unet_forwards == {
        "inversion": {"frame_forwards": 9, "sample_forwards": 18},
        "edit": {"frame_forwards": 9, "sample_forwards": 27},
        "reconstruction": {"frame_forwards": 9, "sample_forwards": 18},
    }
    assert facts.unet_frame_forwards == 9  # the edit's, as before
    again = run_edit(settings(clip, tmp_path / "cache", "tokenflow.mode=per_frame", "inversion.source_guidance_scale=2",
                              "guidance_scale=2"), tmp_path / "again")
    assert again.inversion_frames_reused == FRAMES and again.unet_forwards["inversion"]["frame_forwards"] == 0
    assert "reconstruction" not in again.unet_forwards
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["unet_forwards"]["edit"]["sample_forwards"] == 27 and run["inversion_method"] == "ddpm"


@pytest.mark.parametrize("override,reused", [
    (None, FRAMES),
    ("prompt=a fox,guidance_scale=5,seed=3", FRAMES),  # edit settings: the same maps
    ("negative_prompt=grainy", FRAMES),  # unguided maps do not read the negative prompt
    ("inversion.noise_seed=1", 0),
    ("inversion.shared_noise=false", 0),
    ("inversion.source_guidance_scale=3.5", 0),
    ("inversion.method=ddim", 0),  # a DDPM cache is never read as DDIM, nor the other way round
    ("steps=4", 0),
    ("inversion.steps=7", FRAMES),  # DDPM inverts on the sampling grid: DDIM's step count does not key it
])
def test_ddpm_cache_is_reused_only_for_the_same_maps(clip, tmp_path_factory, override, reused):
    cache = tmp_path_factory.getbasetemp() / "ddpm_key_cache"
    first = run_edit(settings(clip, cache), tmp_path_factory.mktemp("first"))
    rerun = run_edit(settings(clip, cache, *(override.split(",") if override else [])), tmp_path_factory.mktemp("run"))
    assert rerun.inversion_frames_reused == reused
    assert (Path(rerun.inversion_cache) == Path(first.inversion_cache)) == bool(reused)


def test_guided_maps_are_keyed_by_the_negative_prompt(clip, tmp_path):
    guided = ("inversion.source_guidance_scale=3.5",)
    first = run_edit(settings(clip, tmp_path / "cache", *guided), tmp_path / "a")
    other = run_edit(settings(clip, tmp_path / "cache", *guided, "negative_prompt=grainy"), tmp_path / "b")
    assert other.inversion_frames_reused == 0 and first.inversion_cache != other.inversion_cache
    meta = json.loads((Path(first.inversion_cache) / "meta.json").read_text())
    assert meta["fields"]["ddpm"] == {"noise_seed": 0, "shared_noise": True, "source_guidance_scale": 3.5,
                                      "negative_prompt": load_config([]).negative_prompt}


# ---------------------------------------------------------------------------------------------
# output.reconstruction


def facts_config(clip, tmp_path, method):
    return settings(clip, tmp_path / "cache", f"inversion.method={method}", "inversion.steps=3", "output.reconstruction=true",
                    "output.side_by_side=true")


@pytest.mark.parametrize("method", ["ddpm", "ddim"])
def test_reconstruction_is_written_with_its_psnr(clip, tmp_path, method):
    out = tmp_path / "run"
    facts = run_edit(facts_config(clip, tmp_path, method), out)
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "edited.mp4", "reconstruction.mp4", "run.json", "side_by_side.mp4"]
    video = read_video(out / "reconstruction.mp4")
    assert video.num_frames == FRAMES and (video.height, video.width) == (64, 64)
    run = json.loads((out / "run.json").read_text())
    assert run["outputs"]["reconstruction"] == str(out / "reconstruction.mp4")
    recon, vae = run["reconstruction_psnr_db"], run["vae_round_trip_psnr_db"]
    assert 0 < recon < 100 and 0 < vae < 100 and recon == facts.reconstruction_psnr_db
    # (that it is the PSNR of the right frames: tests/test_reconstruction_sweep.py computes it directly)
    if method == "ddpm":  # exact: the inversion adds nothing to the VAE's error
        assert recon == pytest.approx(vae, abs=0.05)
    else:  # 3 DDIM steps on a random model: far from exact (a random VAE's error may land either side of the source)
        assert abs(recon - vae) > 0.05
    assert "reconstruction" in run["timings_s"]
    plain = run_edit(settings(clip, tmp_path / "cache", f"inversion.method={method}", "inversion.steps=3"), tmp_path / "plain")
    assert plain.reconstruction_psnr_db is None and not (tmp_path / "plain" / "reconstruction.mp4").exists()


# ---------------------------------------------------------------------------------------------
# bad values


@pytest.mark.parametrize("override,message", [
    ("inversion.method=dpm", "inversion.method must be one of ddim, ddpm, got 'dpm'"),
    ("inversion.skip=-1", "inversion.skip must be an integer >= 0, got -1"),
    ("inversion.skip=10", "inversion.skip (10) must be less than steps (10)"),  # model=tiny runs 10 steps
    ("inversion.source_guidance_scale=nan", "inversion.source_guidance_scale must be a finite number"),
    ("inversion.noise_seed=1.5", "inversion.noise_seed"),
    ("inversion.shared_noise=maybe", "inversion.shared_noise"),
    ("output.reconstruction=2", "output.reconstruction"),
])
def test_bad_values_are_refused_naming_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(["model=tiny", override])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_reconstruction_needs_an_inversion():
    with pytest.raises(ConfigError, match="output.reconstruction=true .* tokenflow.mode=reconstruction"):
        load_config(["model=tiny", "output.reconstruction=true", "tokenflow.mode=reconstruction"])


def test_command_line_refuses_a_bad_method_in_one_line(tmp_path):
    script = shutil.which("tokenflow") or pytest.fail("the tokenflow console script is not installed (pip install -e .)")
    res = subprocess.run([script, "model=tiny", "inversion.method=dpm", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path,
                         env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    errors = [line for line in res.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "inversion.method must be one of ddim, ddpm" in errors[0]
    assert not (tmp_path / "run").exists()
