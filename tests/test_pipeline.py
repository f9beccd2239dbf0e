"""End to end on the tiny random model: every mode writes videos with the source's frame count and
fps, the inversion cache is reused, the CLI and a multirun sweep work, and bad input fails cleanly
without leaving outputs behind."""

import json
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tokenflow.pipeline import run_edit
from tokenflow.sample_clip import make_sample_clip
from tokenflow.video import read_video, write_video

REPO = Path(__file__).resolve().parents[1]


def config(tmp_path, *overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose("config", overrides=[
            "model=tiny", "size=64", "steps=2", "inversion.steps=4", "progress=false",
            f"inversion.cache_dir={tmp_path / 'cache'}", *overrides,
        ])
    return OmegaConf.to_container(cfg, resolve=True)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    # 7 frames at 15 fps: neither a multiple of 8 nor the default rate, which must both survive
    return make_sample_clip(tmp_path_factory.mktemp("clip") / "clip.mp4", frames=7, size=64, fps=15)


@pytest.mark.parametrize("mode,method", [
    ("tokenflow", "pnp"), ("tokenflow", "sdedit"), ("fixed_keyframes", "pnp"),
    ("per_frame", "pnp"), ("extended_all", "pnp"), ("reconstruction", "pnp"),
])
def test_every_mode_writes_the_source_frames_and_fps(tmp_path, clip, mode, method):
    out = tmp_path / "run"
    facts = run_edit(config(tmp_path, f"video={clip}", f"tokenflow.mode={mode}", f"method={method}",
                            "tokenflow.keyframe_interval=3"), out)
    for name in ("edited.mp4", "side_by_side.mp4", "run.json"):
        assert (out / name).is_file()
    edited = read_video(out / "edited.mp4")
    assert edited.num_frames == 7 and edited.fps == Fraction(15) and (edited.height, edited.width) == (64, 64)
    sbs = read_video(out / "side_by_side.mp4")
    assert sbs.num_frames == 7 and sbs.width == 128
    run = json.loads((out / "run.json").read_text())
    assert run["frames"] == 7 and run["fps"] == "15" and run["mode"] == mode
    assert run["peak_memory_mb"]["cpu_rss"] > 0
    if mode == "tokenflow":
        assert len(run["keyframes_per_step"]) == len(run["timesteps"]) > 0
        assert all(len(k) == 3 for k in run["keyframes_per_step"])  # intervals [0,3) [3,6) [6,7)
        assert {"inversion", "editing"} <= set(run["seconds_per_frame"])


def test_seeded_run_is_bit_identical_and_reuses_inversion(tmp_path, clip):
    cfg = config(tmp_path, f"video={clip}", "output.side_by_side=false", "output.png_frames=true")
    first = run_edit(cfg, tmp_path / "a")
    second = run_edit(cfg, tmp_path / "b")
    assert first.inversion_frames_reused == 0 and second.inversion_frames_reused == 7
    assert first.keyframes_per_step == second.keyframes_per_step
    for i in range(7):
        a = (tmp_path / "a" / "frames" / f"{i:05d}.png").read_bytes()
        assert a == (tmp_path / "b" / "frames" / f"{i:05d}.png").read_bytes()
    forced = run_edit(config(tmp_path, f"video={clip}", "inversion.force=true"), tmp_path / "c")
    assert forced.inversion_frames_reused == 0


def test_one_frame_and_odd_sizes_are_handled(tmp_path):
    frames = torch.randint(0, 255, (3, 70, 100, 3), dtype=torch.uint8)
    odd = write_video(tmp_path / "odd.mp4", frames, 20)
    facts = run_edit(config(tmp_path, f"video={odd}", "size=null", "frames.max=1"), tmp_path / "one")
    assert facts.frames == 1 and facts.size == [64, 64]  # centre-cropped to multiples of 64, and said so
    assert any("crop" in note for note in facts.notes)
    assert read_video(tmp_path / "one" / "edited.mp4").num_frames == 1


def test_long_prompt_is_truncated_with_a_recorded_warning(tmp_path, clip):
    long_prompt = " ".join(["a very detailed oil painting of a wolf"] * 12)
    facts = run_edit(config(tmp_path, f"video={clip}", f"prompt='{long_prompt}'", "frames.max=2"), tmp_path / "r")
    assert any("dropped" in w for w in facts.warnings)


@pytest.mark.parametrize("override,error", [
    ("video=/nonexistent/clip.mp4", FileNotFoundError),
    ("prompt=''", ValueError),
    ("frames.start=50", ValueError),  # zero frames selected
    ("size=[100,100]", ValueError),  # not a multiple of 64
    ("tokenflow.mode=magic", ValueError),
])
def test_bad_input_fails_before_writing_anything(tmp_path, clip, override, error):
    out = tmp_path / "run"
    cfg = config(tmp_path, f"video={clip}", override)
    with pytest.raises(error):
        run_edit(cfg, out)
    assert not any(out.glob("*.mp4")) and not (out / "run.json").exists()


def test_not_a_video(tmp_path):
    fake = tmp_path / "notes.mp4"
    fake.write_text("this is not a video")
    with pytest.raises(ValueError, match="notes.mp4"):
        run_edit(config(tmp_path, f"video={fake}"), tmp_path / "run")


def run_cli(args, cwd):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "tokenflow.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_cli_run_and_multirun_sweep(tmp_path, clip):
    common = [f"video={clip}", "model=tiny", "size=64", "steps=2", "inversion.steps=4", "progress=false",
              f"inversion.cache_dir={tmp_path / 'cache'}"]
    res = run_cli([*common, f"hydra.run.dir={tmp_path / 'single'}"], tmp_path)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "single" / "edited.mp4").is_file() and (tmp_path / "single" / "config.yaml").is_file()
    assert "wrote edited" in res.stdout
    res = run_cli(["-m", *common, "tokenflow.mode=tokenflow,per_frame", f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path)
    assert res.returncode == 0, res.stderr
    runs = sorted(p.parent for p in (tmp_path / "sweep").glob("*/run.json"))
    assert len(runs) == 2
    assert {json.loads((r / "run.json").read_text())["mode"] for r in runs} == {"tokenflow", "per_frame"}


def test_cli_without_weights_says_what_to_do(tmp_path, clip):
    res = run_cli([f"video={clip}", "model.source=nobody/no-such-model", f"hydra.run.dir={tmp_path / 'x'}"], tmp_path)
    assert res.returncode == 2
    assert "model=tiny" in res.stderr and "nobody/no-such-model" in res.stderr
