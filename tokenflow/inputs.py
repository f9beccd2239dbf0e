"""The run's input video: `video=`, `frames.*` and `size=` made into the frames that are edited."""

from __future__ import annotations

from pathlib import Path

from .config import RunConfig
from .inversion_cache import default_cache_root
from .media import Video, read_video


def sample_clip_folder(cfg: RunConfig) -> Path:
    """Where `video=sample` keeps its generated clip: in the inversion cache's root, beside the
    latents inverted from it (inversion.cache_dir, else $TOKENFLOW_CACHE or ~/.cache/tokenflow/inversions)."""
    root = cfg.inversion.cache_dir
    return (default_cache_root() if root is None else Path(root)) / "sample_clip"


def frame_size(cfg: RunConfig):
    """read_video's `size` for the run's frames (and its control frames), with a note when the model names
    no native size: size=null is the model's native short side, full the input's size (None to the reader)."""
    size, note = cfg.size, None  # None (the model's native short side), "full", an int (short side) or [H, W]
    if size is None:
        size = cfg.model.native_size
        if size is None:
            note = f"model {cfg.model.source} names no native_size: keeping the input's size"
    elif size == "full":
        size = None  # the input's own size, centre-cropped to multiples of 64
    return (tuple(size) if isinstance(size, list) else size), note


def load_video(cfg: RunConfig) -> Video:
    """The selected frames of cfg's video, fitted to cfg's size (each frame as it is decoded, so
    memory holds run-size frames only)."""
    path = cfg.video
    if path == "sample":  # the project's own generated clip, so a fresh clone has something to edit
        from .media.sample_clip import cached_sample_clip

        path = cached_sample_clip(sample_clip_folder(cfg))
    size, note = frame_size(cfg)
    sel = cfg.frames
    folder = Path(path).is_dir()
    video = read_video(path, start=sel.start, end=sel.end, stride=sel.stride, max_frames=sel.max,
                       fps=sel.folder_fps if folder else None, size=size, audio=cfg.output.audio)
    if folder:  # images carry no clock: the rate is the setting's, and the user should know it is not the camera's
        video.notes.insert(0, f"{path} is a folder of images, which carry no frame rate: read at {sel.folder_fps:g} fps "
                              f"(frames.folder_fps=N sets another)")
    if note:
        video.notes.append(note)
    return video
