"""The project's own sample clip, drawn procedurally: a sky over rolling hills with a moving sun, a
spinning kite (a rotated square) and a bouncing ball, while the camera pans slowly to the right.

Why this scene: it has a textured background, objects that move and rotate (so temporal
consistency is visible), and it is a "landscape" an edit prompt like "a watercolor painting" or
"a snowy winter scene" makes sense on. Deterministic for a given seed; no files needed.

    python -m tokenflow.media.sample_clip sample.mp4 --frames 16 --size 256
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from .writing import write_video


def render_sample_frames(frames: int = 16, size: int = 256, seed: int = 0) -> torch.Tensor:
    """uint8 [frames, size, size, 3] RGB of the sample scene."""
    if not isinstance(frames, int) or frames < 1:
        raise ValueError(f"frames must be an int >= 1, got {frames!r}")
    if not isinstance(size, int) or size < 16:
        raise ValueError(f"size must be an int >= 16 (pixels), got {size!r}")
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.rand(*shape, generator=g)

    # Coordinates in [0, 1], pixel centres; y grows downwards. [S, S] each.
    c = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    y, x = torch.meshgrid(c, c, indexing="ij")
    px = 1.0 / size  # one pixel in these units: the width of the antialiased edges

    def cover(signed_distance):  # inside < 0; a one-pixel soft edge instead of jaggies
        return (0.5 - signed_distance / px).clamp(0, 1)[..., None]  # [S, S, 1]

    def paint(img, mask, colour):
        return img * (1 - mask) + colour * mask

    sky_top = torch.tensor([0.20, 0.35, 0.75]) + 0.1 * rand(3)
    sky_low = torch.tensor([0.85, 0.80, 0.70]) + 0.1 * rand(3)
    hill_a = torch.tensor([0.25, 0.55, 0.20]) + 0.1 * rand(3)
    hill_b = torch.tensor([0.45, 0.45, 0.15]) + 0.1 * rand(3)
    phases = rand(8) * 2 * math.pi
    kite_colour = torch.tensor([0.85, 0.15, 0.20])
    ball_colour = torch.tensor([0.95, 0.85, 0.20]) * (0.9 + 0.1 * rand(3))

    out = torch.empty(frames, size, size, 3, dtype=torch.uint8)
    for f in range(frames):
        t = f / max(frames, 2)  # 0 .. <1 over the clip
        pan = 0.25 * t  # camera moves right: the background scrolls left

        # sky: vertical gradient plus soft cloud bands
        img = sky_low + (sky_top - sky_low) * (1 - y[..., None]) ** 1.5  # [S, S, 3]
        clouds = (torch.sin(9 * (x + pan * 0.5) + phases[0]) * torch.sin(23 * y + 3 * x + phases[1])).clamp(min=0)
        img = img + 0.12 * (clouds * (y < 0.6))[..., None]

        # sun crossing the sky
        sun_x, sun_y = 0.15 + 0.6 * t, 0.22 - 0.08 * math.sin(math.pi * t)
        sun = cover(torch.sqrt((x - sun_x) ** 2 + (y - sun_y) ** 2) - 0.09)
        img = paint(img, sun, torch.tensor([1.0, 0.9, 0.55]))

        # two hill layers; the far one scrolls slower (parallax), furrow stripes give texture
        for depth, base, colour, ph in ((0.5, 0.58, hill_b, phases[2]), (1.0, 0.70, hill_a, phases[3])):
            u = x + pan * depth
            horizon = base + 0.06 * torch.sin(2 * math.pi * 1.3 * u + ph) + 0.025 * torch.sin(2 * math.pi * 3.7 * u + ph * 2)
            stripes = 0.5 + 0.5 * torch.sin(60 * (y - horizon) + 8 * torch.sin(5 * u + phases[4]))
            shade = colour * (0.8 + 0.25 * stripes[..., None]) * (1.1 - 0.4 * (y - horizon).clamp(min=0)[..., None])
            img = paint(img, cover(horizon - y), shade)

        # spinning kite: a square rotated by angle, drifting across the sky
        kx, ky, half = 0.72 - 0.3 * t, 0.35 + 0.05 * math.sin(4 * math.pi * t), 0.08
        a = 2 * math.pi * t
        ux = (x - kx) * math.cos(a) + (y - ky) * math.sin(a)
        uy = -(x - kx) * math.sin(a) + (y - ky) * math.cos(a)
        box = torch.maximum(ux.abs(), uy.abs()) - half
        shade = (0.75 + 0.25 * (ux - uy) / (2 * half)).clamp(0.5, 1.0)[..., None]
        img = paint(img, cover(box), kite_colour * shade)

        # ball bouncing on the near hill
        bx = 0.2 + 0.6 * t
        by = 0.80 - 0.30 * abs(math.sin(3 * math.pi * t))
        r = 0.065
        d = torch.sqrt((x - bx) ** 2 + (y - by) ** 2)
        light = (1.15 - 0.45 * torch.sqrt((x - bx + 0.3 * r) ** 2 + (y - by + 0.3 * r) ** 2) / r).clamp(0.6, 1.1)
        img = paint(img, cover(d - r), ball_colour * light[..., None])

        out[f] = (img.clamp(0, 1) * 255).round().to(torch.uint8)
    return out


def make_sample_clip(path: Path | str, frames: int = 16, size: int = 256, fps: int = 20, seed: int = 0) -> Path:
    """Render the sample scene and write it as H.264 mp4 at `path`; returns the path."""
    return write_video(path, render_sample_frames(frames, size, seed), fps)


# Part of the cached clip's file name: bump it whenever render_sample_frames draws something else,
# or runs would keep editing the clip an older version drew.
SAMPLE_VERSION = 1


def cached_sample_clip(folder: Path | str, frames: int = 16, size: int = 256, fps: int = 20, seed: int = 0) -> Path:
    """The sample clip in `folder`, rendered and written the first time it is asked for.

    Why a cache and not the run's folder: a run's folder should hold that run's outputs only, and
    a failed run nothing at all; and one file reused by every run keeps the same bytes, so the
    inversion cache (keyed by the clip's digest) is reused too. The name holds every parameter;
    the write is atomic (write_video), so a file that exists is whole, even with runs in parallel.
    """
    path = Path(folder) / f"sample_v{SAMPLE_VERSION}_{frames}f_{size}px_{fps}fps_seed{seed}.mp4"
    if not path.is_file():
        make_sample_clip(path, frames, size, fps, seed)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the project's procedurally drawn sample clip (mp4).")
    parser.add_argument("out", type=Path, help="output .mp4 path")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=256, help="width = height in pixels")
    parser.add_argument("--fps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = make_sample_clip(args.out, args.frames, args.size, args.fps, args.seed)
    print(f"wrote {path} ({args.frames} frames, {args.size}x{args.size}, {args.fps} fps)")


if __name__ == "__main__":
    main()
