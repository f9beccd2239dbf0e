"""The `tokenflow` command line as a person types it: prompts with any text (through the real console
script), prompt files, typos refused with the nearest key, the size default, a failed run's folder,
run folders of simultaneous runs, and Ctrl-C during inversion."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tokenflow import cli, pipeline
from tokenflow.config import load_config
from tokenflow.inputs import load_video
from tokenflow.interrupt import RunInterrupted
from tokenflow.overrides import UsageError, prepare
from tokenflow.media import write_video
from tokenflow.media.sample_clip import make_sample_clip

REPO = Path(__file__).resolve().parents[1]
TOKENFLOW = shutil.which("tokenflow") or pytest.fail("the tokenflow console script is not installed (pip install -e .)")

PROMPTS = {
    "comma": "a marble sculpture of a woman running, Venus de Milo",
    "apostrophe": "a wolf's portrait, Van Gogh's style",
    "double quote": 'a sign that reads "OPEN"',
    "both quotes and backslash": 'it\'s "quoted" \\ and ends with a backslash\\',
    "unicode": "ein Wolf aus Marmor, größer, café, 狼",
    "emoji": "a wolf 🐺 under a full moon 🌕",
    "interpolation-like": "costs ${price} or $5, 100% {not} [a, list] =x",
}


def composed(args: list[str]) -> dict:
    """The settings of a command line, as the command composes them."""
    return load_config(args).to_dict()


def tokenflow(*args, cwd, timeout=300):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([TOKENFLOW, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("kind", PROMPTS)
def test_any_prompt_text_composes_back_to_itself(kind):
    text = PROMPTS[kind]
    for key in ("prompt", "negative_prompt", "inversion_prompt"):
        assert composed([f"{key}={text}"])[key] == text
    assert composed([f"prompt={text}", "model=tiny", "steps=3"])["steps"] == 3  # other overrides untouched


@pytest.mark.parametrize("kind", PROMPTS)
def test_console_script_takes_each_kind_of_prompt(tmp_path, kind):
    text = PROMPTS[kind]
    res = tokenflow("--cfg", "job", "--resolve", "model=tiny", f"prompt={text}", f"negative_prompt={text}, blurry",
                    cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    job = yaml.safe_load(res.stdout)  # what the run gets (resolved), read as plain YAML
    assert job["prompt"] == text and job["negative_prompt"] == text + ", blurry"


def test_prompt_file_reads_a_long_prompt(tmp_path):
    text = "a marble sculpture of a woman running, Venus de Milo,\nhighly detailed — \"museum\" light, l'été 🌞"
    (tmp_path / "prompt.txt").write_text(text + "\n\n", encoding="utf-8")
    assert composed([f"prompt_file={tmp_path / 'prompt.txt'}"])["prompt"] == text  # trailing newlines dropped
    assert composed([f"negative_prompt_file={tmp_path / 'prompt.txt'}"])["negative_prompt"] == text
    res = tokenflow("--cfg", "job", "--resolve", f"prompt_file={tmp_path / 'prompt.txt'}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert yaml.safe_load(res.stdout)["prompt"] == text
    with pytest.raises(UsageError, match="no-such.txt: no such file"):
        prepare([f"prompt_file={tmp_path / 'no-such.txt'}"])
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(UsageError, match="empty"):
        prepare([f"prompt_file={tmp_path / 'empty.txt'}"])
    with pytest.raises(UsageError, match="prompt is given twice"):
        prepare(["prompt=a cat", f"prompt_file={tmp_path / 'prompt.txt'}"])


@pytest.mark.parametrize("arg,hint", [
    ("+promt=a cat", "did you mean prompt?"),  # Hydra's own hint for the typo below; it would run the default prompt
    ("promt=a cat", "did you mean prompt?"),
    ("+negative_promt=blurry", "did you mean negative_prompt?"),
    ("+tokenflow.keyframe_intervall=4", "did you mean tokenflow.keyframe_interval?"),
    ("inversion.step=20", "did you mean inversion.steps?"),
    ("+sead=3", "did you mean seed?"),
])
def test_unknown_keys_are_refused_with_the_nearest_known_key(tmp_path, arg, hint):
    with pytest.raises(UsageError, match=hint.replace("?", r"\?")):
        prepare([arg])
    res = tokenflow("model=tiny", arg, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert res.returncode == 2 and hint in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "run").exists()


def test_known_overrides_and_hydra_flags_pass_through():
    args = ["-m", "model=tiny", "tokenflow.mode=tokenflow,per_frame", "hydra.run.dir=x", "++seed=3", "hydra/launcher=basic"]
    assert prepare(args) == args


def native_size_cfg(model: str, *overrides):
    return load_config([f"model={model}", *overrides])


@pytest.mark.parametrize("model,size,expected", [
    ("sd21_base", None, (512, 832)),  # the model's native short side, not the input's size
    ("sd21", None, (768, 1280)),
    ("tiny", None, (128, 192)),
    ("sd21_base", "size=full", (64, 128)),  # the input's own size, cropped to multiples of 64
    ("sd21_base", "size=256", (256, 384)),
])
def test_size_defaults_to_the_models_native_short_side(tmp_path, model, size, expected):
    clip = write_video(tmp_path / "wide.mp4", torch.randint(0, 255, (2, 96, 160, 3), dtype=torch.uint8), 10)
    cfg = native_size_cfg(model, f"video={clip}", *([size] if size else []))
    video = load_video(cfg)
    assert (video.height, video.width) == expected


def test_size_rejects_an_unknown_word_before_hydra_runs_the_job(tmp_path):
    res = tokenflow("model=tiny", "size=native", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert res.returncode == 2 and "error: size must be null" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "run").exists()


def test_failed_run_leaves_no_folder(tmp_path):
    res = tokenflow("model=tiny", f"video={tmp_path / 'missing.mp4'}", f"hydra.run.dir={tmp_path / 'out' / 'run'}",
                    cwd=tmp_path)
    assert res.returncode == 2 and "missing.mp4" in res.stderr and "no outputs were written" in res.stderr
    assert not (tmp_path / "out").exists()  # neither the run's folder nor the empty DATE folder above it
    # a folder that already held files keeps them, and says so
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "notes.txt").write_text("mine")
    (tmp_path / "kept" / ".hydra").mkdir()
    (tmp_path / "kept" / ".hydra" / "config.yaml").write_text("an earlier run's")
    before = snapshot(tmp_path / "kept")
    res = tokenflow("model=tiny", f"video={tmp_path / 'missing.mp4'}", f"hydra.run.dir={tmp_path / 'kept'}", cwd=tmp_path)
    assert res.returncode == 2 and "keeps the files it held before" in res.stderr
    assert snapshot(tmp_path / "kept") == before  # exactly as it was, .hydra/ included


def snapshot(folder: Path) -> dict:
    """Every file and folder under `folder` with its bytes and modification time."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))} | {".": folder.stat().st_mtime_ns}


