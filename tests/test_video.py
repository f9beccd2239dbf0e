"""Video in/out: frame selection, fps bookkeeping, size fitting, atomic writes, clear errors.

Most tests run on the project's generated sample clip (no data needed); one reads the real wolf
clip from ../shared/data when that folder exists beside the repository.
"""

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from tokenflow.media.sample_clip import cached_sample_clip, make_sample_clip, render_sample_frames
from tokenflow.media import (
    Video, fit_to_size, from_model_range, image_files, read_video, side_by_side, to_model_range,
    write_png_frames, write_video,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    return make_sample_clip(tmp_path_factory.mktemp("clip") / "sample.mp4", frames=16, size=256, fps=20)


@pytest.fixture(scope="module")
def sample_video(sample) -> Video:
    return read_video(sample)


def fake_video(h, w, f=2, value=None) -> Video:
    if value is None:
        frames = torch.randint(0, 256, (f, h, w, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    else:
        frames = torch.full((f, h, w, 3), value, dtype=torch.uint8)
    return Video(frames=frames, fps=Fraction(20), path="fake.mp4", indices=list(range(f)))


# ----------------------------------------------------------------------------- reading

@pytest.mark.skipif(not DATA.is_dir(), reason=f"{DATA} (shared sample data) is absent")
def test_wolf_clip_reads_as_40_frames_512_at_20fps():
    video = read_video(DATA / "wolf.mp4")
    assert video.frames.shape == (40, 512, 512, 3)
    assert video.frames.dtype == torch.uint8
    assert video.fps == Fraction(20) and video.output_fps == Fraction(20)
    assert video.indices == list(range(40))
    assert video.notes == []
    assert video.frames.float().std() > 10  # real picture, not a blank decode


def test_sample_clip_reads_back_close_to_what_was_drawn(sample_video):
    drawn = render_sample_frames(16, 256, seed=0)
    assert sample_video.frames.shape == (16, 256, 256, 3)
    assert sample_video.fps == Fraction(20)
    assert (sample_video.frames.float() - drawn.float()).abs().mean() < 3


def test_sample_clip_is_deterministic_and_moves():
    a, b = render_sample_frames(4, 64, seed=0), render_sample_frames(4, 64, seed=0)
    assert torch.equal(a, b)
    assert not torch.equal(a, render_sample_frames(4, 64, seed=1))
    assert (a[0].float() - a[-1].float()).abs().mean() > 1  # frames differ: things move


def test_cached_sample_clip_is_rendered_once_per_parameters(tmp_path, monkeypatch):
    first = cached_sample_clip(tmp_path / "cache", frames=3, size=32)
    assert first.parent == tmp_path / "cache" and read_video(first).frames.shape == (3, 32, 32, 3)
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temp file left beside it

    def no_render(*args, **kwargs):
        raise AssertionError("the cached clip was rendered again")

    monkeypatch.setattr("tokenflow.media.sample_clip.make_sample_clip", no_render)
    assert cached_sample_clip(tmp_path / "cache", frames=3, size=32) == first
    with pytest.raises(AssertionError, match="rendered again"):
        cached_sample_clip(tmp_path / "cache", frames=3, size=32, seed=1)  # other parameters, other file


def test_sample_clip_cli(tmp_path):
    from tokenflow.media.sample_clip import main

    main([str(tmp_path / "cli.mp4"), "--frames", "5", "--size", "64"])
    video = read_video(tmp_path / "cli.mp4")
    assert video.frames.shape == (5, 64, 64, 3)


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        (dict(), list(range(16))),
        (dict(start=2, end=11, stride=3), [2, 5, 8]),
        (dict(start=2, end=11, stride=3, max_frames=2), [2, 5]),
        (dict(stride=5), [0, 5, 10, 15]),
        (dict(start=15), [15]),  # a single frame is allowed
        (dict(start=10, end=1000), [10, 11, 12, 13, 14, 15]),  # end past the clip is clipped
        (dict(max_frames=3), [0, 1, 2]),
    ],
)
def test_frame_selection_picks_exactly_the_expected_indices(sample, sample_video, kwargs, expected):
    video = read_video(sample, **kwargs)
    assert video.indices == expected
    assert video.frames.shape[0] == len(expected)
    assert torch.equal(video.frames, sample_video.frames[expected])  # the right frames, not just the count
    assert video.fps == Fraction(20)


def test_stride_halves_output_fps_and_says_so(sample):
    video = read_video(sample, stride=2)
    assert video.fps == Fraction(20)  # source rate
    assert video.output_fps == Fraction(10)  # plays at source speed
    assert any("stride 2" in n and "10 fps" in n for n in video.notes), video.notes


def test_png_folder_in(tmp_path, sample_video):
    folder = tmp_path / "frames"
    paths = write_png_frames(folder, sample_video.frames[:6])
    assert [p.name for p in paths] == [f"{i:05d}.png" for i in range(6)]
    assert not list(folder.glob("*.tmp"))
    (folder / "README.txt").write_text("not a frame")

    video = read_video(folder)
    assert torch.equal(video.frames, sample_video.frames[:6])  # png is lossless
    assert video.fps == Fraction(20)  # the documented default for folders
    assert read_video(folder, fps=12).fps == Fraction(12)
    assert read_video(folder, start=1, stride=2).indices == [1, 3, 5]


def test_image_folder_is_in_natural_name_order(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    for name in ["f10.png", "f2.png", "f1.png"]:
        (folder / name).write_bytes(b"")
    assert [p.name for p in image_files(folder)] == ["f1.png", "f2.png", "f10.png"]


def write_gif(path: Path, colours: list[tuple[int, int, int]], fps: int) -> None:
    with av.open(str(path), "w", format="gif") as container:
        stream = container.add_stream("gif", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 48, 32, "rgb8"
        for i, c in enumerate(colours):
            frame = av.VideoFrame.from_ndarray(np.full((32, 48, 3), c, dtype=np.uint8), format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_gif_in(tmp_path):
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)]
    write_gif(tmp_path / "anim.gif", colours, fps=10)
    video = read_video(tmp_path / "anim.gif")
    assert video.frames.shape == (5, 32, 48, 3)
    assert video.fps == Fraction(10)
    mean_colours = video.frames.float().mean(dim=(1, 2))
    assert (mean_colours - torch.tensor(colours, dtype=torch.float32)).abs().max() < 20


# ----------------------------------------------------------------------------- writing

def test_write_then_read_back_keeps_count_fps_size_and_pixels(tmp_path, sample_video):
    out = write_video(tmp_path / "out.mp4", sample_video.frames, sample_video.fps, crf=18)
    assert out == tmp_path / "out.mp4"
    back = read_video(out)
    assert back.frames.shape == sample_video.frames.shape
    assert back.fps == sample_video.fps
    assert (back.frames.float() - sample_video.frames.float()).abs().mean() < 3
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"]  # no temp file left behind


@pytest.mark.parametrize("n, fps", [(1, Fraction(20)), (7, Fraction(30000, 1001)), (5, Fraction(25, 2))])
def test_write_exact_frame_count_and_fractional_fps(tmp_path, n, fps):
    frames = render_sample_frames(n, 64)
    back = read_video(write_video(tmp_path / "x.mp4", frames, fps))
    assert back.frames.shape[0] == n
    assert back.fps == fps


def test_odd_size_is_padded_to_even(tmp_path):
    frames = render_sample_frames(3, 128)[:, :127, :125]
    back = read_video(write_video(tmp_path / "odd.mp4", frames, 20))
    assert back.frames.shape == (3, 128, 126, 3)
    assert (back.frames[:, :127, :125].float() - frames.float()).abs().mean() < 3


@pytest.mark.parametrize(
    "frames",
    [
        torch.zeros(2, 32, 32, 3),  # float, not uint8
        torch.zeros(2, 32, 32, 4, dtype=torch.uint8),  # RGBA
        torch.zeros(32, 32, 3, dtype=torch.uint8),  # one frame without the F axis
        torch.zeros(0, 32, 32, 3, dtype=torch.uint8),  # no frames
    ],
)
def test_bad_frames_raise_before_anything_is_written(tmp_path, frames):
    with pytest.raises(ValueError, match="frames"):
        write_video(tmp_path / "bad.mp4", frames, 20)
    assert list(tmp_path.iterdir()) == []


def test_crash_while_encoding_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "out.mp4"
    target.write_bytes(b"previous video")
    real = av.VideoFrame.from_ndarray
    calls = []

    def failing(array, format):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated crash mid-encode")
        return real(array, format=format)

    monkeypatch.setattr(av.VideoFrame, "from_ndarray", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        write_video(target, render_sample_frames(5, 32), 20)
    assert target.read_bytes() == b"previous video"
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"]


def test_write_video_rejects_other_suffix_and_bad_fps(tmp_path):
    frames = render_sample_frames(2, 32)
    with pytest.raises(ValueError, match=r"\.mp4"):
        write_video(tmp_path / "out.avi", frames, 20)
    with pytest.raises(ValueError, match="fps"):
        write_video(tmp_path / "out.mp4", frames, 0)
    assert list(tmp_path.iterdir()) == []


def test_side_by_side():
    left, right = torch.zeros(3, 8, 5, 3, dtype=torch.uint8), torch.ones(3, 8, 7, 3, dtype=torch.uint8)
    both = side_by_side(left, right)
    assert both.shape == (3, 8, 12, 3)
    assert both[:, :, :5].eq(0).all() and both[:, :, 5:].eq(1).all()
    with pytest.raises(ValueError, match="height"):
        side_by_side(left, torch.zeros(3, 9, 5, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="frame count"):
        side_by_side(left, torch.zeros(2, 8, 5, 3, dtype=torch.uint8))


# ----------------------------------------------------------------------------- reading errors

def test_missing_path_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.mp4"):
        read_video(tmp_path / "nope.mp4")


def test_text_file_named_mp4_is_not_a_video(tmp_path):
    fake = tmp_path / "notes.mp4"
    fake.write_text("this is not a video\n" * 10)
    with pytest.raises(ValueError, match=r"notes\.mp4.*(Invalid data|not a video)"):
        read_video(fake)


def test_zero_frames_selected_names_the_selection(sample):
    with pytest.raises(ValueError, match=r"start=100.*16 frame"):
        read_video(sample, start=100)


def test_empty_image_folder(tmp_path):
    with pytest.raises(ValueError, match="no .*png"):
        read_video(tmp_path)


@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(stride=0), "stride"), (dict(stride=-2), "stride"), (dict(stride=1.5), "stride"),
        (dict(start=-1), "start"), (dict(start=5, end=5), "end"), (dict(max_frames=0), "max_frames"),
    ],
)
def test_bad_selection_values(sample, kwargs, word):
    with pytest.raises(ValueError, match=word):
        read_video(sample, **kwargs)


# ----------------------------------------------------------------------------- sizes and ranges

def test_fit_none_crops_down_to_multiples_centred():
    video = fake_video(480, 854)
    fitted = fit_to_size(video)
    assert fitted.frames.shape == (2, 448, 832, 3)
    assert fitted.notes == ["centre-cropped [480, 854] -> [448, 832]"]
    assert torch.equal(fitted.frames, video.frames[:, 16:464, 11:843])  # (480-448)/2, (854-832)/2
    assert video.notes == []  # the input is not mutated


def test_fit_int_resizes_short_side_then_crops():
    fitted = fit_to_size(fake_video(480, 854, value=77), 512)
    assert fitted.frames.shape == (2, 512, 896, 3)
    assert fitted.notes == ["resized [480, 854] -> [512, 911], centre-cropped to [512, 896]"]
    assert fitted.frames.eq(77).all()  # resizing a flat colour keeps it exactly

    tall = fit_to_size(fake_video(300, 200, value=5), 128)
    assert tall.frames.shape == (2, 192, 128, 3)
    assert tall.notes == ["resized [300, 200] -> [192, 128]"]


def test_fit_tuple_gives_exactly_that_size():
    fitted = fit_to_size(fake_video(480, 854), (512, 512))
    assert fitted.frames.shape == (2, 512, 512, 3)
    assert fitted.notes == ["resized [480, 854] -> [512, 911], centre-cropped to [512, 512]"]
    down = fit_to_size(fake_video(256, 256), (128, 128))
    assert down.frames.shape == (2, 128, 128, 3)
    assert down.notes == ["resized [256, 256] -> [128, 128]"]


def test_fit_matches_plain_interpolate():
    video = fake_video(100, 150)
    fitted = fit_to_size(video, (64, 64))  # resized to 64x96, cropped
    ref = torch.nn.functional.interpolate(
        video.frames.permute(0, 3, 1, 2).float(), size=(64, 96), mode="bilinear", antialias=True
    ).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    # interpolated in uint8 (no float copy of a full-size frame): within one level of the float filter
    assert (fitted.frames.int() - ref[:, :, 16:80].int()).abs().max() <= 1
    assert (fitted.frames.int() - ref[:, :, 16:80].int()).abs().float().mean() < 0.2


@pytest.mark.parametrize("size", [None, 128, (64, 192)])
def test_fitting_while_decoding_equals_fitting_after(sample, sample_video, size):
    # read_video(size=...) fits each frame as it is decoded (memory: one full-size frame at a time)
    during = read_video(sample, start=3, stride=2, size=size)
    after = fit_to_size(read_video(sample, start=3, stride=2), size)
    assert torch.equal(during.frames, after.frames) and during.notes == after.notes


def test_fit_nothing_to_do_adds_no_note(sample_video):
    fitted = fit_to_size(sample_video)
    assert fitted.frames.shape == sample_video.frames.shape
    assert fitted.notes == sample_video.notes
    assert fit_to_size(sample_video, 256).notes == sample_video.notes


def test_fit_errors():
    with pytest.raises(ValueError, match="smaller than 64"):
        fit_to_size(fake_video(40, 100))
    with pytest.raises(ValueError, match="multiple of 64"):
        fit_to_size(fake_video(128, 128), 100)
    with pytest.raises(ValueError, match="multiple of 64"):
        fit_to_size(fake_video(128, 128), (512, 500))
    with pytest.raises(ValueError, match="size must be"):
        fit_to_size(fake_video(128, 128), "512")
    assert fit_to_size(fake_video(40, 100), 64).frames.shape == (2, 64, 128, 3)  # upscaling asked for


def test_model_range_roundtrip_and_clamp():
    frames = torch.arange(256, dtype=torch.uint8).reshape(1, 16, 16, 1).expand(1, 16, 16, 3).contiguous()
    x = to_model_range(frames)
    assert x.shape == (1, 3, 16, 16) and x.dtype == torch.float32
    assert x.min() == -1 and x.max() == 1
    assert torch.equal(from_model_range(x), frames)
    assert from_model_range(torch.full((1, 3, 2, 2), 5.0)).eq(255).all()
    assert from_model_range(torch.full((1, 3, 2, 2), -5.0)).eq(0).all()
    with pytest.raises(ValueError, match="uint8"):
        to_model_range(frames.float())
    with pytest.raises(ValueError, match=r"\[F, 3, H, W\]"):
        from_model_range(x.permute(0, 2, 3, 1))
