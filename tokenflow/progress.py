"""Progress bars on stderr, counted in frame-steps (one frame through one denoising or inversion step)."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterator

from tqdm import tqdm

from .edit import LoopWatch


Listener = Callable[[str, int, int], None]  # (stage, frame-steps done, total)
_listener: ContextVar[Listener | None] = ContextVar("frame_step_listener", default=None)


@contextmanager
def listening(listener: Listener) -> Iterator[None]:
    """Every FrameStepBar made inside the block also reports each tick to listener(stage, done, total):
    a page's progress bar. Raising in it (KeyboardInterrupt) stops the run there as Ctrl-C does."""
    token = _listener.set(listener)
    try:
        yield
    finally:
        _listener.reset(token)


class FrameStepBar:
    """A tqdm bar counted in frame-steps, so its rate reads as frames/s of a single step and its ETA
    covers the whole stage. The unit says frame-step, and with `frames` the label says how the total
    is made (`inversion, 16 frames x 19 steps: 0/304`), so a count larger than the clip does not read
    as frames."""

    def __init__(self, desc: str, total: int, enabled: bool, frames: int | None = None):
        if frames:
            desc = f"{desc}, {frames} frames x {total // frames} steps"
        self.bar = tqdm(total=total, desc=desc, unit="frame-step", disable=not enabled, file=sys.stderr, dynamic_ncols=True)
        self.desc, self.done, self.total = desc, 0, total
        self.listener = _listener.get()

    def __call__(self, k: int) -> None:
        self.bar.update(k)
        self.done += k
        self._tell()

    def skip(self, k: int) -> None:
        """k frame-steps that cost nothing (cached): out of the total, so the ETA stays honest."""
        self.bar.total -= k
        self.total -= k
        self.bar.refresh()
        self._tell()

    def _tell(self) -> None:
        if self.listener is not None:
            self.listener(self.desc, self.done, self.total)

    def close(self) -> None:
        self.bar.close()


class ProgressWatch(LoopWatch):
    """The edit loop watched by a bar: each finished step ticks it by the frames this process computed."""

    def __init__(self, bar: FrameStepBar, frames: int, shard=None):
        super().__init__(shard)
        self.bar, self.frames = bar, frames

    def step_done(self, step: int, t: int, latents) -> None:
        self.bar(self.frames)
