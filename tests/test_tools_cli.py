"""Every tool's command line: `--help` runs, no flag is taken by abbreviation, a model is picked the
same way everywhere, and the README's weight-free examples run as written."""

import argparse
import importlib
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from repo_copy import copy_of_the_clone
import pytest
import torch

from tokenflow.media import write_video
from tools import warp_error

REPO = Path(__file__).resolve().parents[1]
# every module under tools/ and tools/maintainers/ with a command line (a main() that builds an
# ArgumentParser), as `python -m tools.NAME` names it: warp_error, maintainers.bench, ...
TOOLS = sorted(".".join(p.relative_to(REPO / "tools").with_suffix("").parts)
               for p in [*(REPO / "tools").glob("*.py"), *(REPO / "tools" / "maintainers").glob("*.py")]
               if "ArgumentParser(" in p.read_text() and "def main(" in p.read_text())
SUBCOMMANDS = {"figures": ["pca", "nnfield"]}


def python_m(*args, cwd=REPO, timeout=600):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_tools_are_found():
    assert {"warp_error", "clip_score", "memory_estimate", "figures", "table1", "toy_propagation"} <= set(TOOLS)
    assert {"maintainers.bench", "maintainers.check_full_size", "maintainers.gpu_check", "maintainers.mutation_check"} <= set(TOOLS)


@pytest.mark.parametrize("tool", TOOLS)
def test_help_runs(tool):
    for sub in [[]] + [[s] for s in SUBCOMMANDS.get(tool, [])]:
        res = python_m(f"tools.{tool}", *sub, "--help")
        assert res.returncode == 0, res.stderr
        assert res.stdout.startswith(f"usage: python -m tools.{tool}")
        assert "--models" not in res.stdout and "--config " not in res.stdout  # the old, second ways to pick a model


def parsers_of(tool: str, monkeypatch) -> list[argparse.ArgumentParser]:
    """Every argument parser `tools.<tool> --help` builds (subcommands too); --help exits 0."""
    made = []
    real_init = argparse.ArgumentParser.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(argparse.ArgumentParser, "__init__", init)
    with pytest.raises(SystemExit) as done:
        importlib.import_module(f"tools.{tool}").main(["--help"])
    assert done.value.code == 0
    return made


@pytest.mark.parametrize("tool", TOOLS)
def test_no_tool_takes_an_abbreviated_flag(tool, monkeypatch):
    """Every parser the tool builds (subcommands too) is made with allow_abbrev=False: `--model`
    can never be read as the start of some `--models`."""
    parsers = [p for p in parsers_of(tool, monkeypatch) if p.prog.startswith(f"python -m tools.{tool}")]
    assert parsers and all(p.allow_abbrev is False for p in parsers), [(p.prog, p.allow_abbrev) for p in parsers]


@pytest.mark.parametrize("tool", TOOLS)
def test_no_tool_writes_outside_outputs_by_default(tool, monkeypatch):
    """A default output path lies under outputs/ (git ignores it), so a tool run from a clone leaves
    no untracked files beside the code."""
    defaults = {(p.prog, a.dest): a.default for p in parsers_of(tool, monkeypatch) for a in p._actions
                if a.dest in ("out", "out_dir", "output", "output_dir") and a.default is not None}
    # the one exception: the screenshot tool's job is to refresh the docs' own tracked images
    docs_images = {("python -m tools.maintainers.ui_screenshots", "out")}
    assert all(str(d).startswith("outputs/") for k, d in defaults.items() if k not in docs_images), defaults


def test_toy_propagation_writes_under_outputs_by_default(tmp_path, monkeypatch):
    from tokenflow.media.sample_clip import make_sample_clip
    from tools import toy_propagation

    clip = make_sample_clip(tmp_path / "clip.mp4", frames=6, size=64)
    monkeypatch.chdir(tmp_path)
    assert toy_propagation.main(["--video", str(clip), "--frames", "6", "--size", "64", "--interval", "3"]) == 0
    assert (tmp_path / "outputs" / "toy_propagation" / "clip" / "warp_error.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4", "outputs"]


def test_bench_does_not_read_model_as_models():
    res = python_m("tools.maintainers.bench", "--model", "tiny", "--parts", "none")  # no rows, no --e2e: just the report head
    assert res.returncode == 0, res.stderr
    res = python_m("tools.maintainers.bench", "--mod", "tiny")
    assert res.returncode == 2 and "unrecognized arguments: --mod" in res.stderr


@pytest.mark.parametrize("args", [
    ["tools.memory_estimate", "--model", "tiny", "--frames", "8"],
    ["tools.figures", "nnfield", "--model", "tiny", "--help"],
    ["tools.table1", "--model", "tiny", "--help"],
])
def test_model_tiny_is_accepted(args):
    res = python_m(*args)
    assert res.returncode == 0, res.stderr


def test_clip_score_names_its_weights_clip_model():
    res = python_m("tools.clip_score", "--video", "x.mp4", "--prompt", "a wolf", "--model", "tiny")
    assert res.returncode == 2 and "unrecognized arguments: --model tiny" in res.stderr


def test_memory_estimate_defaults_to_the_models_native_size(capsys):
    from tools import memory_estimate

    assert memory_estimate.main(["--model", "tiny", "--frames", "8"]) == 0
    assert "128x128" in capsys.readouterr().out


def test_warp_error_needs_run_or_source_and_edited(tmp_path):
    res = python_m("tools.warp_error", "--source", "a.mp4")
    assert res.returncode == 2 and "--source and --edited go together" in res.stderr
    res = python_m("tools.warp_error")
    assert res.returncode == 2 and "either --run RUN_DIR, or --source and --edited" in res.stderr
    res = python_m("tools.warp_error", "--run", str(tmp_path))
    assert res.returncode == 2 and "no config.yaml" in res.stderr


