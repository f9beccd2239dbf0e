"""Frames as the rest of the project sees them: the `Video` record (uint8 [F, H, W, 3] RGB frames,
the source frame rate, which source frames they are) and the conversions to and from the model's
[-1, 1] range.

Frame rate and stride: `Video.fps` is the SOURCE frame rate. Keeping every `stride`-th frame makes
the kept frames `stride` times further apart in time, so the edit must be written at
`Video.output_fps == fps / stride` to play at the source speed (same duration as the source span).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .audio import SourceAudio


@dataclass
class SourceInfo:
    """What the source file is, for the run facts (RunFacts.source)."""

    pixel_format: str | None = None  # as decoded, e.g. yuv420p10le (converted to 8-bit RGB on reading)
    bit_depth: int | None = None
    rotation: int = 0  # counter-clockwise degrees the frames were turned to stand upright
    vfr: bool = False  # variable frame rate: frames were picked by timestamp (timing.py)
    frame_rate: str | None = None  # the constant rate the frames are taken at (for VFR: the average)
    audio: str | None = None  # what the outputs' sound is, None when they have none


@dataclass
class Video:
    frames: torch.Tensor  # uint8 [F, H, W, 3] RGB
    fps: Fraction  # source frame rate (see module doc for stride)
    path: str
    indices: list[int]  # source frame index of each row of `frames`
    notes: list[str] = field(default_factory=list)  # human sentences: what was selected, resized, cropped
    stride: int = 1
    start_time: Fraction = Fraction(0)  # seconds on the source's clock where the first frame is shown
    source: SourceInfo = field(default_factory=lambda: SourceInfo())
    audio: SourceAudio | None = None  # the span's sound, when asked for and the source has it
    warnings: list[str] = field(default_factory=list)  # what could not be done (e.g. unreadable audio)

    @property
    def output_fps(self) -> Fraction:
        """The rate to write these frames at so they play at the source speed."""
        return self.fps / self.stride

    @property
    def duration(self) -> Fraction:
        """Seconds of the source the frames cover (and the written videos last)."""
        return self.num_frames / self.output_fps

    @property
    def num_frames(self) -> int:
        return self.frames.shape[0]

    @property
    def height(self) -> int:
        return self.frames.shape[1]

    @property
    def width(self) -> int:
        return self.frames.shape[2]


def to_model_range(frames: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [F, H, W, 3] -> float [F, 3, H, W] in [-1, 1] (what the VAE encoder takes)."""
    check_frames(frames, "frames")
    return (frames.permute(0, 3, 1, 2).to(dtype) / 127.5 - 1.0).contiguous()


def from_model_range(images: torch.Tensor) -> torch.Tensor:
    """float [F, 3, H, W] in [-1, 1] -> uint8 [F, H, W, 3]; values outside the range are clamped."""
    if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError(f"images must be float [F, 3, H, W], got {images.dtype} {tuple(images.shape)}")
    x = ((images.float() + 1.0) * 127.5).clamp(0, 255).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous()  # [F, H, W, 3]


def check_frames(frames, what: str) -> None:
    if not isinstance(frames, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor (uint8 [F, H, W, 3]), got {type(frames).__name__}")
    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"{what} must be uint8 [F, H, W, 3] RGB, got {frames.dtype} {tuple(frames.shape)}")
    if frames.shape[0] < 1 or frames.shape[1] < 1 or frames.shape[2] < 1:
        raise ValueError(f"{what} is empty: shape {tuple(frames.shape)}")


def side_by_side(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """uint8 [F, H, W1, 3] and [F, H, W2, 3] -> [F, H, W1 + W2, 3] (source | edit, for viewing)."""
    check_frames(left, "left")
    check_frames(right, "right")
    if left.shape[0] != right.shape[0] or left.shape[1] != right.shape[1]:
        raise ValueError(
            f"side_by_side needs the same frame count and height: left is {tuple(left.shape)}, "
            f"right is {tuple(right.shape)} ([F, H, W, 3])"
        )
    return torch.cat([left, right.to(left.device)], dim=2)


def as_fraction(fps, what: str) -> Fraction:
    try:
        # limit_denominator turns a float like 29.97002997 back into 30000/1001
        value = fps if isinstance(fps, Fraction) else Fraction(fps).limit_denominator(10_000)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a positive number, got {fps!r}") from None
    if value <= 0:
        raise ValueError(f"{what} must be a positive number, got {fps!r}")
    return value


def fmt_fps(fps: Fraction) -> str:
    return str(fps.numerator) if fps.denominator == 1 else f"{float(fps):.3f}"
