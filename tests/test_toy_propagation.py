"""The weight-free propagation demo (tools/toy_propagation.py) on a generated clip with known motion:
a textured square translating 2 px a frame over a still textured background."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tokenflow.media import write_video
from tools.patch_tokens import from_tokens, to_tokens
from tools.toy_edit import edit_frames, frame_grades
from tools.toy_features import toy_features
from tools.toy_propagation import frame_fields, main, propagate_edit, run_demo, warp_errors
from tools.warp_error import warp_error

SIZE, STRIDE, SPEED, SQUARE, FRAMES = 64, 2, 2, 24, 12  # the square moves one 2 px token a frame


def texture(shape, seed):
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(1, 3, *shape, generator=g)
    return F.avg_pool2d(F.pad(noise, (1, 1, 1, 1), mode="replicate"), 3, stride=1)[0]  # [3, h, w] smooth-ish


def moving_square_clip() -> torch.Tensor:
    """uint8 [FRAMES, 64, 64, 3]: the square's top-left corner at x = 8 + 2t, y = 20."""
    background = 0.35 + 0.3 * texture((SIZE, SIZE), 0)
    square = 0.1 + 0.9 * texture((SQUARE, SQUARE), 1).flip(0)  # other colours and pattern
    frames = []
    for t in range(FRAMES):
        img = background.clone()
        x = 8 + SPEED * t
        img[:, 20 : 20 + SQUARE, x : x + SQUARE] = square
        frames.append(img)
    return (torch.stack(frames).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


@pytest.fixture(scope="module")
def clip():
    return moving_square_clip()


def test_tokens_round_trip_and_bad_stride():
    images = torch.rand(2, 3, 32, 48)
    for stride in (2, 4, 8):
        tokens = to_tokens(images, stride)
        assert tokens.shape == (2, (32 // stride) * (48 // stride), 3 * 4 * stride * stride)
        torch.testing.assert_close(from_tokens(tokens, 32, 48, stride), images, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="even number of pixels >= 2, got 5"):
        to_tokens(images, 5)
    with pytest.raises(ValueError, match="48x32 frame does not split into 32 px"):
        to_tokens(images, 32)


def test_nn_field_recovers_the_known_motion(clip):
    """Frames matched to keyframes 1..6 frames away: the square's tokens move by 2 px (one token) x
    the frame gap, the background's stay put, for at least 90% / 80% of them. (The field maps token
    to token: at 4 px tokens an odd gap would be half a token, which it cannot express.)"""
    from tokenflow.propagation import keyframe_neighbours

    original = clip.permute(0, 3, 1, 2).float() / 255
    features = toy_features(original, STRIDE)
    grid = SIZE // STRIDE
    keyframes = [0, 6]
    neighbours = keyframe_neighbours(list(range(FRAMES)), keyframes, "sigmoid")
    ys, xs = np.mgrid[0:grid, 0:grid] * STRIDE  # block top-left corners, px
    checked = 0
    for frame in (2, 3, 5, 8):  # 8 lies after the last keyframe: both neighbours are keyframe 6
        fields = frame_fields(features, keyframes, neighbours, frame)
        for keyframe, field in ((keyframes[int(neighbours.past[frame])], fields.past[0]),
                                (keyframes[int(neighbours.future[frame])], fields.future[0])):
            q = field.numpy().reshape(grid, grid)
            dx, dy = (q % grid) * STRIDE - xs, (q // grid) * STRIDE - ys
            x_now = 8 + SPEED * frame
            inside = (ys >= 20) & (ys + STRIDE <= 20 + SQUARE) & (xs >= x_now) & (xs + STRIDE <= x_now + SQUARE)
            # background tokens at least a token away from the square now and in the keyframe
            x_kf = 8 + SPEED * keyframe
            near = (ys + 2 * STRIDE > 20) & (ys - STRIDE < 20 + SQUARE) & (
                xs + 2 * STRIDE > min(x_now, x_kf)) & (xs - STRIDE < max(x_now, x_kf) + SQUARE)
            expected = np.where(inside, SPEED * (keyframe - frame), 0)
            good = (dx == expected) & (dy == 0)
            assert good[inside].mean() >= 0.9, (frame, keyframe, good[inside].mean())
            assert good[~near].mean() >= 0.8, (frame, keyframe, good[~near].mean())
            checked += 1
    assert checked == 8


def test_propagation_keeps_keyframes_and_beats_the_per_frame_edit(clip):
    result, videos, figure = run_demo(clip, stride=STRIDE, interval=4, rules=("paper", "released"))
    assert result.keyframes == sorted(result.keyframes) and len(result.keyframes) == 3  # one per 4 frames
    for k in result.keyframes:  # a keyframe is its own neighbour: under the paper's rule it comes back unchanged
        assert (videos["tokenflow_paper"][k].int() - videos["per_frame"][k].int()).abs().max() <= 1
    errors = result.warp_error
    for rule in ("paper", "released"):
        assert errors["source"] < errors[f"tokenflow_{rule}"] < 0.5 * errors["per_frame"], errors
    assert result.flow_agreement > 0.8
    # the shared-flow scoring is the project's warp error, pair for pair
    direct = warp_error(videos["source"].numpy(), videos["per_frame"].numpy())
    assert result.per_pair["per_frame"] == pytest.approx(direct.per_pair, rel=1e-6)


def test_propagate_edit_shapes_and_rule_checks(clip):
    original = clip[:8].permute(0, 3, 1, 2).float() / 255
    features = toy_features(original, STRIDE)
    edited = edit_frames(original, frame_grades(8), [1, 5])
    out = propagate_edit(features, edited, [1, 5], STRIDE, rule="released", interval=4)
    assert out.frames.shape == original.shape and 0 <= out.frames.min() and out.frames.max() <= 1
    assert out.neighbours.w[0] == 1 and out.neighbours.future[6] == 1  # group 0 alone; frame 6 in group 1
    with pytest.raises(ValueError, match="one keyframe in each interval"):
        propagate_edit(features, edited, [1, 2], STRIDE, rule="released", interval=4)
    with pytest.raises(ValueError, match="strictly ascending"):
        propagate_edit(features, edited, [5, 1], STRIDE)


def test_warp_errors_of_a_still_edit_is_zero(clip):
    same = clip.numpy()
    scores = warp_errors(same, {"source": same, "grey": np.full_like(same, 128)})
    assert scores["grey"].mean == 0.0 and len(scores["grey"].per_pair) == FRAMES - 1


def test_cli_writes_every_output_and_reports(tmp_path, clip, capsys):
    video = write_video(tmp_path / "square.mp4", clip, 20, crf=0)
    out = tmp_path / "out"
    assert main(["--video", str(video), "--size", "64", "--frames", "10", "--interval", "4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "warp error            per_frame" in printed and "tokenflow_released" in printed
    names = {p.name for p in out.iterdir()}
    assert names == {"side_by_side.mp4", "per_frame.mp4", "tokenflow_paper.mp4", "tokenflow_released.mp4",
                     "nn_field.png", "warp_error.json"}
    facts = json.loads((out / "warp_error.json").read_text())
    assert facts["frames"] == 10 and facts["size"] == [64, 64] and set(facts["warp_error"]) == {
        "source", "per_frame", "tokenflow_paper", "tokenflow_released"}
    from tokenflow.media import read_video

    assert read_video(out / "side_by_side.mp4").frames.shape == (10, 64, 192, 3)
    # bad input: one line, nothing written
    assert main(["--video", str(tmp_path / "missing.mp4"), "--out", str(tmp_path / "none")]) == 2
    assert "missing.mp4" in capsys.readouterr().err and not (tmp_path / "none").exists()


def test_without_matplotlib_everything_but_the_figure_is_written(tmp_path, clip, monkeypatch):
    from tools.toy_propagation import report, write_outputs

    result, videos, figure = run_demo(clip[:6], stride=STRIDE, interval=4, rules=("paper",))
    monkeypatch.setitem(__import__("sys").modules, "tools.plotting", None)  # as if matplotlib were missing
    write_outputs(tmp_path / "out", result, videos, figure)
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"side_by_side.mp4", "per_frame.mp4", "tokenflow_paper.mp4", "warp_error.json"}
    assert "skipped nn_field.png" in report(result) and "nn_field" not in result.outputs
