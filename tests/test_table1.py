"""tools.table1 on the tiny random model: six method rows (the paper's five and the released propagation rule) with numeric warp errors, CLIP scores from a
tiny saved CLIP checkpoint (or n/a, said once), per-pair rows in the CSV, and bad input refused
before anything runs. Random weights: no ordering between methods is asserted."""

import csv
import json
import math

import numpy as np
import pytest
import torch

from fixtures_sd import isolate_hub_cache
from tokenflow.media.sample_clip import make_sample_clip
from tools.clip_score import CLIP_MEAN, CLIP_STD
from tools import table1 as table1_module
from tools.table1 import (CSV_COLUMNS, METHODS, MODES, RANDOM_WEIGHTS_NOTE, Pair, main, parse_pair, read_pairs_file,
                          source_frames)

TINY = ["--model", "tiny", "--size", "64", "--steps", "2", "inversion.steps=4"]


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    # the default CLIP id must fail fast, from an empty cache of the test's own (the environment
    # variables reach the runs in fresh processes too)
    isolate_hub_cache(monkeypatch, tmp_path / "hf")


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clips")
    return (make_sample_clip(folder / "a.mp4", frames=4, size=64, seed=0),
            make_sample_clip(folder / "b.mp4", frames=5, size=64, seed=1))


