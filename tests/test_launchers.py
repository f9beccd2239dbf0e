"""Sweeps on Hydra's launchers (the .[cluster] extra): a two-job sweep on hydra/launcher=joblib runs
both jobs at once (their run facts' start and end times overlap), both inverting the same clip into
one cache, and writes the same frames as the basic launcher, which runs them one after the other;
hydra/launcher=submitit_local runs a two-job sweep; `${mod:...}` (the per-job GPU recipe) resolves."""

import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("hydra_plugins.hydra_joblib_launcher", reason="the .[cluster] extra (pip install -e '.[cluster]')")
pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="the .[cluster] extra (pip install -e '.[cluster]')")

SWEEP = ["video=sample", "model=tiny", "frames.max=6", "size=64", "steps=2", "inversion.steps=4", "device=cpu",
         "progress=false", "output.side_by_side=false", "output.png_frames=true",
         "tokenflow.weighting=sigmoid,linear", "seed='${mod:${hydra:job.num},7}'"]  # the per-job GPU recipe's resolver, on the seed


def sweep(tmp_path: Path, name: str, *launcher: str, timeout: int = 600) -> list[Path]:
    """Run the two-job sweep into tmp_path/name -> the two job folders (by job number)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENFLOW_CACHE=str(tmp_path / "sample"))
    cmd = [sys.executable, "-m", "tokenflow.cli", "-m", *SWEEP, *launcher, f"hydra.sweep.dir={tmp_path / name}",
           f"inversion.cache_dir={tmp_path / name / 'cache'}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [tmp_path / name / str(job) for job in (0, 1)]


def frames(run: Path) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.open(p)) for p in sorted((run / "frames").glob("*.png"))])


def seed_of(run: Path) -> int:
    return int(next(line.split(":")[1] for line in (run / "config.yaml").read_text().splitlines() if line.startswith("seed:")))


def span(run: Path) -> tuple[datetime, datetime]:
    facts = json.loads((run / "run.json").read_text())
    return datetime.fromisoformat(facts["started"]), datetime.fromisoformat(facts["finished"])


def test_joblib_runs_both_jobs_at_once_with_the_basic_launchers_outputs(tmp_path):
    parallel = sweep(tmp_path, "joblib", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2")
    (a0, a1), (b0, b1) = span(parallel[0]), span(parallel[1])
    assert a0 < b1 and b0 < a1, f"the jobs ran one after the other: {a0}-{a1} and {b0}-{b1}"
    # both inverted the same clip into one cache: each frame is there once
    cached = [p.name for p in (tmp_path / "joblib" / "cache").rglob("frame_*")]
    assert sorted(cached) == [f"frame_{i:05d}.safetensors" for i in range(6)]
    serial = sweep(tmp_path, "basic")
    (c0, c1), (d0, d1) = span(serial[0]), span(serial[1])
    assert c1 <= d0  # the basic launcher: one after the other
    for p, s in zip(parallel, serial):
        assert frames(p).shape == (6, 64, 64, 3)
        assert np.array_equal(frames(p), frames(s))
    assert not np.array_equal(frames(parallel[0]), frames(parallel[1]))  # two different runs
    assert [seed_of(r) for r in parallel + serial] == [0, 1, 0, 1]  # ${mod:${hydra:job.num},7} in each job


def test_submitit_local_runs_a_two_job_sweep(tmp_path):
    runs = sweep(tmp_path, "submitit", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10")
    for run in runs:
        facts = json.loads((run / "run.json").read_text())
        assert facts["frames"] == 6 and (run / "edited.mp4").is_file()
    assert [seed_of(r) for r in runs] == [0, 1]


def test_mod_resolver_spreads_job_numbers_over_gpus():
    from omegaconf import OmegaConf

    import tokenflow.cli  # noqa: F401  registers the resolver

    cfg = OmegaConf.create({"n": 5, "device": "cuda:${mod:${n},4}"})
    assert cfg.device == "cuda:1"


def test_table1_runs_its_cells_as_a_joblib_sweep_and_collects_the_folder(tmp_path, monkeypatch, capsys):
    import csv

    from tools.table1 import main

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("TOKENFLOW_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "t1"
    prompt = "a watercolor painting, it's ${not} interpolated"
    args = ["--pairs", f"sample::{prompt}", "--methods", "reconstruction,per_frame", "--no-clip", "--out-dir", str(out),
            "--model", "tiny", "--size", "64", "--steps", "2", "--max-frames", "4", "inversion.steps=4", "device=cpu",
            "negative_prompt=blurry, it's low res"]  # a prompt override, as typed: reaches the jobs unquoted
    assert main([*args, "--sweep", "joblib", "--launcher-arg", "hydra.launcher.n_jobs=2"]) == 0
    jobs = sorted(p.name for p in (out / "multirun").iterdir() if p.is_dir() and not p.name.startswith("."))
    assert jobs == ["0", "1"]
    import yaml

    for job in jobs:
        assert yaml.safe_load((out / "multirun" / job / "config.yaml").read_text())["negative_prompt"] == "blurry, it's low res"

    def cells():
        with open(out / "table1.csv") as f:
            return {(r["scope"], r["method"]): r for r in csv.DictReader(f)}

    first = cells()
    for method in ("reconstruction", "per_frame"):
        row = first["pair", method]
        assert row["error"] == "" and row["prompt"] == prompt and float(row["warp_error_x1e-3"]) > 0
    # collecting the finished folder again gives the same table
    assert main(["--collect", str(out / "multirun"), "--out-dir", str(tmp_path / "again"), "--no-clip"]) == 0
    with open(tmp_path / "again" / "table1.csv") as f:
        again = {(r["scope"], r["method"]): r for r in csv.DictReader(f)}
    for key in (("pair", "reconstruction"), ("pair", "per_frame")):
        assert again[key]["warp_error_x1e-3"] == first[key]["warp_error_x1e-3"]
    assert main(["--collect", str(tmp_path / "again"), "--out-dir", str(tmp_path / "x")]) == 2  # no job folders: a clear error
    assert "no job folders" in capsys.readouterr().err
