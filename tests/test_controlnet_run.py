"""ControlNet in a run: the control frames (canny, a precomputed clip), the settings, the loop's wiring
(which branches, which frames, which steps, scale 0), the pipeline end to end on the tiny models, and
bad input refused in one line before the models load."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ldm_writer_controlnet import diffusers_controlnet_to_ldm
from tokenflow import pipeline
from tokenflow.config import ConfigError, load_config
from tokenflow.control_conditions import canny_edges, check_conditions, make_conditions
from tokenflow.inputs import load_video
from tokenflow.media import read_video, write_png_frames, write_video
from tokenflow.media.sample_clip import render_sample_frames
from tokenflow.models.controlnet_loading import build_random_controlnet
from unet import UNetConfig
from tokenflow.pipeline import run_edit

FRAMES = 6


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """6 frames, 96x64 (not square: a transposed size shows); the run's frames are its 64x64 centre."""
    frames = render_sample_frames(FRAMES, 96)[:, 16:80]  # [6, 64, 96, 3]
    return write_video(tmp_path_factory.mktemp("clip") / "clip.mp4", frames, 10)


def config(tmp_path, clip, *overrides):
    return load_config(["model=tiny", "size=64", "steps=3", "inversion.steps=4", "progress=false", f"video={clip}",
                        "output.side_by_side=false", f"inversion.cache_dir={tmp_path / 'cache'}", *overrides])


def png_folder(frames: torch.Tensor, folder: Path) -> Path:
    """uint8 [n, H, W, 3] -> folder/00000.png ... (lossless, so the frames read back exactly)."""
    write_png_frames(folder, frames)
    return folder


# ---------------------------------------------------------------------------------------------
# control frames


def test_canny_edges_are_opencvs_on_each_frame_in_three_channels():
    frames = torch.full((3, 32, 48, 3), 100, dtype=torch.uint8)
    frames[:, 4:12, 4:12] = 250  # a strong edge: an edge at 100/200 and at 20/40
    frames[1, 16:28, 20:40] = 115  # a faint one: an edge at 20/40 only
    frames[2, 16:28, 20:40, 0] = 30  # one channel only: Canny takes the strongest channel's gradient
    edges = canny_edges(frames, 100, 200)
    assert edges.shape == (3, 3, 32, 48) and edges.dtype == torch.float32
    for i in range(3):
        want = torch.from_numpy(cv2.Canny(frames[i].numpy(), 100, 200)).float() / 255
        for c in range(3):
            assert torch.equal(edges[i, c], want)
    assert set(edges.unique().tolist()) == {0.0, 1.0}
    assert edges[0].sum() == edges[1].sum() < edges[2].sum()  # the faint box shows in no frame of 100/200 but the 3rd
    low = canny_edges(frames, 20, 40)
    assert low[1].sum() > edges[1].sum()  # the thresholds reach OpenCV


def test_canny_conditions_are_the_selected_frames_edges(tmp_path, clip):
    cfg = config(tmp_path, clip, "controlnet=canny", "frames.start=1", "frames.stride=2",
                 "controlnet.low_threshold=30", "controlnet.high_threshold=90")
    video = load_video(cfg)
    conditions = make_conditions(cfg, video, check_conditions(cfg, video))
    assert conditions.shape == (3, 3, video.height, video.width)
    assert torch.equal(conditions, canny_edges(video.frames, 30, 90))


def test_control_clip_of_the_source_is_selected_and_fitted_like_it(tmp_path, clip):
    """One control frame per source frame, at the source's size: the same frames.* pick and the same fit."""
    source = read_video(clip)  # every frame, unfitted
    control = png_folder(255 - source.frames, tmp_path / "control")  # a frame-by-frame different image
    cfg = config(tmp_path, clip, "controlnet=frames", f"controlnet.video={control}", "frames.start=1",
                 "frames.stride=2", "size=[64,64]")
    video = load_video(cfg)
    conditions = make_conditions(cfg, video, check_conditions(cfg, video))
    fitted = read_video(control, start=1, stride=2, size=(64, 64)).frames
    assert conditions.shape == (3, 3, 64, 64)
    assert torch.equal(conditions, fitted.permute(0, 3, 1, 2).float() / 255)
    inverted = (255 - video.frames).permute(0, 3, 1, 2).float() / 255  # the same geometry as the source's frames
    assert (conditions - inverted).abs().max() <= 2 / 255  # resizing the negative is the negative of resizing, to rounding


def test_control_clip_of_the_selected_frames_at_the_sources_size_is_fitted_like_it(tmp_path, clip):
    cfg = config(tmp_path, clip, "frames.start=2", "frames.max=3")
    video = load_video(cfg)
    made = 255 - read_video(clip, start=2, max_frames=3).frames  # the 3 selected frames, 96x64 as decoded
    control = png_folder(made, tmp_path / "control")
    cfg = config(tmp_path, clip, "frames.start=2", "frames.max=3", "controlnet=frames", f"controlnet.video={control}")
    conditions = make_conditions(cfg, video, check_conditions(cfg, video))
    assert torch.equal(conditions, read_video(control, size=64).frames.permute(0, 3, 1, 2).float() / 255)
    assert (conditions - (255 - video.frames).permute(0, 3, 1, 2).float() / 255).abs().max() <= 2 / 255