@pytest.fixture(scope="module")
def tiny_clip_folder(tmp_path_factory):
    """A transformers CLIPModel with random weights, saved as a local CLIP folder (reference writer)."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    tower = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2, hidden_act="quick_gelu")
    cfg = CLIPConfig(text_config=dict(vocab_size=49408, max_position_embeddings=77, **tower),
                     vision_config=dict(image_size=32, patch_size=8, **tower), projection_dim=16)
    folder = tmp_path_factory.mktemp("clip")
    CLIPModel(cfg).eval().save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32},
        "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
    }))
    return folder


def read_csv(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], [dict(zip(rows[0], r)) for r in rows[1:]]


def test_two_pairs_every_method_with_clip(tmp_path, clips, tiny_clip_folder, capsys):
    out = tmp_path / "table"
    pairs_file = tmp_path / "pairs.txt"
    pairs_file.write_text(f"# a comment\n\n{clips[1]}::a snowy winter scene\n")
    code = main(["--pairs", f"{clips[0]}::a watercolor painting", "--pairs-file", str(pairs_file), "--out-dir", str(out),
                 "--clip-model", str(tiny_clip_folder), *TINY, f"inversion.cache_dir={tmp_path / 'cache'}"])
    printed = capsys.readouterr().out
    assert code == 0
    assert f"wrote {out / 'table1.md'}" in printed and f"wrote {out / 'table1.csv'}" in printed

    header, rows = read_csv(out / "table1.csv")
    assert tuple(header) == CSV_COLUMNS
    means = [r for r in rows if r["scope"] == "mean"]
    per_pair = [r for r in rows if r["scope"] == "pair"]
    assert [r["method"] for r in means] == list(MODES)
    assert len(per_pair) == 2 * len(MODES) and {r["pair"] for r in per_pair} == {"0", "1"}
    for r in rows:
        assert not r["error"]
        warp, clip = float(r["warp_error_x1e-3"]), float(r["clip_score"])
        assert math.isfinite(warp) and warp >= 0
        assert -1 <= clip <= 1
        assert float(r["peak_memory_mb"]) > 0 and r["memory_kind"] == "cpu_rss"
        assert float(r["sec_per_frame_total"]) > 0
        assert (r["sec_per_frame_editing"] == "n/a") == (r["method"] == "reconstruction")
    for m in means:  # a mean row is the mean of its two pair rows
        mine = [float(r["warp_error_x1e-3"]) for r in per_pair if r["method"] == m["method"]]
        assert float(m["warp_error_x1e-3"]) == pytest.approx(np.mean(mine), abs=1e-5) and m["pairs"] == "2"

    md = (out / "table1.md").read_text()
    table_lines = [line for line in md.splitlines() if line.startswith("| ")]
    assert len(table_lines) == 1 + len(METHODS)  # header + one row per method
    for _, label, paper_warp, paper_clip in METHODS:
        paper = " | ".join("-" if v is None else str(v) for v in (paper_warp, paper_clip))
        assert any(line.startswith(f"| {label} |") and line.endswith(f"| {paper} |") for line in table_lines)
    # the edited video of every run is there, and its source is the pipeline's (resized) source
    run = json.loads((out / "pair01_b" / "tokenflow" / "run.json").read_text())
    assert run["frames"] == 5 and run["size"] == [64, 64]


def test_without_clip_weights_scores_are_na_and_said_once(tmp_path, clips, capsys):
    out = tmp_path / "table"
    code = main(["--pairs", f"{clips[0]}::a watercolor painting", "--out-dir", str(out), "--in-process",
                 *TINY, f"inversion.cache_dir={tmp_path / 'cache'}"])
    printed = capsys.readouterr().out
    assert code == 0
    assert printed.count("CLIP score skipped:") == 1
    _, rows = read_csv(out / "table1.csv")
    assert len(rows) == 2 * len(MODES)
    assert all(r["clip_score"] == "n/a" for r in rows)
    assert all(float(r["warp_error_x1e-3"]) >= 0 for r in rows)


def test_bad_input_is_refused_before_running(tmp_path, clips, capsys):
    out = tmp_path / "table"
    assert main(["--pairs", f"{clips[0]}::x", "--out-dir", str(out), *TINY, "no_such_key=1", "--no-clip"]) == 2
    assert "no_such_key" in capsys.readouterr().err
    assert not any(out.glob("pair*"))
    assert main(["--out-dir", str(out), *TINY]) == 2
    assert "no (video, prompt) pairs" in capsys.readouterr().err
    assert main(["--pairs", f"{clips[0]}::x", "--methods", "tokenflow,magic", "--out-dir", str(out), *TINY]) == 2
    assert "unknown methods ['magic']" in capsys.readouterr().err


def test_a_failing_pair_is_a_row_with_its_error_and_the_table_is_still_written(tmp_path, clips, capsys, monkeypatch):
    real_run_one = table1_module.run_one

    def run_one(cfg, run_dir, **kwargs):  # pair 0's runs fail as a run fails mid-way (out of memory, ...)
        if "pair00" in str(run_dir):
            return "RuntimeError: injected failure of pair 0"
        return real_run_one(cfg, run_dir, **kwargs)

    monkeypatch.setattr(table1_module, "run_one", run_one)
    out = tmp_path / "table"
    code = main(["--pairs", f"{clips[1]}::x", "--pairs", f"{clips[0]}::a watercolor painting", "--out-dir", str(out),
                 "--in-process", "--no-clip", "--methods", "reconstruction,per_frame", *TINY,
                 f"inversion.cache_dir={tmp_path / 'cache'}"])
    assert code == 1  # some cells failed; the rest is scored
    _, rows = read_csv(out / "table1.csv")
    per_pair = {(r["pair"], r["method"]): r for r in rows if r["pair"] != "all"}
    assert "injected" in per_pair["0", "per_frame"]["error"] and per_pair["0", "per_frame"]["warp_error_x1e-3"] == "n/a"
    assert not per_pair["1", "per_frame"]["error"] and float(per_pair["1", "per_frame"]["warp_error_x1e-3"]) >= 0
    means = {r["method"]: r for r in rows if r["pair"] == "all"}
    assert means["per_frame"]["pairs"] == "1" and "1 of 2 pairs failed" in means["per_frame"]["error"]
    assert "failed" in capsys.readouterr().err
    assert RANDOM_WEIGHTS_NOTE in (out / "table1.md").read_text()  # the tiny model's numbers say what they are


def test_a_missing_or_unreadable_clip_is_refused_before_any_run(tmp_path, clips, capsys, monkeypatch):
    def no_runs(*args, **kwargs):
        raise AssertionError("a run started although an input was bad")

    monkeypatch.setattr(table1_module, "run_one", no_runs)
    not_a_video = tmp_path / "notes.mp4"
    not_a_video.write_text("not a video")
    out = tmp_path / "table"
    code = main(["--pairs", f"{clips[0]}::a watercolor painting", "--pairs", f"{tmp_path / 'missing.mp4'}::x",
                 "--pairs", f"{not_a_video}::y", "--out-dir", str(out), "--no-clip", *TINY])
    assert code == 2
    err = capsys.readouterr().err
    assert "nothing was run" in err and "pair 1" in err and "missing.mp4" in err and "pair 2" in err and "notes.mp4" in err
    assert not any(out.glob("pair*"))


def test_pairs_parsing(tmp_path):
    assert parse_pair("sample::a red car :: at night") == Pair("sample", "a red car :: at night")
    with pytest.raises(ValueError, match="not VIDEO::PROMPT"):
        parse_pair("clip.mp4 a red car")
    with pytest.raises(ValueError, match="empty prompt"):
        parse_pair("clip.mp4:: ")
    bad = tmp_path / "pairs.txt"
    bad.write_text("# header\nsample::ok\nbroken line\n")
    with pytest.raises(ValueError, match=r"pairs.txt:3: pair 'broken line'"):
        read_pairs_file(bad)
    with pytest.raises(FileNotFoundError, match="pairs file not found"):
        read_pairs_file(tmp_path / "none.txt")


def test_source_frames_are_the_pipelines(tmp_path, clips):
    """Warp error's flow runs on the source as the pipeline resized it, not on the file's own size."""
    from tools.table1 import run_config

    cfg = run_config(Pair(str(clips[1]), "x"), "tokenflow", ["model=tiny", "size=128"])
    frames = source_frames(cfg)
    assert frames.shape == (5, 128, 128, 3) and frames.dtype == np.uint8
