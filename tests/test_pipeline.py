"""End to end on the tiny random model: every mode writes videos with the source's frame count and
fps, the inversion cache is reused, the CLI and a multirun sweep work, and bad input or a failure
while writing leaves none of the run's outputs behind."""

import json
import os
import stat
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from tokenflow import measure, outputs, pipeline
from tokenflow.config import load_config
from tokenflow.measure import PROCESS_PEAK_NOTE, PeakMemory
from tokenflow.pipeline import run_edit
from tokenflow.media.sample_clip import make_sample_clip
from tokenflow.media import read_video, write_video

REPO = Path(__file__).resolve().parents[1]
OUR_OUTPUTS = ("config.yaml", "edited.mp4", "side_by_side.mp4", "frames", "run.json")


def written(run_dir: Path) -> list[str]:
    """What a run left in its folder (staging folders included); [] when it made no folder."""
    return sorted(p.name for p in run_dir.iterdir()) if run_dir.exists() else []


def config(tmp_path, *overrides):
    return load_config(["model=tiny", "size=64", "steps=2", "inversion.steps=4", "progress=false",
                        f"inversion.cache_dir={tmp_path / 'cache'}", *overrides])


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
    assert run["frames"] == 7 and run["fps"] == 15 and isinstance(run["fps"], float) and run["mode"] == mode
    assert run["warnings"] == [pipeline.RANDOM_WEIGHTS_WARNING]  # the tiny model says its output is noise
    umask = os.umask(0)
    os.umask(umask)
    modes = {name: stat.S_IMODE((out / name).stat().st_mode) for name in ("config.yaml", "edited.mp4", "side_by_side.mp4", "run.json")}
    assert set(modes.values()) == {0o666 & ~umask}, modes  # the videos too (written through a 0600 temp file)
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
    # the fp16 variant is other weights: its latents are not these (the tiny model ignores it, the key must not)
    variant = run_edit(config(tmp_path, f"video={clip}", "model.variant=fp16"), tmp_path / "d")
    assert variant.inversion_frames_reused == 0


def test_one_frame_and_odd_sizes_are_handled(tmp_path):
    frames = torch.randint(0, 255, (3, 70, 100, 3), dtype=torch.uint8)
    odd = write_video(tmp_path / "odd.mp4", frames, 20)
    facts = run_edit(config(tmp_path, f"video={odd}", "size=full", "frames.max=1"), tmp_path / "one")
    assert facts.frames == 1 and facts.size == [64, 64]  # centre-cropped to multiples of 64, and said so
    assert any("crop" in note for note in facts.notes)
    assert read_video(tmp_path / "one" / "edited.mp4").num_frames == 1


def test_long_prompt_is_truncated_with_a_recorded_warning(tmp_path, clip):
    long_prompt = " ".join(["a very detailed oil painting of a wolf"] * 12)
    facts = run_edit(config(tmp_path, f"video={clip}", f"prompt={long_prompt}", "frames.max=2"), tmp_path / "r")
    assert [w for w in facts.warnings if "dropped" in w] == [
        f"prompt has 96 tokens, CLIP reads at most 75: the last 21 token(s) are dropped (prompt starts {long_prompt[:60] + '...'!r})"]
    facts = run_edit(config(tmp_path, f"video={clip}", f"negative_prompt={long_prompt}", "frames.max=2"), tmp_path / "n")
    assert [w.split(" has ")[0] for w in facts.warnings if "dropped" in w] == ["negative_prompt"]  # which prompt, by its key


@pytest.mark.parametrize("override,error", [
    ("video=/nonexistent/clip.mp4", FileNotFoundError),
    ("prompt= ", ValueError),
    ("frames.start=50", ValueError),  # zero frames selected
    ("size=[100,100]", ValueError),  # not a multiple of 64
    ("tokenflow.mode=magic", ValueError),
    ("output.fps=0", ValueError),
])
def test_bad_input_fails_before_writing_anything(tmp_path, clip, override, error):
    out = tmp_path / "run"
    with pytest.raises(error):  # the settings' own checks (prompt, mode, fps) fail before a run starts
        run_edit(config(tmp_path, f"video={clip}", override), out)
    assert written(out) == []


def test_not_a_video(tmp_path):
    fake = tmp_path / "notes.mp4"
    fake.write_text("this is not a video")
    with pytest.raises(ValueError, match="notes.mp4"):
        run_edit(config(tmp_path, f"video={fake}"), tmp_path / "run")
    assert written(tmp_path / "run") == []


