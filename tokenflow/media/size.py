"""Size: fit frames to the UNet's size grid (multiples of 64 px), by resizing and centre-cropping."""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from .frames import Video, check_frames


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
