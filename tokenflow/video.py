"""Video in and out: decode a clip (or a folder of images) to a uint8 tensor, fit it to the UNet's
size grid, convert to and from the model's [-1, 1] range, and write H.264 mp4 / png frames.

Everything goes through PyAV (FFmpeg), images included, so there is one decoder and one set of
error messages. Frames are torch.uint8 [F, H, W, 3] RGB everywhere outside the model.

Frame rate and stride: `Video.fps` is the SOURCE frame rate. Keeping every `stride`-th frame makes
the kept frames `stride` times further apart in time, so the edit must be written at
`Video.output_fps == fps / stride` to play at the source speed (same duration as the source span).
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DEFAULT_FOLDER_FPS = Fraction(20)  # an image folder has no clock; 20 fps is the rate of the demo clips


@dataclass
class Video:
    frames: torch.Tensor  # uint8 [F, H, W, 3] RGB
    fps: Fraction  # source frame rate (see module doc for stride)
    path: str
    indices: list[int]  # source frame index of each row of `frames`
    notes: list[str] = field(default_factory=list)  # human sentences: what was selected, resized, cropped
    stride: int = 1

    @property
    def output_fps(self) -> Fraction:
        """The rate to write these frames at so they play at the source speed."""
        return self.fps / self.stride

    @property
    def num_frames(self) -> int:
        return self.frames.shape[0]

    @property
    def height(self) -> int:
        return self.frames.shape[1]

    @property
    def width(self) -> int:
        return self.frames.shape[2]


# ----------------------------------------------------------------------------- reading

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
    fps_override = None if fps is None else _as_fraction(fps, "fps")

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
            + (f"; written at {_fmt_fps(rate / stride)} fps = {_fmt_fps(rate)}/{stride} to keep the source speed"
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


def _as_fraction(fps, what: str) -> Fraction:
    try:
        # limit_denominator turns a float like 29.97002997 back into 30000/1001
        value = fps if isinstance(fps, Fraction) else Fraction(fps).limit_denominator(10_000)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a positive number, got {fps!r}") from None
    if value <= 0:
        raise ValueError(f"{what} must be a positive number, got {fps!r}")
    return value


def _fmt_fps(fps: Fraction) -> str:
    return str(fps.numerator) if fps.denominator == 1 else f"{float(fps):.3f}"


# ----------------------------------------------------------------------------- size

def fit_to_size(video: Video, size: int | tuple[int, int] | None = None, multiple: int = 64) -> Video:
    """Resize and/or centre-crop so H and W are multiples of `multiple` (the UNet needs /64 px).

    size None: keep the scale, crop each side down to a multiple.
    size int: resize so the short side is `size` (aspect kept), then crop the long side.
    size (H, W): resize just enough to cover H x W (aspect kept), then crop to exactly H x W.
    A sentence saying what was done is appended to `notes`; nothing done, nothing appended.
    """
    if not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"multiple must be a positive int, got {multiple!r}")
    _check_frames(video.frames, "video.frames")
    h, w = video.height, video.width

    if size is None:
        if h < multiple or w < multiple:
            raise ValueError(
                f"{video.path}: {w}x{h} is smaller than {multiple} px on a side; pass size= to upscale"
            )
        resized = (h, w)
        target = (h // multiple * multiple, w // multiple * multiple)
    elif isinstance(size, int) and not isinstance(size, bool):
        if size < multiple or size % multiple:
            raise ValueError(f"size must be a multiple of {multiple} (>= {multiple}), got {size}")
        short = min(h, w)
        # short side exactly `size`; the long side keeps the aspect ratio
        resized = (size, max(size, round(w * size / h))) if h == short else (max(size, round(h * size / w)), size)
        target = (resized[0] // multiple * multiple, resized[1] // multiple * multiple)
    elif isinstance(size, (tuple, list)) and len(size) == 2:
        th, tw = size
        for name, v in (("height", th), ("width", tw)):
            if not isinstance(v, int) or v < multiple or v % multiple:
                raise ValueError(f"size {name} must be a multiple of {multiple} (>= {multiple}), got {tuple(size)}")
        scale = max(th / h, tw / w)  # cover the target in both directions, then crop the excess
        resized = (max(th, round(h * scale)), max(tw, round(w * scale)))
        target = (th, tw)
    else:
        raise ValueError(f"size must be None, an int or a (height, width) pair, got {size!r}")

    frames = video.frames
    did = []
    if resized != (h, w):
        frames = _resize(frames, resized)
        did.append(f"resized {w}x{h} -> {resized[1]}x{resized[0]}")
    if target != resized:
        top = (resized[0] - target[0]) // 2
        left = (resized[1] - target[1]) // 2
        frames = frames[:, top:top + target[0], left:left + target[1]].contiguous()
        did.append(
            f"centre-cropped to {target[1]}x{target[0]}" if did
            else f"centre-cropped {w}x{h} -> {target[1]}x{target[0]}"
        )
    if not did:
        return video
    return replace(video, frames=frames, notes=[*video.notes, ", ".join(did)])


def _resize(frames: torch.Tensor, hw: tuple[int, int], chunk: int = 8) -> torch.Tensor:
    """uint8 [F, H, W, 3] -> uint8 [F, h, w, 3], antialiased bilinear, a few frames at a time."""
    out = []
    for part in frames.split(chunk):
        x = part.permute(0, 3, 1, 2).float()  # [f, 3, H, W]
        x = F.interpolate(x, size=hw, mode="bilinear", antialias=True, align_corners=False)
        out.append(x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1))  # [f, h, w, 3]
    return torch.cat(out).contiguous()


# ----------------------------------------------------------------------------- model range

def to_model_range(frames: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [F, H, W, 3] -> float [F, 3, H, W] in [-1, 1] (what the VAE encoder takes)."""
    _check_frames(frames, "frames")
    return (frames.permute(0, 3, 1, 2).to(dtype) / 127.5 - 1.0).contiguous()


