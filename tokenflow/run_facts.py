"""run.json: what a run did, in numbers a user or a tool reads back."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RunFacts:
    video: str
    frames: int
    source_indices: list[int]
    size: list[int]  # [H, W]
    fps: float  # frames per second of the outputs (the source's / frames.stride, or output.fps)
    notes: list[str]
    model: str
    mode: str
    method: str
    prompt: str
    device: str
    dtype: str
    threads: int = 0  # torch's CPU threads during the run (threads=, else torch's default)
    timings_s: dict[str, float] = field(default_factory=dict)
    seconds_per_frame: dict[str, float] = field(default_factory=dict)
    keyframes_per_step: list[list[int]] = field(default_factory=list)
    unet_frame_forwards: int = 0  # frames through the UNet while editing (each with its 3 branches), all steps
    controlnet_frame_forwards: int = 0  # frames through the ControlNet while editing (each with its 2 edited branches)
    controlnet: dict | None = None  # condition, checkpoint, scale, guidance window (None: no ControlNet)
    timesteps: list[int] = field(default_factory=list)
    inversion_cache: str | None = None
    inversion_frames_reused: int = 0
    peak_memory_mb: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    outputs: dict[str, str] = field(default_factory=dict)
    started: str = ""  # UTC, ISO 8601: when run_edit began and finished (overlapping runs of a parallel sweep show)
    finished: str = ""
    ranks: list[dict] = field(default_factory=list)  # torchrun: each rank's frames, timings, memory (distributed.py)
    source: dict = field(default_factory=dict)  # media.SourceInfo: pixel format, rotation, vfr, frame rate, audio