def test_runs_started_together_write_to_their_own_folders(tmp_path):
    clip = make_sample_clip(tmp_path / "clip.mp4", frames=2, size=64, fps=10)
    args = [TOKENFLOW, f"video={clip}", "model=tiny", "size=64", "steps=1", "inversion.steps=2", "progress=false",
            f"inversion.cache_dir={tmp_path / 'cache'}"]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    procs = [subprocess.Popen([*args, f"seed={k}"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e for _, e in outs]
    runs = sorted((tmp_path / "outputs").glob("*/*/run.json"))
    assert len(runs) == 3  # three folders, each with its own run (named by the second, then -2, -3 when taken)
    assert all(json.loads(r.read_text())["frames"] == 2 for r in runs)
    seeds = sorted(yaml.safe_load((r.parent / "config.yaml").read_text())["seed"] for r in runs)
    assert seeds == [0, 1, 2]
    assert not list((tmp_path / "outputs").rglob(".hydra")) and not list((tmp_path / "outputs").rglob("*.log"))


def test_ctrl_c_during_inversion_prints_one_line_and_leaves_nothing(tmp_path):
    # 16 frames, one per forward batch: after the first is cached, 15 x 20 forwards are left to interrupt
    clip = make_sample_clip(tmp_path / "clip.mp4", frames=16, size=64, fps=10)
    cache, run_dir = tmp_path / "cache", tmp_path / "run"
    args = [f"video={clip}", "model=tiny", "size=64", "inversion.steps=20", "inversion.batch_size=1", "steps=2",
            f"inversion.cache_dir={cache}", f"hydra.run.dir={run_dir}"]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([TOKENFLOW, *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not list(cache.glob("*/frame_00000.safetensors")):  # the first frame is inverted and cached
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the inversion did not cache a frame in time"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == cli.INTERRUPTED_EXIT
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    last = err.strip().splitlines()[-1]
    cache_dir = next(cache.glob("*/frame_00000.safetensors")).parent
    assert last.startswith("interrupted during inversion; no outputs were written; the inverted latents of ")
    cached = len(list(cache_dir.glob("frame_*.safetensors")))
    assert 1 <= cached < 16
    assert f"of {cached}/16 frames are cached in {cache_dir}: the same command resumes with the other {16 - cached}" in last
    assert last.count("no outputs were written") == 1, last
    assert not run_dir.exists()  # no partial outputs, and not Hydra's folder either


def test_random_weights_are_said_on_the_console_and_in_run_facts(tmp_path):
    clip = make_sample_clip(tmp_path / "clip.mp4", frames=2, size=64, fps=10)
    res = tokenflow(f"video={clip}", "model=tiny", "size=64", "steps=1", "inversion.steps=2", "progress=false",
                    f"inversion.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}",
                    "prompt=a wolf, in marble — l'été 🐺", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert f"warning: {pipeline.RANDOM_WEIGHTS_WARNING}" in res.stderr and res.stderr.count(pipeline.RANDOM_WEIGHTS_WARNING) == 2
    run = json.loads((tmp_path / "run" / "run.json").read_text(encoding="utf-8"))
    assert run["warnings"] == [pipeline.RANDOM_WEIGHTS_WARNING] and run["prompt"] == "a wolf, in marble — l'été 🐺"
    assert "ranks" not in run  # one process: no torchrun ranks to list
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["config.yaml", "edited.mp4", "run.json", "side_by_side.mp4"]  # no cli.log
    assert "at 10 fps" in res.stdout


def test_ctrl_c_after_the_inversion_names_the_stage_and_the_whole_cache(tmp_path, monkeypatch):
    clip = make_sample_clip(tmp_path / "clip.mp4", frames=2, size=64, fps=10)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "edit_video_latents", interrupted)
    cfg = native_size_cfg("tiny", f"video={clip}", "size=64", "steps=1", "inversion.steps=2", "progress=false",
                          f"inversion.cache_dir={tmp_path / 'cache'}")
    with pytest.raises(RunInterrupted) as stop:
        pipeline.run_edit(cfg, tmp_path / "run")
    assert str(stop.value).startswith("interrupted during editing; no outputs were written; the inverted latents of all 2 "
                                      f"frames are cached in {tmp_path / 'cache'}")
    assert str(stop.value).endswith("the same command reuses them")
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_ctrl_c_before_any_frame_is_cached_says_nothing_is_cached():
    line = str(RunInterrupted("inversion", "/cache/abc", 0, 16))
    assert line == ("interrupted during inversion; no outputs were written; no frame's inversion was finished yet "
                    "(cache /cache/abc): the same command starts over")
    assert "0/16" not in line


def test_unreadable_video_is_one_line_naming_the_file_without_ffmpegs_errno(tmp_path):
    bad = tmp_path / "notes.mp4"
    bad.write_text("not a video")
    res = tokenflow(f"video={bad}", "model=tiny", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert res.returncode == cli.ERROR_EXIT
    # one line: no random-weights warning before it (the run never got past its input), no FFmpeg errno
    assert res.stderr.strip().splitlines() == [
        f"error: {bad}: not a video FFmpeg can read (invalid data found when processing input) (no outputs were written)"]
    assert not (tmp_path / "run").exists()


def test_help_starts_with_how_to_use_the_command(tmp_path):
    res = tokenflow("--help", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    usage, hydras = res.stdout.split("== Configuration groups ==", 1)
    assert usage.startswith("usage: tokenflow [KEY=VALUE ...]") and "is powered by Hydra" not in res.stdout
    for said in ("video=PATH", "a folder of images", "prompt=TEXT", "prompt_file=FILE", "method=NAME", "experiment=NAME",
                 "model.source=PATH", "outputs/DATE/TIME/", "hydra.run.dir=", "docs/settings.md"):
        assert said in usage, said
    from tokenflow.models.presets import PRESETS

    assert all(name in usage for name in PRESETS), sorted(PRESETS)  # every model the command knows is named
    assert "prompt: a colorful watercolor painting" in hydras  # Hydra's own help (groups, the config) follows
    assert not list(tmp_path.iterdir())  # --help writes nothing


def test_console_and_run_facts_give_the_size_the_same_way(tmp_path):
    """One convention, [H, W]: as size= takes it, as run.json holds it, as the console prints it."""
    clip = make_sample_clip(tmp_path / "clip.mp4", frames=2, size=128, fps=10)
    res = tokenflow(f"video={clip}", "model=tiny", "size=[64,128]", "steps=1", "inversion.steps=2", "progress=false",
                    f"inversion.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "run" / "run.json").read_text())["size"] == [64, 128]
    assert "2 frames, size [64, 128] (H, W), at 10 fps" in res.stdout
    assert "centre-cropped [128, 128] -> [64, 128]" in res.stderr
