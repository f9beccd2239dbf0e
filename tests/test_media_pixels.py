"""10-bit and other pixel formats decode to 8-bit RGB correctly, and the run facts say so once
(issue 13, case 4). Each clip is encoded from known 8-bit RGB frames; decoding must give those
colours back within a few levels (reading 10-bit samples as 8-bit ones gives green/purple frames)."""

import json

import pytest
import torch

from media_clips import patches, run_config, write_clip
from tokenflow.media import read_video
from tokenflow.pipeline import run_edit

ORIGINAL = patches(3, 64, 64)
CASES = {  # pixel format: (codec, container)
    "yuv420p10le": ("libx264", "mp4"),  # 10-bit, as phones record HDR/HLG
    "yuv444p": ("libx264", "mp4"),  # full-resolution chroma
    "yuvj420p": ("libx264", "mp4"),  # full (0..255) range
    "rgba": ("png", "mov"),  # RGB with alpha
}


def block_colours(frames: torch.Tensor) -> torch.Tensor:
    """[F, 4, 4, 3]: the mean colour of the middle 8x8 of each 16x16 block (4:2:0 chroma blurs the
    blocks' edges: that is the format, not the decoding)."""
    blocks = frames.float().reshape(frames.shape[0], 4, 16, 4, 16, 3)
    return blocks[:, :, 4:12, :, 4:12].mean(dim=(2, 4))


@pytest.mark.parametrize("pix_fmt", list(CASES))
def test_pixel_format_decodes_to_the_8bit_colours(tmp_path, pix_fmt):
    codec, container = CASES[pix_fmt]
    clip = write_clip(tmp_path / f"clip.{container}", ORIGINAL, codec=codec, pix_fmt=pix_fmt, options={"crf": "12"} if codec == "libx264" else None)
    video = read_video(clip)
    assert video.source.pixel_format == pix_fmt
    decoded, original = block_colours(video.frames), block_colours(torch.from_numpy(ORIGINAL))
    assert (decoded - original).abs().max() <= 3, (pix_fmt, (decoded - original).abs().max())  # every colour, every frame
    plain = pix_fmt in ("yuv420p", "yuvj420p")
    said = [n for n in video.notes if "pixel format" in n]
    assert said == ([] if plain else [said[0]]) and (plain or pix_fmt in said[0] and "8-bit RGB" in said[0])


def test_ten_bit_run_says_it_once_in_the_facts(tmp_path):
    clip = write_clip(tmp_path / "ten.mp4", ORIGINAL, pix_fmt="yuv420p10le", options={"crf": "12"})
    out = tmp_path / "run"
    run_edit(run_config(tmp_path, f"video={clip}", "tokenflow.mode=reconstruction"), out)
    facts = json.loads((out / "run.json").read_text())
    assert facts["source"]["pixel_format"] == "yuv420p10le" and facts["source"]["bit_depth"] == 10
    assert sum("yuv420p10le" in n for n in facts["notes"]) == 1