def test_control_clip_of_the_selected_frames_at_the_run_size_is_taken_as_is(tmp_path, clip):
    cfg = config(tmp_path, clip, "frames.max=4")
    video = load_video(cfg)
    made = torch.flip(video.frames, dims=[2])  # 4 frames at the run's size
    control = png_folder(made, tmp_path / "control")
    cfg = config(tmp_path, clip, "frames.max=4", "controlnet=frames", f"controlnet.video={control}")
    conditions = make_conditions(cfg, video, check_conditions(cfg, video))
    assert torch.equal(conditions, made.permute(0, 3, 1, 2).float() / 255)


@pytest.mark.parametrize("frames,size,message", [
    (4, None, "it has 4 frames; the run edits 3 of the video's 6"),
    (6, (128, 128), "its frames are 128x128; make them at the video's size 96x64 or at the run's size 64x64"),
    (3, (128, 128), "its frames are 128x128; make them at the video's size 96x64 or at the run's size 64x64"),
])
def test_a_control_clip_of_another_count_or_size_is_one_line_before_the_models(tmp_path, clip, monkeypatch, frames, size, message):
    source = read_video(clip, max_frames=frames, size=size if size else "keep")
    control = tmp_path / "control.mp4"
    write_video(control, source.frames, 10)
    cfg = config(tmp_path, clip, "frames.max=3", "controlnet=frames", f"controlnet.video={control}")
    monkeypatch.setattr(pipeline, "build_models", lambda *a, **k: pytest.fail("the models loaded"))
    monkeypatch.setattr(pipeline, "build_controlnet", lambda *a, **k: pytest.fail("the ControlNet loaded"))
    with pytest.raises(ValueError) as err:
        run_edit(cfg, tmp_path / "run")
    assert message in str(err.value) and "\n" not in str(err.value)
    assert str(control) in str(err.value)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# settings


