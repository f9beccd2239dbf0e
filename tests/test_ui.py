"""The web app's stages without a browser (tokenflow.ui.stages, form): the same settings and
functions as the command line, reuse between stages, the stop button, one stage at a time, and
bad input answered in one line."""

from __future__ import annotations

import math
import shlex
import sys
import threading
from dataclasses import replace

import pytest
import torch

from tokenflow.config import ConfigError, load_config
from tokenflow.edit import EditSettings, edit_video_latents, keyframes_at
from tokenflow.figures.layout import read_png
from tokenflow.inversion import decode_latents
from tokenflow.media import from_model_range
from tokenflow.ui.app import main as app_main
from tokenflow.ui.app import parse_args
from tokenflow.ui.form import Form, form_from_overrides
from tokenflow.ui.reconstruct import psnr
from tokenflow.ui.stages import Workbench, nearest_keyframe, save_upload
from tools.nn_field_figure import nn_field_figure

FRAMES = 5
SETTINGS = ["model=tiny", "size=64", "steps=3", "inversion.steps=4", f"frames.max={FRAMES}", "tokenflow.keyframe_interval=2",
            "progress=false"]


def config(tmp_path, *more):
    return load_config([*SETTINGS, f"inversion.cache_dir={tmp_path / 'cache'}", *more])


@pytest.fixture
def bench(tmp_path):
    return Workbench(tmp_path / "outputs")


def form(**changes) -> Form:
    base = Form(video="sample", model="tiny", prompt="a dog's \"best\" day, in oil = ${x}", method="pnp", steps=3,
                keyframe_interval=2, propagation="paper", mode="tokenflow", seed=7, extra="# size\nsize=64\n\nframes.max=5\n")
    return replace(base, **changes)


# ------------------------------------------------------------------------------------- settings


def test_the_command_shown_composes_to_the_settings_the_stages_run():
    f = form()
    words = shlex.split(f.command())
    assert words[0] == "tokenflow"
    cfg = f.config()
    assert load_config(words[1:]) == cfg
    assert (cfg.prompt, cfg.seed, cfg.size, cfg.frames.max, cfg.tokenflow.keyframe_interval) == (
        "a dog's \"best\" day, in oil = ${x}", 7, 64, 5, 2)


def test_the_extra_overrides_come_last_and_win():
    assert form(extra="steps=4").config().steps == 4


def test_the_app_command_line_fills_the_fields_and_keeps_the_rest_as_extra_overrides():
    f = form_from_overrides(["model=tiny", "steps=2", "size=64", "prompt=a fox"])
    assert (f.model, f.steps, f.prompt, f.video, f.extra) == ("tiny", 2, "a fox", "sample", "size=64")
    assert f.config() == load_config(["model=tiny", "steps=2", "size=64", "prompt=a fox"])


@pytest.mark.parametrize("changes, message", [
    ({"keyframe_interval": 0}, "tokenflow.keyframe_interval must be an integer >= 1, got 0"),
    ({"steps": 2.5}, "steps must be an integer, got 2.5"),
    ({"extra": "size=32"}, "size must be at least 64 (pixels of the short side), got 32"),
    ({"extra": "tokenflow.moed=x"}, "tokenflow.moed"),
    ({"extra": "steps 4"}, "extra override 'steps 4' is not key=value"),
])
def test_bad_settings_are_the_command_lines_one_line_errors(changes, message):
    with pytest.raises(ConfigError) as e:
        form(**changes).config()
    assert message in str(e.value) and "\n" not in str(e.value)


