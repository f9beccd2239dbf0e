"""The demo's "image editor": a colour stylisation whose parameters jitter from frame to frame.

An image diffusion model edits each frame a little differently (another texture, another shade);
here that is imitated by a colour grade (hue rotation, saturation, contrast, gain) whose
parameters are drawn per frame around a base look. Applied to every frame it flickers, as a
per-frame edit does; applied to keyframes only and propagated, the jitter is shared by all the
frames built from the same keyframes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Grade:
    hue_deg: float = 35.0  # rotation of the chroma plane
    saturation: float = 1.5
    contrast: float = 1.15
    gain: float = 1.0


@dataclass(frozen=True)
class Jitter:
    """Standard deviations of the per-frame draws around the base Grade."""

    hue_deg: float = 12.0
    saturation: float = 0.25
    contrast: float = 0.08
    gain: float = 0.06


def frame_grades(n_frames: int, base: Grade = Grade(), jitter: Jitter = Jitter(), seed: int = 0) -> list[Grade]:
    """One Grade per frame, drawn from a seeded generator (frame i always gets the same grade)."""
    g = torch.Generator().manual_seed(seed)
    draws = torch.randn(n_frames, 4, generator=g, dtype=torch.float64)
    return [
        Grade(
            hue_deg=base.hue_deg + jitter.hue_deg * float(d[0]),
            saturation=max(0.0, base.saturation + jitter.saturation * float(d[1])),
            contrast=max(0.1, base.contrast + jitter.contrast * float(d[2])),
            gain=max(0.1, base.gain + jitter.gain * float(d[3])),
        )
        for d in draws
    ]


def apply_grade(image: Tensor, grade: Grade) -> Tensor:
    """image float [3, H, W] RGB in [0, 1] -> graded, clamped to [0, 1].

    Luma y = 0.299 R + 0.587 G + 0.114 B stays the axis; the chroma (RGB - y) is rotated by hue_deg
    about the grey axis and scaled by saturation; contrast acts around mid grey, gain multiplies.
    """
    luma = (torch.tensor([0.299, 0.587, 0.114], dtype=image.dtype)[:, None, None] * image).sum(0, keepdim=True)
    chroma = image - luma  # [3, H, W]
    a = math.radians(grade.hue_deg)
    axis = torch.ones(3, dtype=image.dtype) / math.sqrt(3)
    # Rodrigues rotation about the grey axis: R = cos a I + sin a [k]x + (1 - cos a) k k^T
    kx = torch.tensor([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]], dtype=image.dtype)
    rotation = math.cos(a) * torch.eye(3, dtype=image.dtype) + math.sin(a) * kx + (1 - math.cos(a)) * torch.outer(axis, axis)
    chroma = torch.einsum("ij,jhw->ihw", rotation, chroma) * grade.saturation
    out = (luma + chroma - 0.5) * grade.contrast + 0.5
    return (out * grade.gain).clamp(0, 1)


def edit_frames(images: Tensor, grades: list[Grade], frames: list[int] | None = None) -> Tensor:
    """images float [F, 3, H, W] in [0, 1]; edits `frames` (default all), frame i with grades[i]
    -> [len(frames), 3, H, W]."""
    frames = list(range(images.shape[0])) if frames is None else frames
    return torch.stack([apply_grade(images[i], grades[i]) for i in frames])
