"""Reading: decode a clip (or a folder of images) to uint8 RGB frames, choosing which frames.

Everything goes through PyAV (FFmpeg), images included, so there is one decoder and one set of
error messages. A file is read in two passes: its packets' timestamps first (timing.py: which source
frame each output frame is, constant or variable frame rate), then the frames, one at a time, each
converted to 8-bit RGB (pixels.py), stood upright (orientation.py) and fitted to the run's size
(size.py) before the next is decoded. So memory holds the selected frames at the edited size plus
one decoded frame, whatever the source's resolution and length: a minute of 1080p edited at 512 is
512-size frames only.
"""

from __future__ import annotations

import re
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from . import orientation, pixels
from .audio import AudioUnreadable, read_audio_span
from .frames import SourceInfo, Video, as_fraction, fmt_fps
from .size import hw, plan_fit
from .timing import probe_clock

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DEFAULT_FOLDER_FPS = Fraction(20)  # an image folder has no clock; 20 fps is the rate of the demo clips
KEEP = "keep"  # read_video(size=KEEP): frames at the size they are decoded (no fitting)
# Bump when the same file and selection read to other pixels (part of the inversion cache's key).
# 2: frames stood upright, VFR frames picked by timestamp, colour range honoured, uint8 resizing.
READER_VERSION = 2


def ffmpeg_reason(error: Exception) -> str:
    """What an FFmpeg error says, without PyAV's errno (an FFmpeg code such as 1094995529, which tells
    a user nothing) and the file name, which the line naming the file already gives."""
    reason = getattr(error, "strerror", None)
    return reason[:1].lower() + reason[1:] if reason else str(error)


def image_files(folder: Path | str) -> list[Path]:
    """The png/jpg files of `folder`, in natural name order (frame2 before frame10)."""
    folder = Path(folder)

    def natural(p: Path):
        return [(0, int(s), "") if s.isdigit() else (1, 0, s.lower()) for s in re.split(r"(\d+)", p.name)]

    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    return sorted(files, key=natural)


def read_video(
    path: Path | str, *, start: int = 0, end: int | None = None, stride: int = 1,
    max_frames: int | None = None, fps: Fraction | float | int | None = None,
    size: int | tuple[int, int] | None | str = KEEP, multiple: int = 64, audio: bool = False,
) -> Video:
    """Decode frames start, start+stride, ... (< end, at most max_frames) of a clip or image folder.

    `path` is a video file (mp4/webm/mov/gif/... anything FFmpeg reads) or a folder of png/jpg
    frames in natural name order. `fps` sets the frame rate of a folder (default 20, since images
    carry none); for a file it overrides the container's rate (frames are then taken by index and
    no sound is kept: it would not match). A single selected frame is allowed.

    `size`: KEEP (default) returns frames as decoded; None, an int or (H, W) fits each frame as it
    is decoded, exactly as fit_to_size would fit them all afterwards (without ever holding them all
    at full size). `audio=True` also reads the sound of the selected span (Video.audio); a sound
    track that cannot be read leaves Video.audio None and says why in Video.warnings.
    A file's frames are stood upright when its stream says it is shown rotated, and a variable
    frame rate file's frames are picked by timestamp (timing.py).
    """
    path = Path(path)
    _check_selection(start, end, stride, max_frames)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such video file or image folder")
    fps_override = None if fps is None else as_fraction(fps, "fps")
    sink = _FrameSink(str(path), size, multiple)

    if path.is_dir():
        files = image_files(path)
        if not files:
            raise ValueError(f"{path}: folder holds no {'/'.join(IMAGE_SUFFIXES)} images")
        total = len(files)
        wanted = _selected(total, start, end, stride, max_frames)
        _check_picks(path, wanted, start, end, stride, max_frames, total)
        sink.expect(len(wanted))
        for row, i in enumerate(wanted):
            sink.put([row], i, _decode_image(files[i]))
        rate, start_time, source = fps_override or DEFAULT_FOLDER_FPS, Fraction(0), sink.info
        source.frame_rate = str(rate)
    else:
        wanted, rate, start_time, total, source = _read_file(path, sink, start, end, stride, max_frames, fps_override)

    notes = []
    if source.vfr:
        lo, hi = sink.clock_ms
        notes.append(
            f"variable frame rate source (frame intervals {lo:.1f}..{hi:.1f} ms): frames picked by timestamp "
            f"on a constant {fmt_fps(rate)} fps grid (its average rate); written at {fmt_fps(rate / stride)} fps"
        )
    if len(wanted) != total:
        notes.append(
            f"selected {len(wanted)} of {total} frames (indices {wanted[0]}..{wanted[-1]}, stride {stride})"
            + (f"; written at {fmt_fps(rate / stride)} fps = {fmt_fps(rate)}/{stride} to keep the source speed"
               if stride > 1 else "")
        )
    if source.rotation:
        notes.append(f"source is shown rotated {source.rotation} degrees (counter-clockwise): frames stood upright")
    if source.pixel_format and (said := pixels.describe(source.pixel_format)):
        notes.append(said)
    if sink.plan is not None and (fitted := sink.plan.note()):
        notes.append(fitted)
    video = Video(frames=sink.frames(), fps=rate, path=str(path), indices=wanted, notes=notes, stride=stride,
                  start_time=start_time, source=source)
    if audio and not path.is_dir() and fps_override is None:
        try:
            video.audio = read_audio_span(str(path), start_time, start_time + video.duration)
        except AudioUnreadable as e:
            video.warnings.append(f"{e}: the edit is written without sound")
        if video.audio is not None:
            source.audio = video.audio.describe()
    return video


