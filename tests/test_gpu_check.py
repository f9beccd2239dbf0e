"""tools.maintainers.gpu_check's code paths on the CPU with tiny configs (so its first GPU run does not
break on a typo): every section runs (the product's run_edit on a random model, UNet vs diffusers,
keyframe pass vs memory_estimate, and both again under torch.compile, traced with the eager backend)
and lands in the Markdown table."""

import pytest

from tools.maintainers import gpu_check

TINY = ["--device", "cpu", "--model", "tiny", "--dtype", "float32", "--frames", "4", "--size", "64", "--steps", "1",
        "--inversion-steps", "1", "--batches", "3", "--keyframes", "2", "--repeats", "1", "--compile-backend", "eager",
        "--budget-s", "100000"]


def test_every_section_runs_on_the_cpu_with_tiny_configs(tmp_path, capsys, monkeypatch):
    import tokenflow.pipeline

    facts = []
    real_run_edit = tokenflow.pipeline.run_edit

    def run_edit(cfg, out_dir):  # the product's own run, watched: its settings and its facts
        facts.append((cfg, real_run_edit(cfg, out_dir)))
        return facts[-1][1]

    monkeypatch.setattr(tokenflow.pipeline, "run_edit", run_edit)
    assert gpu_check.main([*TINY, "--markdown", str(tmp_path / "gpu.md")]) == 0  # --video sample: nothing from outside
    table = (tmp_path / "gpu.md").read_text()
    assert table in capsys.readouterr().out
    for row in ("| read video |", "| build random models |", "| VAE encode |", "| encode prompts |", "| DDIM inversion |",
                "| TokenFlow edit (PnP) |", "| VAE decode |", "| write mp4 |",
                "| unet vs diffusers | batch 3", "| unet vs diffusers (torch.compile) | batch 3",
                "| keyframe pass (2 keyframes) |", "| keyframe pass (2 keyframes) (torch.compile) |"):
        assert row in table, row
    assert "FAILED" not in table and "skipped" not in table
    assert "memory_estimate" in table and "ratio" in table
    # section 1 is one run of the product on random weights, with the check's settings
    [(cfg, run)] = facts
    assert (cfg.model.name, cfg.model.source, cfg.device, cfg.dtype) == ("tiny", "random", "cpu", "float32")
    assert (cfg.steps, cfg.inversion.steps, cfg.inversion.cache, cfg.tokenflow.mode) == (1, 1, False, "tokenflow")
    assert run.frames == 4 and run.size == [64, 64]
    edit_row = next(line for line in table.splitlines() if line.startswith("| edit") and "| DDIM inversion |" in line)
    assert float(edit_row.split("|")[3]) == pytest.approx(run.timings_s["inversion"], abs=1e-3)


def test_refuses_cuda_without_a_gpu_and_a_missing_video(tmp_path, capsys):
    import torch

    if not torch.cuda.is_available():
        assert gpu_check.main([]) == 2
        assert "no CUDA device" in capsys.readouterr().err
    assert gpu_check.main([*TINY, "--video", str(tmp_path / "none.mp4")]) == 2
    assert "none.mp4: no such video" in capsys.readouterr().err


def test_each_edit_option_runs_the_product_once_with_its_overrides(tmp_path, monkeypatch):
    import tokenflow.pipeline

    seen = []
    real_run_edit = tokenflow.pipeline.run_edit

    def run_edit(cfg, out_dir):
        seen.append(cfg)
        return real_run_edit(cfg, out_dir)

    monkeypatch.setattr(tokenflow.pipeline, "run_edit", run_edit)
    args = [*TINY, "--sections", "edit", "--edit", "perframe=tokenflow.mode=per_frame", "--edit", "two=steps=2 seed=3 inversion.method=ddpm",
            "--markdown", str(tmp_path / "gpu.md")]
    assert gpu_check.main(args) == 0
    assert [(c.tokenflow.mode, c.steps, c.seed, c.inversion.method) for c in seen] == [
        ("per_frame", 1, 0, "ddim"), ("tokenflow", 2, 3, "ddpm")]
    table = (tmp_path / "gpu.md").read_text()
    assert "| edit perframe (4 frames" in table and "| edit two (4 frames" in table
    assert "unet_frame_forwards 4" in table  # per_frame, 1 step, 4 frames: run.json's count in the total row
    assert "| edit two (4 frames 64x64 float32) | DDPM inversion | " in table


def test_a_malformed_edit_option_is_one_line(capsys):
    with pytest.raises(SystemExit):
        gpu_check.main([*TINY, "--edit", "nothing"])
    assert "--edit takes NAME=OVERRIDES" in capsys.readouterr().err