@pytest.mark.parametrize("overrides,message", [
    (["controlnet=frames"], "controlnet=frames needs controlnet.video=PATH"),
    (["controlnet.video=x.mp4"], "controlnet.video is given but controlnet=none: add controlnet=frames"),
    (["controlnet=canny", "controlnet.video=x.mp4"], "controlnet.video is given but controlnet=canny"),
    (["model=sd15", "controlnet=frames", "controlnet.video=x.mp4"], "controlnet=frames needs controlnet.checkpoint="),
    (["controlnet=canny", "controlnet.guidance_start=0.6", "controlnet.guidance_end=0.6"], "must be less than controlnet.guidance_end"),
    (["controlnet=canny", "controlnet.guidance_end=1.5"], "controlnet.guidance_end must be in [0, 1]"),
    (["controlnet=canny", "controlnet.low_threshold=250", "controlnet.high_threshold=100"], "must not exceed controlnet.high_threshold"),
    (["controlnet=canny", "controlnet.scale=nan"], "controlnet.scale must be a finite number"),
    (["controlnet=cany"], "unknown controlnet cany (did you mean canny?"),
    (["controlnet.scael=1"], "did you mean controlnet.scale?"),
])
def test_bad_controlnet_settings_are_one_line(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(overrides)
    assert message in str(err.value)


def test_named_checkpoints_and_defaults():
    assert load_config([]).controlnet.name == "none"
    c = load_config(["controlnet=canny"]).controlnet
    assert (c.name, c.checkpoint, c.scale, c.guidance_start, c.guidance_end, c.low_threshold, c.high_threshold) == \
        ("canny", None, 1.0, 0.0, 1.0, 100, 200)
    c = load_config(["model=sd15", "controlnet=sd15_depth", "controlnet.video=depth.mp4"]).controlnet
    assert (c.name, c.checkpoint, c.video) == ("frames", "lllyasviel/control_v11f1p_sd15_depth", "depth.mp4")


def test_controlnet_source_follows_the_model_kind():
    from tokenflow.models.build import controlnet_source

    def source(*overrides):
        cfg = load_config(list(overrides))
        return controlnet_source(cfg.controlnet, cfg.model)

    assert source("model=tiny", "controlnet=canny") == "random"
    assert source("model=sd15", "controlnet=canny") == "lllyasviel/control_v11p_sd15_canny"
    assert source("model=sd15", "controlnet=canny", "controlnet.checkpoint=/x/cn") == "/x/cn"
    assert source("model=sd15", "model.source=random", "controlnet=canny") == "random"
    assert source("controlnet=canny") == "thibaud/controlnet-sd21/control_v11p_sd21_canny.safetensors"  # sd21_base: SD-2.x
    assert source("model=tiny_sd15", "controlnet=frames", "controlnet.video=x.mp4") == "random"


def test_missing_opencv_is_one_line_naming_the_pip_command(tmp_path, clip, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "cv2", None)  # import cv2 now raises ImportError
    cfg = config(tmp_path, clip, "controlnet=canny", "frames.max=2")
    monkeypatch.setattr(pipeline, "build_models", lambda *a, **k: pytest.fail("the model loaded"))
    with pytest.raises(ValueError) as err:
        run_edit(cfg, tmp_path / "run")
    assert "pip install opencv-python-headless" in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------
# the pipeline end to end


def test_pipeline_canny_run_counts_controlnet_forwards_and_scale_zero_changes_nothing(tmp_path, clip):
    base = ("frames.max=3", "tokenflow.keyframe_interval=2")
    facts = run_edit(config(tmp_path, clip, *base, "controlnet=canny"), tmp_path / "canny")
    run = json.loads((tmp_path / "canny" / "run.json").read_text())
    assert run["controlnet_frame_forwards"] == run["unet_frame_forwards"] == facts.unet_frame_forwards > 0
    assert run["controlnet"] == {"condition": "canny", "checkpoint": "random", "scale": 1.0, "guidance_start": 0.0,
                                 "guidance_end": 1.0, "low_threshold": 100, "high_threshold": 200}
    run_edit(config(tmp_path, clip, *base), tmp_path / "none")
    run_edit(config(tmp_path, clip, *base, "controlnet=canny", "controlnet.scale=0"), tmp_path / "zero")
    none_run = json.loads((tmp_path / "none" / "run.json").read_text())
    assert none_run["controlnet_frame_forwards"] == 0 and none_run["controlnet"] is None
    edited = {k: read_video(tmp_path / k / "edited.mp4").frames for k in ("canny", "none", "zero")}
    assert torch.equal(edited["zero"], edited["none"])
    assert not torch.equal(edited["canny"], edited["none"])
    # 3 steps, window from 0.34: step 2 alone (2/3 >= 0.34 > 1/3), the 3 frames once
    late = run_edit(config(tmp_path, clip, *base, "controlnet=canny", "controlnet.guidance_start=0.34"), tmp_path / "late")
    assert late.controlnet_frame_forwards == 3 and late.unet_frame_forwards == facts.unet_frame_forwards == 9


def test_pipeline_frames_run_on_tiny_sd15_with_sdedit(tmp_path, clip):
    source = read_video(clip)
    control = png_folder(canny_frames(source.frames), tmp_path / "edges")
    cfg = config(tmp_path, clip, "model=tiny_sd15", "size=64", "steps=4", "method=sdedit", "method.strength=0.5",
                 "controlnet=frames", f"controlnet.video={control}", "controlnet.guidance_end=0.5", "frames.max=3")
    facts = run_edit(cfg, tmp_path / "run")
    assert facts.frames == 3
    assert facts.controlnet["video"] == str(control)
    # SDEdit runs 2 of the 4 steps; the window [0, 0.5] guides the first of them: 3 frames, one step
    assert facts.unet_frame_forwards == 2 * 3 and facts.controlnet_frame_forwards == 3


def canny_frames(frames: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.repeat(cv2.Canny(f, 100, 200)[..., None], 3, -1) for f in frames.numpy()]))


def test_controlnet_of_the_other_family_is_one_line_before_any_weights(tmp_path, clip, monkeypatch):
    sd15 = build_random_controlnet(UNetConfig.tiny_sd15(), seed=0)
    single = tmp_path / "control_sd15_canny.safetensors"
    ldm = diffusers_controlnet_to_ldm(sd15.state_dict(), 4, 2, (True, True, True, False))
    save_file({k: v.contiguous() for k, v in ldm.items()}, single)
    cfg = config(tmp_path, clip, "controlnet=canny", f"controlnet.checkpoint={single}", "frames.max=2")
    monkeypatch.setattr(pipeline, "build_models", lambda *a, **k: pytest.fail("the model loaded"))
    with pytest.raises(ValueError) as err:
        run_edit(cfg, tmp_path / "run")
    assert "SD-1.x" in str(err.value) and "SD-2.x" in str(err.value) and str(single) in str(err.value)
    assert not (tmp_path / "run").exists()


def test_missing_checkpoint_offline_names_the_files_to_fetch(tmp_path, clip, monkeypatch):
    from tokenflow.models.loading import ModelNotAvailable

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    cfg = config(tmp_path, clip, "controlnet=canny", "controlnet.checkpoint=nobody/no-such-controlnet", "frames.max=2")
    monkeypatch.setattr(pipeline, "build_models", lambda *a, **k: pytest.fail("the model loaded"))
    with pytest.raises(ModelNotAvailable) as err:
        run_edit(cfg, tmp_path / "run")
    assert "nobody/no-such-controlnet" in str(err.value)
    assert "config.json" in str(err.value) and "diffusion_pytorch_model.safetensors" in str(err.value)