def test_a_runs_config_is_read_back_literally_by_the_tools(tmp_path, capsys):
    """A prompt that looks like an OmegaConf interpolation is text: the run edits with it, and the
    tools that read the run's config.yaml get the same text back instead of failing to resolve it."""
    from tokenflow.config import load_config, read_run_config
    from tokenflow.pipeline import run_edit
    from tools import table1

    prompt = "a ${oops} wolf, ${hydra:runtime.cwd} and $5"
    cfg = load_config(["model=tiny", "size=64", "steps=1", "inversion.steps=2", "frames.max=2", "progress=false",
                       f"inversion.cache_dir={tmp_path / 'cache'}", f"prompt={prompt}"])
    run_edit(cfg, tmp_path / "run")
    assert read_run_config(tmp_path / "run") == cfg and read_run_config(tmp_path / "run" / "config.yaml").prompt == prompt
    assert table1.read_run_config(tmp_path / "run").prompt == prompt
    assert warp_error.main(["--run", str(tmp_path / "run")]) == 0
    assert "mean warp error" in capsys.readouterr().out


def moving_square(n=6, h=96, w=160, step=3):
    frames = np.full((n, h, w, 3), 40, np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    texture = ((xx // 4 + yy // 4) % 2 * 150 + 60).astype(np.uint8)
    for t in range(n):
        x0 = 30 + step * t
        frames[t, 30:70, x0:x0 + 40] = texture[30:70, 30:70, None]
    return frames


def test_warp_error_measures_a_smaller_edit_against_the_source_fitted_to_it(tmp_path, capsys):
    """An edit at another size (a run's size=) is compared with the source resized and cropped as the
    pipeline would: the source itself, shrunk that way, scores as a perfect edit would."""
    from tokenflow.media import fit_to_size, read_video

    source = write_video(tmp_path / "source.mp4", torch.from_numpy(moving_square()), 10)
    small = fit_to_size(read_video(source), 64)  # what a size=64 run reads: [96, 160] -> [64, 106] -> cropped to [64, 64]
    edit = write_video(tmp_path / "edit.mp4", small.frames, 10)
    assert warp_error.main(["--source", str(source), "--edited", str(edit)]) == 0
    out = capsys.readouterr().out
    assert "note: the source is [96, 160] and the edit [64, 64] ([H, W])" in out
    direct = warp_error.warp_error(small.frames.numpy(), read_video(edit).frames.numpy()).mean
    assert f"mean warp error: {direct:.3f}" in out


@pytest.fixture(scope="module")
def readme_examples():
    """The README's weight-free tool examples: the bash block that follows 'These run without any weights'."""
    text = (REPO / "README.md").read_text()
    block = text.split("These run without any weights", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [line.strip() for line in block.strip().splitlines() if line.strip()]


def test_readme_examples_that_need_no_weights_run_as_written(tmp_path, readme_examples):
    """Run from the root of a copy of the repository (the tools run from a clone; outputs land in the
    copy, not in the checkout), as a newcomer would after the README's set-up commands."""
    assert any(line.startswith("tokenflow model=tiny") for line in readme_examples)
    assert any("warp_error --run" in line for line in readme_examples)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENFLOW_CACHE=str(tmp_path / "cache"))
    tokenflow = shutil.which("tokenflow")
    tmp_path = copy_of_the_clone(tmp_path / "clone")
    before = {p for p in tmp_path.rglob("*") if p.is_file()}
    for line in readme_examples:
        argv = shlex.split(line)
        argv = [tokenflow, *argv[1:]] if argv[0] == "tokenflow" else [sys.executable, *argv[1:]]
        res = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
        assert res.returncode == 0, f"{line}\n{res.stderr[-3000:]}"
        if "warp_error --run" in line:
            assert re.search(r"mean warp error: \d+\.\d+ x1e-3", res.stdout)
            assert "model=tiny (random weights)" in res.stdout
    assert (tmp_path / "outputs" / "tiny" / "edited.mp4").is_file()
    assert (tmp_path / "outputs" / "fig3_tiny.png").is_file()
    # what the commands wrote lies under outputs/ (ignored by git): the checkout gains no untracked file
    new = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file() and p not in before
                 and "__pycache__" not in p.parts)
    assert new and all(name.startswith("outputs/") for name in new), new


def test_tool_overrides_read_prompts_and_keys_as_the_tokenflow_command():
    from test_cli import PROMPTS
    from tokenflow.config import load_config
    from tools.run_config import add_run_flags, flag_overrides, quote

    parser = argparse.ArgumentParser(allow_abbrev=False)
    add_run_flags(parser)
    for text in PROMPTS.values():
        args = parser.parse_args(["--model", "tiny", f"prompt={text}", f"negative_prompt={text}"])
        cfg = load_config(flag_overrides(args))
        assert cfg.prompt == cfg.negative_prompt == text and cfg.model.name == "tiny" and cfg.model.source == "random"
        assert load_config([f"video={quote(text)}"]).video == text  # the figures' --video quoting
    with pytest.raises(ValueError, match=r"did you mean prompt\?"):
        flag_overrides(parser.parse_args(["+promt=a cat"]))
    assert load_config(flag_overrides(parser.parse_args(["--size", "full"]))).size == "full"
    # a weights source that is not a preset's name is model.source=, quoted whatever it holds
    folder = "my weights/sd 2,1"
    assert load_config(flag_overrides(parser.parse_args(["--model", folder]))).model.source == folder
