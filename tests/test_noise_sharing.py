"""tools.noise_sharing on a tiny clip: shared noise keeps the noisy versions, the maps and the edit
about as close from frame to frame as the source, per-frame noise does not; a 1-frame clip is refused."""

import pytest

from tests.media_clips import patches, write_clip
from tools import noise_sharing


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_clip(tmp_path_factory.mktemp("clip") / "clip.mp4", patches(3, 64, 64), fps=10)


def test_shared_noise_changes_less_from_frame_to_frame(clip, capsys):
    assert noise_sharing.main(["--video", str(clip), "--model", "tiny", "--size", "64", "--steps", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("| inversion.shared_noise |") and [line.split("|")[1].strip() for line in lines[2:]] == ["true", "false"]
    shared, own = ([float(c) for c in line.strip("|").split("|")[1:]] for line in lines[2:])
    # independent unit-variance draws differ by sqrt(2) in RMS; the shared ones only as the video moves
    assert own[1] == pytest.approx(2**0.5, abs=0.15) and shared[1] < 0.3
    assert shared[0] < 2 < 5 < own[0]  # x_t: sqrt(1 - a_t) e_t dominates the source's own change
    assert shared[2] < own[2]


def test_temporal_rms():
    import torch

    x = torch.zeros(3, 2)
    x[1] = 1.0  # differences 1, -1 over 2 pairs x 2 values: RMS 1
    assert noise_sharing.temporal_rms(x) == pytest.approx(1.0)
    assert noise_sharing.temporal_rms(torch.ones(4, 5)) == 0.0


def test_one_frame_is_refused(clip, capsys):
    assert noise_sharing.main(["--video", str(clip), "--model", "tiny", "--size", "64", "--steps", "2", "--max-frames", "1"]) == 2
    assert "at least 2 frames" in capsys.readouterr().err
