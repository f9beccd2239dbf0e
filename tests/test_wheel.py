"""The package as a user installs it: a wheel built from the clone, installed into a fresh virtual
environment, runs an edit from a folder outside the repository (so nothing of the clone is on the path)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from repo_copy import copy_of_the_clone

REPO = Path(__file__).resolve().parents[1]
PRODUCT = {"unet", "vae", "clip_text", "sampler", "tokenflow"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from the clone's files as git sees them (a clean clone: no build/ of earlier builds)."""
    clone = copy_of_the_clone(tmp_path_factory.mktemp("clone"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(clone), "--no-deps", "--no-build-isolation", "-q", "-w", str(out)],
                   check=True, cwd=out)
    (found,) = out.glob("*.whl")
    return found


def test_wheel_holds_the_product_and_its_settings_only(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == PRODUCT  # no top-level tools/ or conf/ to shadow other projects' packages
    for needed in ("tokenflow/conf/config.yaml", "tokenflow/conf/experiment/paper.yaml", "tokenflow/conf/controlnet/sd15_depth.yaml",
                   "tokenflow/media/reading.py",
                   "tokenflow/models/presets.py"):
        assert needed in names


def test_wheel_in_a_fresh_venv_runs_an_edit_outside_the_clone(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    # the CPU build first, so the wheel's torch>=2.1 is satisfied without the CUDA build
    subprocess.run([*pip, "torch==2.13.0"], check=True)
    subprocess.run([*pip, str(wheel)], check=True)
    subprocess.run([*pip, "--no-deps", "open_clip_torch"], check=True)  # the CLIP BPE vocabulary
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TOKENFLOW_CACHE"] = str(tmp_path / "cache")
    res = subprocess.run([str(venv / "bin" / "tokenflow"), "model=tiny", "frames.max=2", "steps=2", "inversion.steps=2",
                          "hydra.run.dir=run", "progress=false"], cwd=work, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    run = json.loads((work / "run" / "run.json").read_text())
    assert run["frames"] == 2 and (work / "run" / "edited.mp4").stat().st_size > 0
    # the installed package is the one that ran, not the clone
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import tokenflow; print(tokenflow.__file__)"],
                           cwd=work, env=env, capture_output=True, text=True, check=True).stdout
    assert str(venv) in where and str(REPO) not in where