@pytest.mark.parametrize("strength", ["0", "1.5"])
def test_bad_sdedit_strength_fails_before_the_models_load(tmp_path, clip, monkeypatch, strength):
    def no_models(*args, **kwargs):
        raise AssertionError("the models were loaded for a run that should have failed on its settings")

    monkeypatch.setattr(pipeline, "build_models", no_models)
    with pytest.raises(ValueError, match=r"strength.*\(0, 1\]"):
        run_edit(config(tmp_path, f"video={clip}", "method=sdedit", f"method.strength={strength}"), tmp_path / "run")
    assert written(tmp_path / "run") == []


def fail_on_side_by_side(monkeypatch):
    real = outputs.write_video

    def write_video(path, *args, **kwargs):
        if Path(path).name == "side_by_side.mp4":
            assert (Path(path).parent / "edited.mp4").is_file()  # already written, under its temporary name
            raise OSError("disk full (injected)")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(outputs, "write_video", write_video)


def fail_after_some_png_frames(monkeypatch):
    real = outputs.write_png_frames

    def write_png_frames(folder, frames):
        real(folder, frames[:2])  # some frames are on disk when it fails
        raise OSError("disk full (injected)")

    monkeypatch.setattr(outputs, "write_png_frames", write_png_frames)


@pytest.mark.parametrize("inject", [fail_on_side_by_side, fail_after_some_png_frames])
def test_failure_while_writing_leaves_no_outputs(tmp_path, clip, monkeypatch, inject):
    out = tmp_path / "run"
    inject(monkeypatch)
    with pytest.raises(OSError, match="injected"):
        run_edit(config(tmp_path, f"video={clip}", "frames.max=2", "output.png_frames=true"), out)
    assert written(out) == []  # edited.mp4 was written before the failure, and is gone too


def test_outputs_replace_an_earlier_runs_in_the_same_dir(tmp_path, clip):
    out = tmp_path / "run"
    cfg = config(tmp_path, f"video={clip}", "frames.max=2", "output.png_frames=true")
    run_edit(cfg, out)
    run_edit(cfg, out)  # frames/ is a folder: it cannot simply be renamed over the old one
    assert written(out) == sorted(OUR_OUTPUTS)
    assert sorted(p.name for p in (out / "frames").iterdir()) == ["00000.png", "00001.png"]


def test_sample_clip_is_rendered_once_into_the_cache(tmp_path, capsys):
    cfg = config(tmp_path, "video=sample", "frames.max=2", "output.side_by_side=false")
    first = run_edit(cfg, tmp_path / "a")
    assert written(tmp_path / "a") == ["config.yaml", "edited.mp4", "run.json"]  # no copy of the input
    assert Path(first.video).parent == tmp_path / "cache" / "sample_clip"
    err = capsys.readouterr().err
    assert f"inverted latents cached in {first.inversion_cache}" in err
    second = run_edit(cfg, tmp_path / "b")
    assert second.video == first.video and second.inversion_frames_reused == 2  # same clip bytes, same key
    err = capsys.readouterr().err
    assert "reusing cached inversion" in err and "inverted latents cached in" not in err


def vm_hwm_mb() -> float:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="resetting the RSS peak needs Linux /proc")
def test_peak_memory_is_the_runs_own_not_the_processes(tmp_path, clip):
    big = torch.ones(2**28)  # 1 GiB, every page touched: the process's peak is now at least that high
    process_peak = vm_hwm_mb()
    del big
    facts = run_edit(config(tmp_path, f"video={clip}", "frames.max=2", "output.side_by_side=false"), tmp_path / "run")
    assert facts.peak_memory_mb["cpu_rss"] < process_peak - 512  # the tiny run needs far less than 512 MiB more
    assert PROCESS_PEAK_NOTE not in facts.notes


def test_peak_memory_says_so_when_it_is_the_processes(tmp_path, monkeypatch):
    monkeypatch.setattr(measure, "PROC_CLEAR_REFS", tmp_path / "no-proc" / "clear_refs")
    memory = PeakMemory("cpu")
    assert memory.note == PROCESS_PEAK_NOTE and memory.report()["cpu_rss"] > 0


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
    assert written(tmp_path / "x") == []  # the failed run's folder is removed
    assert "no outputs were written" in res.stderr
