"""Reading: decode a clip (or a folder of images) to uint8 RGB frames, choosing which frames.

Everything goes through PyAV (FFmpeg), images included, so there is one decoder and one set of
error messages.
"""

from __future__ import annotations

import re
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from .frames import Video, as_fraction, fmt_fps

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DEFAULT_FOLDER_FPS = Fraction(20)  # an image folder has no clock; 20 fps is the rate of the demo clips

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
) -> Video:
    """Decode frames start, start+stride, ... (< end, at most max_frames) of a clip or image folder.

    `path` is a video file (mp4/webm/mov/gif/... anything FFmpeg reads) or a folder of png/jpg
    frames in natural name order. `fps` sets the frame rate of a folder (default 20, since images
    carry none); for a file it overrides the container's rate. A single selected frame is allowed.
    """
    path = Path(path)
    _check_selection(start, end, stride, max_frames)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such video file or image folder")
    fps_override = None if fps is None else as_fraction(fps, "fps")

    if path.is_dir():
        files = image_files(path)
        if not files:
            raise ValueError(f"{path}: folder holds no {'/'.join(IMAGE_SUFFIXES)} images")
        wanted = _selected(len(files), start, end, stride, max_frames)
        frames = [_decode_image(files[i]) for i in wanted]
        rate = fps_override or DEFAULT_FOLDER_FPS
        total = len(files)
    else:
        frames, wanted, rate, total = _decode_file(path, start, end, stride, max_frames)
        rate = fps_override or rate

    if not frames:
        raise ValueError(
            f"{path}: selection start={start}, end={end}, stride={stride}, max_frames={max_frames} "
            f"picks no frames (the source has {total} frame(s))"
        )
    first = frames[0].shape
    for i, fr in zip(wanted, frames):
        if fr.shape != first:
            raise ValueError(f"{path}: frame {i} is {fr.shape[1]}x{fr.shape[0]}, frame {wanted[0]} is {first[1]}x{first[0]}")

    notes = []
    if len(wanted) != total:
        notes.append(
            f"selected {len(wanted)} of {total} frames (indices {wanted[0]}..{wanted[-1]}, stride {stride})"
            + (f"; written at {fmt_fps(rate / stride)} fps = {fmt_fps(rate)}/{stride} to keep the source speed"
               if stride > 1 else "")
        )
    video = torch.from_numpy(np.stack(frames))  # [F, H, W, 3]
    return Video(frames=video, fps=rate, path=str(path), indices=wanted, notes=notes, stride=stride)


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


def _wants(i: int, start: int, stride: int) -> bool:
    return i >= start and (i - start) % stride == 0


def _decode_file(path: Path, start, end, stride, max_frames):
    """(frames as HxWx3 uint8 arrays, their indices, source fps, frames decoded) of one video file."""
    import av

    try:
        container = av.open(str(path))
    except av.FFmpegError as e:
        raise ValueError(f"{path}: not a video FFmpeg can read ({e})") from None
    with container:
        if not container.streams.video:
            raise ValueError(f"{path}: has no video stream (container {container.format.name})")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        if not rate:
            raise ValueError(f"{path}: cannot tell the frame rate; pass fps=")
        frames, wanted, i = [], [], 0
        try:
            for frame in container.decode(stream):
                if end is not None and i >= end:
                    break
                if _wants(i, start, stride):
                    frames.append(frame.to_ndarray(format="rgb24"))
                    wanted.append(i)
                    if max_frames is not None and len(wanted) == max_frames:
                        i += 1
                        break
                i += 1
        except av.FFmpegError as e:
            raise ValueError(f"{path}: decoding failed after {i} frame(s) ({e})") from None
        # When we stopped early the true length is the container's count, if it knows it.
        total = max(i, stream.frames or 0)
    return frames, wanted, Fraction(rate), total


def _decode_image(path: Path) -> np.ndarray:
    import av

    try:
        with av.open(str(path)) as container:
            frame = next(container.decode(video=0))
            return frame.to_ndarray(format="rgb24")
    except (av.FFmpegError, StopIteration, IndexError) as e:
        raise ValueError(f"{path}: not an image FFmpeg can read ({e!r})") from None