class _FrameSink:
    """Takes decoded frames one at a time: RGB, upright, fitted (when a size is given), stored in a
    tensor allocated once at the fitted size; the rotation and fit are planned from the first frame."""

    def __init__(self, path: str, size, multiple: int):
        self.path, self.size, self.multiple = path, size, multiple
        self.info = SourceInfo()
        self.plan = None
        self.rotation = 0
        self.clock_ms = None
        self._rows: torch.Tensor | None = None
        self._filled: list[bool] = []
        self._first: tuple[int, tuple[int, int]] | None = None  # (source index, decoded HxW) of the first frame

    def expect(self, n: int) -> None:
        self._filled = [False] * n

    def put(self, rows: list[int], index: int, image: np.ndarray) -> None:
        """`image`: uint8 [H, W, 3] RGB as decoded (before turning) of source frame `index`."""
        if self._first is None:
            self._first = (index, image.shape[:2])
        elif image.shape[:2] != self._first[1]:
            (i0, (h0, w0)), (h, w) = self._first, image.shape[:2]
            raise ValueError(f"{self.path}: frame {index} is {hw(h, w)}, frame {i0} is {hw(h0, w0)} (sizes [H, W])")
        image = orientation.upright(image, self.rotation)
        frame = torch.from_numpy(image)[None]  # [1, H, W, 3]
        if self.size != KEEP:
            if self.plan is None:
                self.plan = plan_fit(frame.shape[1], frame.shape[2], self.size, self.multiple, path=self.path)
            frame = self.plan.apply(frame)
        if self._rows is None:
            self._rows = torch.empty((len(self._filled), *frame.shape[1:]), dtype=torch.uint8)
        for row in rows:
            self._rows[row] = frame[0]
            self._filled[row] = True

    def missing(self) -> list[int]:
        return [row for row, done in enumerate(self._filled) if not done]

    def frames(self) -> torch.Tensor:
        assert self._rows is not None and not self.missing()
        return self._rows


def _read_file(path: Path, sink: _FrameSink, start, end, stride, max_frames, fps_override):
    """Fill `sink` with the selected frames of a video file -> (source indices, rate, start time,
    frames in the source, SourceInfo)."""
    import av

    try:
        container = av.open(str(path))
    except av.FFmpegError as e:
        raise ValueError(f"{path}: not a video FFmpeg can read ({ffmpeg_reason(e)})") from None
    with container:
        if not container.streams.video:
            raise ValueError(f"{path}: has no video stream (container {container.format.name})")
        stream = container.streams.video[0]
        nominal = stream.average_rate or stream.guessed_rate or stream.base_rate
        nominal = Fraction(nominal) if nominal else None
        try:
            clock = None if fps_override else probe_clock(container, stream, nominal)
        except av.FFmpegError as e:
            raise ValueError(f"{path}: reading the packets failed ({ffmpeg_reason(e)})") from None
        if clock is None and not (fps_override or nominal):
            raise ValueError(f"{path}: cannot tell the frame rate; pass fps=")
        if clock is not None:
            container.seek(0, stream=stream)  # back to the first packet for the decoding pass
            slots, rate = clock.slots(), clock.rate
            total = len(slots)
            positions = _selected(total, start, end, stride, max_frames)
            _check_picks(path, positions, start, end, stride, max_frames, total)
            wanted = [slots[p] for p in positions]
            start_time = clock.slot_time(positions[0])
            if clock.vfr:
                sink.clock_ms = clock.interval_range_ms()
        else:  # no timestamps (or a rate given): frames by index
            rate = fps_override or nominal
            total = stream.frames or 0
            wanted = None  # known as frames are counted
        sink.info.vfr = bool(clock is not None and clock.vfr)
        sink.info.frame_rate = str(rate)
        stream.thread_type = "AUTO"  # frame threads: decoding 1080p is the reading pass's cost
        decoded = _decode_frames(path, container, stream, sink, wanted, start, end, stride, max_frames)
        if wanted is None:
            wanted = decoded
            total = max(total, (wanted[-1] + 1) if wanted else 0)
            _check_picks(path, wanted, start, end, stride, max_frames, total)
            start_time = Fraction(wanted[0]) / rate
        missing = sink.missing()
        if missing:
            raise ValueError(
                f"{path}: decoding stopped before source frame {wanted[missing[0]]}: the file holds fewer "
                f"decodable frames than its packets say"
            )
    return wanted, rate, start_time, total, sink.info


