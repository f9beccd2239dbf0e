"""Rotation: a clip whose display matrix says it is shown turned is edited upright and written
upright (issue 13, case 2). Each clip is stored turned, with the display matrix that turns it back,
beside a pre-rotated copy stored upright without one: both must read, and edit, the same."""

import json

import av
import numpy as np
import pytest
import torch

from media_clips import patches, run_config, write_clip
from tokenflow.media import read_video
from tokenflow.pipeline import run_edit

UPRIGHT = patches(4, 128, 64)  # portrait: 64 wide, 128 tall, as a phone held upright films
UPRIGHT_RGB = torch.from_numpy(UPRIGHT).float()


def stored_turned(tmp_path, degrees):
    """The clip a camera writes: pictures turned by -degrees, and a display matrix of +degrees
    (counter-clockwise; a phone's portrait clip is -90, the `rotate=90` tag)."""
    stored = np.rot90(UPRIGHT, k=-degrees // 90, axes=(1, 2))
    return write_clip(tmp_path / f"turned{degrees}.mp4", np.ascontiguousarray(stored), rotation=degrees)


@pytest.mark.parametrize("degrees", [-90, 90, 180])
def test_rotated_clip_reads_upright_like_a_prerotated_copy(tmp_path, degrees):
    turned = read_video(stored_turned(tmp_path, degrees))
    copy = read_video(write_clip(tmp_path / "upright.mp4", UPRIGHT))
    assert turned.frames.shape == copy.frames.shape == (4, 128, 64, 3)
    assert (turned.frames.float() - copy.frames.float()).abs().mean() < 4  # the same picture, up to the codec
    assert (turned.frames.float() - UPRIGHT_RGB).abs().mean() < 4
    upside_down = UPRIGHT_RGB.flip(1, 2)
    assert (turned.frames.float() - upside_down).abs().mean() > 20  # what a wrong turn would give
    assert turned.source.rotation == degrees % 360 and copy.source.rotation == 0
    assert any("rotated" in n for n in turned.notes) and not any("rotated" in n for n in copy.notes)


def test_rotated_clip_is_edited_and_written_upright(tmp_path):
    runs = {}
    for name, clip in (("turned", stored_turned(tmp_path, -90)), ("copy", write_clip(tmp_path / "upright.mp4", UPRIGHT))):
        out = tmp_path / name
        run_edit(run_config(tmp_path, f"video={clip}", "tokenflow.mode=reconstruction"), out)
        runs[name] = out
    for name, out in runs.items():
        with av.open(str(out / "edited.mp4")) as container:
            first = next(container.decode(video=0))
            assert (first.width, first.height) == (64, 128) and first.rotation == 0  # stored upright, no matrix
        sbs = read_video(out / "side_by_side.mp4")
        assert (sbs.frames[:, :, :64].float() - UPRIGHT_RGB).abs().mean() < 4  # the source half is the upright picture
    edited = {name: read_video(out / "edited.mp4").frames.float() for name, out in runs.items()}
    # the edit of the turned clip is the upright copy's (the random tiny VAE magnifies the codec's
    # differences), far closer to it than to the same picture upside down
    same = (edited["turned"] - edited["copy"]).abs().mean()
    assert same < (edited["turned"] - edited["copy"].flip(1, 2)).abs().mean() / 2
    facts = json.loads((runs["turned"] / "run.json").read_text())
    assert facts["source"]["rotation"] == 270 and facts["size"] == [128, 64]
