"""Ctrl-C during a run: one line that says what was interrupted, what is cached and how to resume."""

from __future__ import annotations


class RunInterrupted(KeyboardInterrupt):
    """Raised in place of KeyboardInterrupt by the pipeline; its outputs are discarded as for any failure."""

    def __init__(self, stage: str, cache_dir: str | None, cached: int, frames: int):
        self.stage, self.cache_dir, self.cached, self.frames = stage, cache_dir, cached, frames
        if cache_dir is None:
            kept = "nothing is cached: the same command starts over"
        elif cached == 0:
            kept = f"no frame's inversion was finished yet (cache {cache_dir}): the same command starts over"
        elif cached < frames:
            kept = (f"the inverted latents of {cached}/{frames} frames are cached in {cache_dir}: "
                    f"the same command resumes with the other {frames - cached}")
        else:
            kept = f"the inverted latents of all {frames} frames are cached in {cache_dir}: the same command reuses them"
        super().__init__(f"interrupted during {stage}; no outputs were written; {kept}")

    def __str__(self) -> str:
        return self.args[0]