def _decode_frames(path, container, stream, sink, wanted, start, end, stride, max_frames) -> list[int]:
    """Decode, handing the wanted frames to `sink`; returns the source indices taken (when
    `wanted` is None they are chosen here by index: start, start+stride, ...)."""
    import av

    rows_of: dict[int, list[int]] = {}
    if wanted is not None:
        sink.expect(len(wanted))
        for row, i in enumerate(wanted):
            rows_of.setdefault(i, []).append(row)  # a VFR slow stretch shows one frame in several rows
        last = max(wanted)
    taken, i = [], 0
    try:
        for frame in container.decode(stream):
            if i == 0:
                sink.rotation = orientation.stream_rotation(stream, frame)
                sink.info.rotation = sink.rotation
                sink.info.pixel_format = frame.format.name
                sink.info.bit_depth = pixels.bit_depth(frame.format.name)
            if wanted is not None:
                if i in rows_of:
                    sink.put(rows_of[i], i, pixels.to_rgb24(frame))
                if i >= last:
                    break
            else:
                if end is not None and i >= end:
                    break
                if i >= start and (i - start) % stride == 0:
                    taken.append(i)
                    sink._filled.append(False)
                    sink.put([len(taken) - 1], i, pixels.to_rgb24(frame))
                    if max_frames is not None and len(taken) == max_frames:
                        break
            i += 1
    except av.FFmpegError as e:
        raise ValueError(f"{path}: decoding failed after {i} frame(s) ({ffmpeg_reason(e)})") from None
    return taken


def _check_picks(path, picked, start, end, stride, max_frames, total) -> None:
    if not picked:
        raise ValueError(
            f"{path}: selection start={start}, end={end}, stride={stride}, max_frames={max_frames} "
            f"picks no frames (the source has {total} frame(s))"
        )


def _check_selection(start, end, stride, max_frames) -> None:
    def is_int(x):
        return isinstance(x, (int, np.integer)) and not isinstance(x, bool)

    if not is_int(start) or start < 0:
        raise ValueError(f"start must be an int >= 0, got {start!r}")
    if end is not None and (not is_int(end) or end <= start):
        raise ValueError(f"end must be None or an int > start ({start}), got {end!r}")
    if not is_int(stride) or stride < 1:
        raise ValueError(f"stride must be an int >= 1, got {stride!r}")
    if max_frames is not None and (not is_int(max_frames) or max_frames < 1):
        raise ValueError(f"max_frames must be None or an int >= 1, got {max_frames!r}")


def _selected(total: int, start: int, end: int | None, stride: int, max_frames: int | None) -> list[int]:
    stop = total if end is None else min(end, total)
    picked = list(range(start, stop, stride))
    return picked if max_frames is None else picked[:max_frames]


def _decode_image(path: Path) -> np.ndarray:
    import av

    try:
        with av.open(str(path)) as container:
            frame = next(container.decode(video=0))
            return pixels.to_rgb24(frame)
    except av.FFmpegError as e:
        raise ValueError(f"{path}: not an image FFmpeg can read ({ffmpeg_reason(e)})") from None
    except (StopIteration, IndexError):
        raise ValueError(f"{path}: not an image FFmpeg can read (it holds no picture)") from None