def test_the_app_refuses_a_bad_override_before_serving(capsys):
    with pytest.raises(SystemExit) as e:
        app_main(["tokenflow.keyframe_interval=0"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == "error: tokenflow.keyframe_interval must be an integer >= 1, got 0"


def test_the_app_serves_this_machine_only_by_default():
    args = parse_args(["model=tiny"])
    assert (args.host, args.port, args.overrides) == ("127.0.0.1", 7860, ["model=tiny"])


# ------------------------------------------------------------------------------------- stages


def test_stages_reuse_the_loaded_model_and_the_inversion(bench, tmp_path):
    cfg = config(tmp_path)
    first = bench.invert(cfg)
    assert first.ok, first.message
    assert "PSNR" in first.message and "the output is noise" in first.message
    assert first.frames["reconstruction"].shape == first.frames["source"].shape == (FRAMES, 64, 64, 3)
    src, models, target = bench.source, bench.models, bench.source.prompts.target.clone()

    other_prompt = replace(cfg, prompt="a snowy winter scene")
    assert bench.keyframes(other_prompt, step=1).ok
    assert bench.source is src and bench.models is models  # nothing inverted or loaded again
    assert not torch.equal(bench.source.prompts.target, target)  # but the new prompt is the one edited

    edit = bench.edit(other_prompt)
    assert edit.ok, edit.message
    assert edit.facts["inversion_frames_reused"] == FRAMES  # the edit read the invert stage's cache

    other_clip = replace(cfg, frames=replace(cfg.frames, max=FRAMES - 1))
    assert bench.invert(other_clip).ok
    assert bench.source is not src and bench.models is models  # another selection: inverted anew, same model


def test_the_keyframes_stage_edits_the_edits_own_draw_jointly(bench, tmp_path):
    cfg = config(tmp_path, "prompt=a snowy winter scene")
    step = 1
    r = bench.keyframes(cfg, step=step)
    assert r.ok, r.message
    run = bench.edit(cfg)
    drawn = run.facts["keyframes_per_step"][step]  # the keyframes the whole edit used at that step
    assert f"step {step}'s keyframes {drawn}" in r.message
    src = bench.source
    assert torch.equal(r.frames["source"], src.frames[drawn])
    # the keyframes alone, extended attention across them at every step, decoded
    settings = replace(EditSettings.from_config(cfg), mode="extended_all")
    latents, _ = edit_video_latents(src.models.unet, src.models.config.schedule, settings, src.prompts,
                                    {t: x[drawn] for t, x in src.source_latents.items()}, src.clean[drawn], src.timesteps)
    expected = from_model_range(decode_latents(src.models.vae, latents, 8))
    assert torch.equal(r.frames["edited jointly"], expected)
    alone = edit_video_latents(src.models.unet, src.models.config.schedule, settings, src.prompts,
                               {t: x[drawn[:1]] for t, x in src.source_latents.items()}, src.clean[drawn[:1]], src.timesteps)[0]
    assert not torch.allclose(alone, latents[:1])  # jointly: a keyframe's edit depends on the others


def test_the_keyframes_stage_needs_a_mode_that_draws_keyframes(bench, tmp_path):
    r = bench.keyframes(config(tmp_path, "tokenflow.mode=per_frame"))
    assert not r.ok and r.message == ("error: tokenflow.mode=per_frame draws no keyframes: the keyframes stage needs "
                                      "tokenflow.mode=tokenflow or fixed_keyframes")


def test_the_nn_field_stage_draws_the_figure_tools_figure(bench, tmp_path):
    cfg = config(tmp_path)
    frame, step = 4, 1
    r = bench.nn_field(cfg, frame, step=step)
    assert r.ok, r.message
    keyframe = nearest_keyframe(frame, keyframes_at(EditSettings.from_config(cfg), FRAMES, step))
    assert f"NN field of frame {frame} onto keyframe {keyframe}" in r.message
    fig = nn_field_figure(cfg, tmp_path / "fig3.png", source_frame=keyframe, target_frame=frame, step=step)
    assert (r.images["nn_field"] == read_png(fig.path)).all()


def test_nearest_keyframe_is_another_frame():
    assert nearest_keyframe(4, [1, 5, 8]) == 5
    assert nearest_keyframe(5, [1, 5, 8]) == 8  # not itself
    assert nearest_keyframe(3, [1, 5]) == 1  # a tie: the earlier one
    with pytest.raises(ValueError, match="only keyframe"):
        nearest_keyframe(2, [2])


def test_the_edit_stage_writes_what_the_command_line_writes(bench, tmp_path):
    cfg = config(tmp_path)
    r = bench.edit(cfg)
    assert r.ok, r.message
    assert set(r.files) == {"config", "edited", "side_by_side", "run.json"}
    assert r.facts["frames"] == FRAMES and r.message.startswith(f"wrote {FRAMES} frames, size [64, 64] (H, W)")
    out = (tmp_path / "outputs").resolve()
    assert all(str(out) in path for path in r.files.values())


# ------------------------------------------------------------------------------------- stop, queue, bad input


def test_stop_during_the_edit_ends_it_like_ctrl_c_and_writes_nothing(bench, tmp_path):
    cfg = config(tmp_path)

    def progress(fraction, what):
        if what.startswith("editing"):
            bench.request_stop()

    r = bench.edit(cfg, progress)
    assert not r.ok
    assert r.message.startswith("interrupted during editing; no outputs were written; the inverted latents of all "
                                f"{FRAMES} frames are cached in")
    written = [p for p in (tmp_path / "outputs").rglob("*") if p.is_file()]
    assert written == []  # nothing half-written
    assert bench.running is None and bench.edit(cfg).ok  # free for the next stage


def test_stop_during_the_inversion_keeps_the_finished_frames(bench, tmp_path):
    cfg = config(tmp_path, "inversion.batch_size=1")
    ticks = []

    def progress(fraction, what):
        ticks.append(what)
        if len(ticks) > 12:  # a few frames through every inversion step
            bench.request_stop()

    r = bench.invert(cfg, progress)
    assert not r.ok and r.message == ("stopped during the inversion; the frames it finished are in the inversion cache, "
                                      "and the next stage resumes from them; nothing else was written")
    assert bench.source is None
    reused = bench.edit(cfg).facts["inversion_frames_reused"]
    assert 0 < reused < FRAMES


def test_stop_during_the_keyframes_loop_ends_it_at_that_step_and_keeps_the_inversion(bench, tmp_path):
    cfg = config(tmp_path)
    assert bench.invert(cfg).ok
    src, steps = bench.source, []

    def progress(fraction, what):
        steps.append(what)
        bench.request_stop()

    r = bench.keyframes(cfg, step=1, progress=progress)
    assert not r.ok and r.message == "stopped during keyframes; nothing was written"
    assert steps == ["keyframes: step 1/3"]  # the loop's first step was its last
    assert bench.source is src and bench.keyframes(cfg, step=1).ok


def test_one_stage_runs_at_a_time_and_only_its_owner_stops_it(bench, tmp_path):
    cfg = config(tmp_path)
    started, release = threading.Event(), threading.Event()
    second_progress = []

    def first_progress(fraction, what):
        started.set()
        release.wait(30)

    results = {}
    a = threading.Thread(target=lambda: results.setdefault("a", bench.invert(cfg, first_progress, owner="a")))
    b = threading.Thread(target=lambda: results.setdefault("b", bench.invert(cfg, lambda f, w: second_progress.append(w),
                                                                           owner="b")))
    a.start()
    assert started.wait(30)
    b.start()
    b.join(1.0)
    assert b.is_alive() and second_progress == []  # waiting for the first stage
    assert bench.running == "invert" and bench.request_stop(owner="b").startswith("the running invert stage is another")
    release.set()
    a.join(60)
    b.join(60)
    assert results["a"].ok and results["b"].ok  # the refused stop stopped nothing


def test_an_upload_that_is_no_video_is_one_line(bench, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    with pytest.raises(ValueError, match="notes.txt: not a video file"):
        save_upload(notes, tmp_path / "uploads")
    fake = tmp_path / "fake.mp4"
    fake.write_bytes(b"not a video at all" * 100)
    kept = save_upload(fake, tmp_path / "uploads")
    assert kept.read_bytes() == fake.read_bytes() and kept.parent == tmp_path / "uploads"
    r = bench.invert(config(tmp_path, f"video={kept}"))
    assert not r.ok and r.message.startswith("error: ") and kept.name in r.message
    assert "\n" not in r.message and "Traceback" not in r.message


def test_psnr():
    a = torch.zeros(2, 4, 4, 3, dtype=torch.uint8)
    assert psnr(a, a) == math.inf
    assert psnr(a, a + 10) == pytest.approx(10 * math.log10(255**2 / 100))


def test_without_gradio_the_app_says_which_extra_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # as if not installed: importing it raises ImportError
    with pytest.raises(SystemExit) as e:
        app_main(["model=tiny"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == 'error: the web app needs Gradio: pip install "tokenflow-from-scratch[ui]"'


def test_the_invert_stage_shows_the_runs_own_reconstruction_and_ddpm_comes_back_as_the_vae_round_trip(bench, tmp_path):
    """The page's reconstruction is tokenflow.reconstruction's, the one run.json measures: with DDPM
    inversion it equals the VAE round trip of the source up to float rounding; DDIM's does not."""
    from tokenflow.inversion import decode_latents
    from tokenflow.media import from_model_range

    result = bench.invert(config(tmp_path, "inversion.method=ddpm"))
    assert result.ok, result.message
    src = bench.source
    round_trip = from_model_range(decode_latents(src.models.vae, src.clean, 8))
    assert psnr(result.frames["reconstruction"], round_trip) > 40
    ddim = bench.invert(config(tmp_path, "inversion.method=ddim"))
    round_trip = from_model_range(decode_latents(bench.source.models.vae, bench.source.clean, 8))
    assert psnr(ddim.frames["reconstruction"], round_trip) < 40
    assert bench.keyframes(config(tmp_path, "inversion.method=ddpm"), step=1).ok  # samples with the keyframes' own maps
