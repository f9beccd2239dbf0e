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
    unet_frame_forwards: int = 0  # frames through the UNet while editing (each with its 3 branches), all steps (torchrun: all ranks)
    controlnet_frame_forwards: int = 0  # frames through the ControlNet while editing (each with its 2 edited branches; torchrun: all ranks)
    controlnet: dict | None = None  # condition, checkpoint, scale, guidance window (None: no ControlNet)
    # every stage's UNet forwards: {"inversion"|"edit"|"reconstruction": {"frame_forwards": frames through the
    # UNet, "sample_forwards": the same counting each prompt branch of a frame once}}; the inversion's are this
    # run's own (0 when the cache held every frame)
    unet_forwards: dict[str, dict[str, int]] = field(default_factory=dict)
    inversion_method: str | None = None  # ddim | ddpm (null: tokenflow.mode=reconstruction, no inversion)
    reconstruction_psnr_db: float | None = None  # output.reconstruction: the source sampled back from the inversion, against the source frames
    vae_round_trip_psnr_db: float | None = None  # the same of the VAE alone (decode(encode(frames))): the floor of the one above
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


EDIT_BRANCHES = 3  # the edit loop's forwards carry [source | negative | target] per frame


def unet_forwards(inversion, edit_frame_forwards: int, reconstruction) -> dict[str, dict[str, int]]:
    """run.json's `unet_forwards` from the stages' counts (inversion.Inversion and
    reconstruction.RunReconstruction or None, each with its unet_frame_forwards and branches)."""
    def entry(frames: int, branches: int) -> dict[str, int]:
        return {"frame_forwards": frames, "sample_forwards": frames * branches}

    out = {}
    if inversion is not None:
        out["inversion"] = entry(inversion.unet_frame_forwards, inversion.unet_branches)
        out["edit"] = entry(edit_frame_forwards, EDIT_BRANCHES)
    if reconstruction is not None:
        out["reconstruction"] = entry(reconstruction.unet_frame_forwards, reconstruction.branches)
    return out
