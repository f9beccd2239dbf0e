"""Keyframe sampling (paper Sec. 4.1 and appendix A).

At every denoising step TokenFlow draws one random frame in each interval of `interval` frames
([0, 8), [8, 16), ..., and the last, possibly shorter, interval), from a seeded generator, so a
seeded run draws the same keyframes again. Redrawing them at each step makes the edit robust to any
particular choice. The `fixed` mode is the paper's "w/o random keyframes" ablation: the same evenly
spaced keyframes (first and last frame included) at every step.
"""

from __future__ import annotations

import math

import torch


def random_keyframes(n_frames: int, interval: int, generator: torch.Generator) -> list[int]:
    """One uniformly drawn frame in each interval; sorted."""
    _check(n_frames, interval)
    picks = []
    for start in range(0, n_frames, interval):
        length = min(interval, n_frames - start)
        picks.append(start + int(torch.randint(length, (1,), generator=generator)))
    return picks


def fixed_keyframes(n_frames: int, interval: int) -> list[int]:
    """As many keyframes as the random mode draws, evenly spaced from the first to the last frame."""
    _check(n_frames, interval)
    count = math.ceil(n_frames / interval)
    if count == 1:
        return [n_frames // 2]
    return sorted({round(i * (n_frames - 1) / (count - 1)) for i in range(count)})


def _check(n_frames: int, interval: int) -> None:
    if n_frames < 1:
        raise ValueError(f"keyframes: need at least one frame, got {n_frames}")
    if interval < 1:
        raise ValueError(f"keyframes: keyframe_interval must be >= 1, got {interval}")
