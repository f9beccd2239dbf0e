"""Size: fit frames to the UNet's size grid (multiples of 64 px), by resizing and centre-cropping.

The fit is planned once from the source's (upright) frame size, as a `FitPlan`, and applied to any
number of frames: reading applies it to each frame as it is decoded, so a long 1080p clip edited at
512 never holds more than one full-resolution frame (see reading.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from .frames import Video, check_frames


def hw(h: int, w: int) -> str:
    """A size as the project writes it everywhere: [H, W], height first, as `size=[H, W]` and run.json's size."""
    return f"[{h}, {w}]"


@dataclass(frozen=True)
class FitPlan:
    """Resize (h, w) -> `resized`, then centre-crop to `target`; all (height, width) in pixels."""

    source: tuple[int, int]
    resized: tuple[int, int]
    target: tuple[int, int]

    @property
    def is_identity(self) -> bool:
        return self.source == self.resized == self.target

    def apply(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 [F, *source, 3] -> uint8 [F, *target, 3]."""
        if tuple(frames.shape[1:3]) != self.source:
            h, w = self.source
            raise ValueError(f"frames are {hw(frames.shape[1], frames.shape[2])}, the fit was planned for {hw(h, w)}")
        if self.resized != self.source:
            frames = _resize(frames, self.resized)
        if self.target != self.resized:
            top = (self.resized[0] - self.target[0]) // 2
            left = (self.resized[1] - self.target[1]) // 2
            frames = frames[:, top:top + self.target[0], left:left + self.target[1]].contiguous()
        return frames

    def note(self) -> str | None:
        """What the plan does, in words; None when it does nothing."""
        (h, w), did = self.source, []
        if self.resized != self.source:
            did.append(f"resized {hw(h, w)} -> {hw(*self.resized)}")
        if self.target != self.resized:
            did.append(
                f"centre-cropped to {hw(*self.target)}" if did
                else f"centre-cropped {hw(h, w)} -> {hw(*self.target)}"
            )
        return ", ".join(did) or None


def plan_fit(
    h: int, w: int, size: int | tuple[int, int] | None = None, multiple: int = 64, *, path: str = "video",
) -> FitPlan:
    """How to make an h x w frame fit the UNet's grid (see fit_to_size for what `size` means)."""
    if not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"multiple must be a positive int, got {multiple!r}")
    if size is None:
        if h < multiple or w < multiple:
            raise ValueError(f"{path}: {hw(h, w)} is smaller than {multiple} px on a side; pass size= to upscale")
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
    return FitPlan(source=(h, w), resized=resized, target=target)


def fit_to_size(video: Video, size: int | tuple[int, int] | None = None, multiple: int = 64) -> Video:
    """Resize and/or centre-crop so H and W are multiples of `multiple` (the UNet needs /64 px).

    size None: keep the scale, crop each side down to a multiple.
    size int: resize so the short side is `size` (aspect kept), then crop the long side.
    size (H, W): resize just enough to cover H x W (aspect kept), then crop to exactly H x W.
    A sentence saying what was done is appended to `notes`; nothing done, nothing appended.
    """
    if not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"multiple must be a positive int, got {multiple!r}")
    check_frames(video.frames, "video.frames")
    plan = plan_fit(video.height, video.width, size, multiple, path=video.path)
    if plan.is_identity:
        return video
    return replace(video, frames=plan.apply(video.frames), notes=[*video.notes, plan.note()])


def _resize(frames: torch.Tensor, hw: tuple[int, int], chunk: int = 8) -> torch.Tensor:
    """uint8 [F, H, W, 3] -> uint8 [F, h, w, 3], antialiased bilinear, a few frames at a time.

    Interpolated in uint8 (torch's channels-last kernel, PIL's filter): no float copy of the
    source frame, which for 1080p would be 24 MB per frame, and ~100x faster; within one level of
    interpolating in float and rounding."""
    out = []
    for part in frames.split(chunk):
        x = part.permute(0, 3, 1, 2)  # [f, 3, H, W] view of channels-last memory: what the uint8 kernel takes
        x = F.interpolate(x, size=hw, mode="bilinear", antialias=True, align_corners=False)
        out.append(x.permute(0, 2, 3, 1))  # [f, h, w, 3]
    return torch.cat(out).contiguous()
