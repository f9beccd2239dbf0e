"""Warp error (Lai et al. 2018): flow, warping, the reliability mask and the metric, on synthetic videos
with known motion, then on the real wolf clip when the shared data is there."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import cv2
import numpy as np
import pytest

from tools.optical_flow import backward_warp, flow
from tools.warp_error import (
    flicker,
    forward_backward_occlusion,
    main,
    motion_boundaries,
    out_of_frame_mask,
    pair_warp_error,
    reliability_mask,
    warp_error,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SIZE = 128
SHIFT_X, SHIFT_Y = 3, 2  # content moves 3 px right and 2 px down per frame


def smooth_texture(height: int, width: int, seed: int, sigma: float = 3.0) -> np.ndarray:
    """Low-pass RGB noise stretched to 0..255: texture everywhere, so flow is well posed."""
    noise = np.random.default_rng(seed).standard_normal((height, width, 3)).astype(np.float32)
    texture = cv2.GaussianBlur(noise, (0, 0), sigma)
    texture = (texture - texture.min()) / (texture.max() - texture.min())
    return np.round(texture * 255).astype(np.uint8)


def translating_video(num_frames: int = 6) -> np.ndarray:
    """[F, 128, 128, 3] uint8 windows of one big texture, frame t+1 = frame t moved by (3, 2)."""
    margin = 10
    big = smooth_texture(SIZE + num_frames * SHIFT_Y + 2 * margin, SIZE + num_frames * SHIFT_X + 2 * margin, seed=0)
    top, left = margin + num_frames * SHIFT_Y, margin + num_frames * SHIFT_X
    return np.stack([
        big[top - SHIFT_Y * t: top - SHIFT_Y * t + SIZE, left - SHIFT_X * t: left - SHIFT_X * t + SIZE]
        for t in range(num_frames)
    ])


def occluder_video() -> tuple[np.ndarray, np.ndarray]:
    """Two frames: a textured 40x40 square moves 8 px right over a still background.

    Returns the frames and the ground-truth occlusion of frame 0: background pixels just right of the
    square that the square covers in frame 1 (they have no correspondence there).
    """
    background = smooth_texture(SIZE, SIZE, seed=0)
    square = smooth_texture(40, 40, seed=1, sigma=2.0)
    frames = []
    for left in (30, 38):
        frame = background.copy()
        frame[44:84, left:left + 40] = square
        frames.append(frame)
    occluded = np.zeros((SIZE, SIZE), dtype=bool)
    occluded[44:84, 70:78] = True
    return np.stack(frames), occluded


# ---------------------------------------------------------------------------------------------
# warping and flow
# ---------------------------------------------------------------------------------------------


def test_backward_warp_is_exact_bilinear_sampling():
    height, width = 20, 30
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    ramp = np.stack([xs, ys, 2 * xs + 3 * ys], axis=-1)  # bilinear interpolation is exact on linear images
    flow_field = np.zeros((height, width, 2), dtype=np.float32)
    flow_field[..., 0], flow_field[..., 1] = 1.25, -0.5
    warped = backward_warp(ramp, flow_field)
    inside = (slice(1, None), slice(0, width - 2))  # where x + 1.25 and y - 0.5 stay in the image
    np.testing.assert_allclose(warped[inside][..., 0], (xs + 1.25)[inside], atol=1e-5)
    np.testing.assert_allclose(warped[inside][..., 1], (ys - 0.5)[inside], atol=1e-5)
    np.testing.assert_allclose(warped[inside][..., 2], (2 * (xs + 1.25) + 3 * (ys - 0.5))[inside], atol=1e-4)
    # border: sample positions are clamped into the image (edge pixel replicated)
    np.testing.assert_allclose(warped[0, :, 1], 0.0)
    np.testing.assert_allclose(warped[:, -1, 0], width - 1)
    with pytest.raises(ValueError, match="flow shape"):
        backward_warp(ramp, flow_field[:, :-1])


def test_dis_flow_recovers_known_translation():
    frames = translating_video(2)
    forward = flow(frames[0], frames[1])
    backward = flow(frames[1], frames[0])
    assert forward.shape == (SIZE, SIZE, 2) and forward.dtype == np.float32
    interior = (slice(16, -16), slice(16, -16))
    assert np.abs(forward[interior][..., 0] - SHIFT_X).mean() < 0.5
    assert np.abs(forward[interior][..., 1] - SHIFT_Y).mean() < 0.5
    assert np.abs(backward[interior][..., 0] + SHIFT_X).mean() < 0.5
    assert np.abs(backward[interior][..., 1] + SHIFT_Y).mean() < 0.5
    # the convention: prev(p) ~ next(p + flow), so warping next with it redraws prev
    redrawn = backward_warp(frames[1], forward)
    assert np.abs(redrawn[interior] - frames[0][interior].astype(np.float32)).mean() < 1.0


def test_flow_rejects_bad_input():
    frame = translating_video(1)[0]
    with pytest.raises(ValueError, match="uint8"):
        flow(frame.astype(np.float32), frame)
    with pytest.raises(ValueError, match="differ in size"):
        flow(frame, frame[:64])
    with pytest.raises(ValueError, match="unknown flow method"):
        flow(frame, frame, method="farneback")


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="torchvision is installed here")
def test_raft_without_torchvision_says_what_to_install():
    frame = translating_video(1)[0]
    with pytest.raises(RuntimeError, match="torchvision"):
        flow(frame, frame, method="raft")


# ---------------------------------------------------------------------------------------------
# the reliability mask
# ---------------------------------------------------------------------------------------------


def test_forward_backward_check_on_exact_flows():
    uniform = np.zeros((16, 16, 2), dtype=np.float32)
    uniform[..., 0] = 2.0
    assert not forward_backward_occlusion(uniform, -uniform).any()  # backward undoes forward
    # |F_fw + W|^2 = 16 > 0.01 (4 + 4) + 0.5: the backward flow does not come back
    assert forward_backward_occlusion(uniform, uniform).all()
    # a 0.5 px disagreement stays under the absolute 0.5 px^2 tolerance
    assert not forward_backward_occlusion(uniform, -uniform + 0.5).any()


def test_motion_boundaries_mark_flow_steps_only():
    step = np.zeros((16, 16, 2), dtype=np.float32)
    step[:, 8:, 0] = 5.0  # u jumps from 0 to 5 between columns 7 and 8
    boundary = motion_boundaries(step)
    # forward differences f(x) - f(x+1): the jump is seen at column 7 only
    assert boundary[:, 7].all()
    assert boundary.sum() == 16
    smooth = np.zeros((16, 16, 2), dtype=np.float32)
    smooth[..., 0] = 3.0 + np.linspace(0, 0.15, 16)[None, :]  # 0.01 px/px: 1e-4 < 0.01*9 + 0.002
    smooth[..., 1] = -1.0
    assert not motion_boundaries(smooth).any()


def test_out_of_frame_mask_is_the_content_leaving_the_view():
    shift = np.zeros((10, 10, 2), dtype=np.float32)
    shift[..., 0], shift[..., 1] = SHIFT_X, SHIFT_Y
    leaving = out_of_frame_mask(shift)
    expected = np.zeros((10, 10), dtype=bool)
    expected[:, -SHIFT_X:] = True
    expected[-SHIFT_Y:, :] = True
    np.testing.assert_array_equal(leaving, expected)


def test_mask_marks_occlusion_and_corrupting_masked_pixels_changes_nothing():
    frames, occluded = occluder_video()
    forward = flow(frames[0], frames[1])
    backward = flow(frames[1], frames[0])
    assert np.abs(forward[54:74, 40:60, 0] - 8).mean() < 0.5  # the square's motion is found
    valid = reliability_mask(forward, backward)
    assert (~valid[occluded]).mean() > 0.8  # the covered strip is (mostly) marked unreliable
    assert valid[:, :20].mean() > 0.95  # the still background far from the square is kept

    clean = warp_error(frames, frames)
    assert clean.valid_fraction[0] == pytest.approx(valid.mean())
    # without the mask the occlusion is scored as error: the mask is what keeps a perfect edit near 0
    unit = frames.astype(np.float32) / 255
    unmasked = pair_warp_error(unit[0], unit[1], forward, np.ones_like(valid)) * 1e3
    assert unmasked > 3 * clean.mean

    noise = np.random.default_rng(5).integers(0, 256, size=frames[0].shape, dtype=np.uint8)
    corrupted_masked = frames.copy()
    corrupted_masked[0][~valid] = noise[~valid]  # only pixels the mask drops (pair (0, 1) is the only pair)
    assert warp_error(frames, corrupted_masked).per_pair == clean.per_pair
    # control: as many corrupted pixels inside the valid region move the error a lot
    rows, cols = np.nonzero(valid)
    count = int((~valid).sum())
    corrupted_valid = frames.copy()
    corrupted_valid[0][rows[:count], cols[:count]] = noise[rows[:count], cols[:count]]
    assert warp_error(frames, corrupted_valid).mean > 10 * clean.mean + 1.0


# ---------------------------------------------------------------------------------------------
# the metric
# ---------------------------------------------------------------------------------------------


def test_pair_error_is_a_mean_over_valid_pixels_and_channels():
    height, width = 8, 8
    frame = np.full((height, width, 3), 0.5, dtype=np.float32)
    shifted = frame.copy()
    shifted[..., 0] += 0.1  # one channel off by 0.1 everywhere
    mask = np.zeros((height, width), dtype=bool)
    mask[:4] = True
    zero_flow = np.zeros((height, width, 2), dtype=np.float32)
    # sum over valid pixels and channels / (3 x valid pixels) = 0.1^2 / 3
    assert pair_warp_error(frame, shifted, zero_flow, mask) == pytest.approx(0.01 / 3, rel=1e-5)
    assert pair_warp_error(frame, shifted, zero_flow, np.zeros_like(mask)) == 0.0


def test_translating_video_against_itself_scores_near_zero_and_flicker_much_worse():
    frames = translating_video(6)
    clean = warp_error(frames, frames)
    assert len(clean.per_pair) == 5 and len(clean.valid_fraction) == 5
    assert clean.mean == pytest.approx(np.mean(clean.per_pair))
    assert clean.mean < 0.05  # x1e-3
    assert min(clean.valid_fraction) > 0.9

    flickering = warp_error(frames, flicker(frames, 8, seed=0))
    assert flickering.mean > 5 * clean.mean
    assert flickering.mean > 0.3  # x1e-3: about the size of a real visible flicker

    # torch uint8 and float [0, 1] inputs give the same numbers as numpy uint8
    torch = pytest.importorskip("torch")
    again = warp_error(torch.from_numpy(frames), frames.astype(np.float32) / 255)
    np.testing.assert_allclose(again.per_pair, clean.per_pair, atol=1e-6)


def test_flicker_scales_each_frame_by_a_factor_in_range():
    frames = np.full((20, 4, 4, 3), 100, dtype=np.uint8)
    out = flicker(frames, 8, seed=3)
    assert out.dtype == np.uint8 and out.shape == frames.shape
    per_frame = out[:, 0, 0, 0].astype(int)
    assert per_frame.min() >= 92 and per_frame.max() <= 108 and len(set(per_frame)) > 5
    assert (out == out[:, :1, :1, :1]).all()  # one factor per frame
    np.testing.assert_array_equal(flicker(frames, 8, seed=3), out)
    np.testing.assert_array_equal(flicker(frames, 0, seed=3), frames)
    with pytest.raises(ValueError, match="percentage"):
        flicker(frames, 120)


def test_mismatched_inputs_raise_clear_errors():
    frames = translating_video(4)
    with pytest.raises(ValueError, match="source has 4 frames, edited has 3"):
        warp_error(frames, frames[:3])
    with pytest.raises(ValueError, match=r"source frames are \[128, 128\] \(\[H, W\]\), edited are \[128, 64\]"):
        warp_error(frames, frames[:, :, :64])
    with pytest.raises(ValueError, match="at least 2 frames"):
        warp_error(frames[:1], frames[:1])
    with pytest.raises(ValueError, match=r"\[F, H, W, 3\]"):
        warp_error(frames[..., 0], frames[..., 0])
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        warp_error(frames, frames.astype(np.float32))
    with pytest.raises(ValueError, match="unknown flow method"):
        warp_error(frames, frames, method="pwc")


# ---------------------------------------------------------------------------------------------
# CLI and the real clip
# ---------------------------------------------------------------------------------------------


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--source", "--edited", "--method", "--max-frames", "--csv", "--flicker"):
        assert option in out


def test_cli_on_image_folders(tmp_path, capsys):
    frames = translating_video(5)
    source_dir, edited_dir = tmp_path / "source", tmp_path / "edited"
    for folder, video in ((source_dir, frames), (edited_dir, flicker(frames, 8, seed=1))):
        folder.mkdir()
        for t, frame in enumerate(video):
            cv2.imwrite(str(folder / f"{t:05d}.png"), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    csv_path = tmp_path / "out" / "warp.csv"

    code = main(["--source", str(source_dir), "--edited", str(edited_dir), "--max-frames", "4", "--csv", str(csv_path)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 0
    expected = warp_error(frames[:4], flicker(frames, 8, seed=1)[:4])
    assert lines[-1] == f"mean warp error: {expected.mean:.3f} x1e-3 (3 pairs, dis flow)"
    assert str(csv_path.resolve()) in lines[-2]
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["frame_t"]) for r in rows] == [0, 1, 2]
    np.testing.assert_allclose([float(r["warp_error_x1e-3"]) for r in rows], expected.per_pair, atol=1e-5)

    # frame-count mismatch is reported by the CLI as an error line and exit status 2, naming both
    (edited_dir / "00004.png").unlink()
    code = main(["--source", str(source_dir), "--edited", str(edited_dir)])
    err = capsys.readouterr().err
    assert code == 2 and "source has 5 frames, edited has 4" in err


@pytest.mark.skipif(not (DATA / "wolf.mp4").is_file(), reason=f"shared clip {DATA / 'wolf.mp4'} not present")
def test_wolf_against_itself_and_a_flickering_copy():
    from tokenflow.media import read_video

    frames = read_video(DATA / "wolf.mp4", max_frames=10).frames.numpy()
    assert frames.shape == (10, 512, 512, 3)
    clean = warp_error(frames, frames)
    assert clean.mean < 0.5  # x1e-3; the paper's LDM round trip alone is 2.0
    flickering = warp_error(frames, flicker(frames, 8, seed=0))
    assert flickering.mean > 2 * clean.mean
