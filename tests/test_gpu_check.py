"""tools.maintainers.gpu_check's code paths on the CPU with tiny configs (so its first GPU run does not break on
a typo): every section runs (edit stages, UNet vs diffusers, keyframe pass vs memory_estimate, and
both again under torch.compile, traced with the eager backend) and lands in the Markdown table."""

from pathlib import Path

import pytest

from tools import gpu_check

WOLF = Path(__file__).resolve().parents[2] / "shared" / "data" / "wolf.mp4"
TINY = ["--device", "cpu", "--model", "tiny", "--dtype", "float32", "--frames", "4", "--size", "64", "--steps", "1",
        "--inversion-steps", "1", "--batches", "3", "--keyframes", "2", "--repeats", "1", "--compile-backend", "eager",
        "--budget-s", "100000"]


def test_every_section_runs_on_the_cpu_with_tiny_configs(tmp_path, capsys):
    if not WOLF.is_file():
        pytest.skip(f"{WOLF} not present (the real sample clips live beside the repository)")
    assert gpu_check.main([*TINY, "--video", str(WOLF), "--markdown", str(tmp_path / "gpu.md")]) == 0
    table = (tmp_path / "gpu.md").read_text()
    assert table in capsys.readouterr().out
    for row in ("| read video |", "| DDIM inversion |", "| TokenFlow edit (PnP) |", "| VAE decode |", "| write mp4 |",
                "| unet vs diffusers | batch 3", "| unet vs diffusers (torch.compile) | batch 3",
                "| keyframe pass (2 keyframes) |", "| keyframe pass (2 keyframes) (torch.compile) |"):
        assert row in table, row
    assert "FAILED" not in table and "skipped" not in table
    assert "memory_estimate" in table and "ratio" in table


def test_refuses_cuda_without_a_gpu_and_a_missing_video(tmp_path, capsys):
    import torch

    if not torch.cuda.is_available():
        assert gpu_check.main(["--video", str(WOLF)]) == 2
        assert "no CUDA device" in capsys.readouterr().err
    assert gpu_check.main([*TINY, "--video", str(tmp_path / "none.mp4")]) == 2
    assert "none.mp4: no such video" in capsys.readouterr().err
