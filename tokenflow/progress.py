"""Progress bars on stderr, counted in frame-steps (one frame through one denoising or inversion step)."""

from __future__ import annotations

import sys

from tqdm import tqdm

from .edit import LoopWatch


class FrameStepBar:
    """A tqdm bar counted in frame-steps, so its rate reads as frames/s of a single step and its ETA
    covers the whole stage. The unit says frame-step, and with `frames` the label says how the total
    is made (`inversion, 16 frames x 19 steps: 0/304`), so a count larger than the clip does not read
    as frames."""

    def __init__(self, desc: str, total: int, enabled: bool, frames: int | None = None):
        if frames:
            desc = f"{desc}, {frames} frames x {total // frames} steps"
        self.bar = tqdm(total=total, desc=desc, unit="frame-step", disable=not enabled, file=sys.stderr, dynamic_ncols=True)

    def __call__(self, k: int) -> None:
        self.bar.update(k)

    def skip(self, k: int) -> None:
        """k frame-steps that cost nothing (cached): out of the total, so the ETA stays honest."""
        self.bar.total -= k
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


class ProgressWatch(LoopWatch):
    """The edit loop watched by a bar: each finished step ticks it by the frames this process computed."""

    def __init__(self, bar: FrameStepBar, frames: int, shard=None):
        super().__init__(shard)
        self.bar, self.frames = bar, frames

    def step_done(self, step: int, t: int, latents) -> None:
        self.bar(self.frames)