def from_model_range(images: torch.Tensor) -> torch.Tensor:
    """float [F, 3, H, W] in [-1, 1] -> uint8 [F, H, W, 3]; values outside the range are clamped."""
    if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError(f"images must be float [F, 3, H, W], got {images.dtype} {tuple(images.shape)}")
    x = ((images.float() + 1.0) * 127.5).clamp(0, 255).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous()  # [F, H, W, 3]


def _check_frames(frames, what: str) -> None:
    if not isinstance(frames, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor (uint8 [F, H, W, 3]), got {type(frames).__name__}")
    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"{what} must be uint8 [F, H, W, 3] RGB, got {frames.dtype} {tuple(frames.shape)}")
    if frames.shape[0] < 1 or frames.shape[1] < 1 or frames.shape[2] < 1:
        raise ValueError(f"{what} is empty: shape {tuple(frames.shape)}")


# ----------------------------------------------------------------------------- writing

def write_video(path: Path | str, frames: torch.Tensor, fps: Fraction | float | int, *, crf: int = 18) -> Path:
    """Write exactly F frames as H.264 (libx264, yuv420p) mp4 at exactly `fps`, atomically.

    The file is encoded into a temp file beside `path` and renamed into place, so a crash leaves
    either the old file or none, never half a video. yuv420p stores colour at half resolution, so
    it needs an even width and height: an odd side is padded by repeating its last pixel row/column
    (the written video is then one pixel larger there).
    """
    import av

    path = Path(path)
    if path.suffix.lower() != ".mp4":
        raise ValueError(f"{path}: write_video writes H.264 mp4; give the path a .mp4 suffix")
    _check_frames(frames, "frames")
    fps = _as_fraction(fps, "fps")
    if not isinstance(crf, int) or not 0 <= crf <= 51:
        raise ValueError(f"crf must be an int in 0..51 (lower is better quality), got {crf!r}")

    frames = frames.detach().cpu()
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        x = frames.permute(0, 3, 1, 2).float()  # [F, 3, H, W]; replicate-pad wants float
        x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        frames = x.to(torch.uint8).permute(0, 2, 3, 1)  # [F, H+ph, W+pw, 3]
    array = frames.contiguous().numpy()
    n, h, w, _ = array.shape

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with av.open(tmp, "w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            stream.options = {"crf": str(crf)}
            for i in range(n):
                frame = av.VideoFrame.from_ndarray(array[i], format="rgb24")
                frame.pts = i  # one tick of 1/fps per frame: no duplicated or dropped frames
                frame.time_base = 1 / fps
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode():  # flush the encoder's delayed frames
                container.mux(packet)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_png_frames(folder: Path | str, frames: torch.Tensor) -> list[Path]:
    """Write frames as folder/00000.png, 00001.png, ... (each file written to a temp then renamed)."""
    import av

    _check_frames(frames, "frames")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    array = frames.detach().cpu().contiguous().numpy()
    paths = []
    for i, image in enumerate(array):
        codec = av.CodecContext.create("png", "w")
        codec.width, codec.height, codec.pix_fmt = image.shape[1], image.shape[0], "rgb24"
        frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        data = b"".join(bytes(p) for p in [*codec.encode(frame), *codec.encode(None)])
        target = folder / f"{i:05d}.png"
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, target)
        paths.append(target)
    return paths


def side_by_side(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """uint8 [F, H, W1, 3] and [F, H, W2, 3] -> [F, H, W1 + W2, 3] (source | edit, for viewing)."""
    _check_frames(left, "left")
    _check_frames(right, "right")
    if left.shape[0] != right.shape[0] or left.shape[1] != right.shape[1]:
        raise ValueError(
            f"side_by_side needs the same frame count and height: left is {tuple(left.shape)}, "
            f"right is {tuple(right.shape)} ([F, H, W, 3])"
        )
    return torch.cat([left, right.to(left.device)], dim=2)
