"""ControlNet's control frames of a run: one image per selected source frame, float [n, 3, H, W] in [0, 1].

- `controlnet=canny`: the edges of each selected source frame (OpenCV's Canny on the RGB frame, the
  thresholds controlnet.low_threshold / high_threshold), repeated to 3 channels: 1 on an edge, 0 off it.
  That is the image canny ControlNets were trained on (white edges on black).
- `controlnet=frames controlnet.video=PATH`: precomputed control frames (depth, soft edge, pose maps made
  with any tool), a video or an image folder, lined up with the source exactly. Its frame count says
  which frames it holds: one per source frame (the run's frames.* selection picks from it) or exactly
  the selected frames (taken in order). Its size says how it is fitted: the source's size (fitted to
  the run's size by the same rule as the source, so the same crop) or already the run's size (kept).
  Anything else is one line, said by `check_control_clip` before the models load.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .config import ControlNetConfig, RunConfig
from .media import Video, image_files, read_video

class OpenCVMissing(ValueError):
    """cv2 cannot be imported (the message says which pip command installs it)."""


OPENCV_MISSING = ("controlnet=canny needs OpenCV, which is not installed: pip install opencv-python-headless "
                  "(or use controlnet=frames with edges made elsewhere)")


def canny_edges(frames: Tensor, low: int = 100, high: int = 200) -> Tensor:
    """uint8 [n, H, W, 3] RGB -> float32 [n, 3, H, W]: cv2.Canny(frame, low, high) / 255 in each channel."""
    try:
        import cv2
    except ImportError:
        raise OpenCVMissing(OPENCV_MISSING) from None
    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"canny_edges: frames must be uint8 [n, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
    edges = np.stack([cv2.Canny(np.ascontiguousarray(f), low, high) for f in frames.numpy()])  # [n, H, W] 0 or 255
    return torch.from_numpy(edges).float().div_(255.0)[:, None].expand(-1, 3, -1, -1).contiguous()


def frames_to_conditions(frames: Tensor) -> Tensor:
    """uint8 [n, H, W, 3] -> float32 [n, 3, H, W] in [0, 1] (ControlNet's input range, not the VAE's [-1, 1])."""
    return frames.permute(0, 3, 1, 2).float().div_(255.0).contiguous()


@dataclass
class ControlClip:
    """What `check_control_clip` found: how to read the control frames so they line up with the source."""

    path: Path
    select: bool  # one frame per source frame: pick with frames.* (else: exactly the selected frames, all taken)
    fit: bool  # at the source's size: fit like the source (else: at the run's size, kept)


def _clip_facts(path: Path) -> tuple[int, tuple[int, int]]:
    """(frames in the clip, (H, W) of its first frame as shown) without decoding the clip."""
    first = read_video(path, max_frames=1)  # one frame, stood upright, unfitted
    if path.is_dir():
        return len(image_files(path)), (first.height, first.width)
    import av

    from .media.timing import probe_clock

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        nominal = stream.average_rate or stream.guessed_rate or stream.base_rate
        clock = probe_clock(container, stream, Fraction(nominal) if nominal else None)
        total = len(clock.slots()) if clock is not None else int(stream.frames or 0)
    return total, (first.height, first.width)


def check_control_clip(cfg: RunConfig, video: Video) -> ControlClip:
    """controlnet.video against the run's selected frames `video` -> how to read it; a clip of another
    frame count or size is one ValueError naming both (read: one frame of each, and the packets)."""
    key = "controlnet.video"
    path = Path(str(cfg.controlnet.video)).expanduser()
    if not path.exists():
        raise ValueError(f"{key}={path}: no such video file or image folder")
    try:
        total, hw = _clip_facts(path)
    except ValueError as e:
        raise ValueError(f"{key}: {e}") from None
    source_total, source_hw = _clip_facts(Path(video.path))
    n, run_hw = video.num_frames, (video.height, video.width)

    def size(h_w):
        return f"{h_w[1]}x{h_w[0]}"

    if total not in (source_total, n):
        raise ValueError(f"{key}={path}: it has {total} frames; the run edits {n} of the video's {source_total} "
                         f"(give one control frame per source frame, or exactly the {n} selected ones)")
    if hw not in (source_hw, run_hw):
        raise ValueError(f"{key}={path}: its frames are {size(hw)}; make them at the video's size {size(source_hw)} "
                         f"or at the run's size {size(run_hw)}")
    return ControlClip(path, select=total == source_total, fit=hw == source_hw)


def read_control_frames(cfg: RunConfig, video: Video, clip: ControlClip) -> Tensor:
    """The control frames as uint8 [n, H, W, 3], row i beside the source's row i."""
    from .inputs import frame_size

    sel = cfg.frames
    pick = dict(start=sel.start, end=sel.end, stride=sel.stride, max_frames=sel.max) if clip.select else {}
    control = read_video(clip.path, **pick, **({"size": frame_size(cfg)[0]} if clip.fit else {}))
    frames = control.frames
    if frames.shape != video.frames.shape:  # the checks above make this unreachable for well-formed clips
        raise ValueError(f"controlnet.video={clip.path}: read {tuple(frames.shape)}, the source's frames are "
                         f"{tuple(video.frames.shape)}")
    return frames


def check_conditions(cfg: RunConfig, video: Video) -> ControlClip | None:
    """Before the models load: the control clip lines up with the video (controlnet=frames), or OpenCV is
    there (controlnet=canny). None when the run needs no clip."""
    c: ControlNetConfig = cfg.controlnet
    if c.name == "canny":
        try:
            import cv2  # noqa: F401
        except ImportError:
            raise OpenCVMissing(OPENCV_MISSING) from None
    if c.name == "frames":
        return check_control_clip(cfg, video)
    return None


def make_conditions(cfg: RunConfig, video: Video, clip: ControlClip | None = None) -> Tensor | None:
    """The run's control frames, float32 [n, 3, H, W] in [0, 1]; None for controlnet=none."""
    c: ControlNetConfig = cfg.controlnet
    if c.name == "canny":
        return canny_edges(video.frames, c.low_threshold, c.high_threshold)
    if c.name == "frames":
        clip = check_control_clip(cfg, video) if clip is None else clip
        return frames_to_conditions(read_control_frames(cfg, video, clip))
    return None
