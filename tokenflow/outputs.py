"""A run's outputs (config.yaml, edited.mp4, side_by_side.mp4, reconstruction.mp4, frames/, run.json), written all or none.

Every output goes into one hidden staging folder inside the run dir (the same file system, so moving
it into place is a rename) and is published only once all of them are written; run.json lands last.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import asdict
from fractions import Fraction
from pathlib import Path

import torch

from .config import RunConfig
from .media import Video, side_by_side, write_png_frames, write_video
from .run_facts import RunFacts


def output_fps(cfg: RunConfig, video: Video) -> tuple[Fraction, str | None]:
    """The rate the videos are written at, and a warning when it costs the sound. By default the
    source's (fps / frames.stride: the clip plays at the source's speed); output.fps=N writes at N
    (the released TokenFlow code writes at a fixed 10, 20 or 30). At any other rate than the
    source's the sound is left out: it would play at its own speed, out of step with the frames."""
    wanted = cfg.output.fps
    if wanted is None:
        return video.output_fps, None
    fps = Fraction(wanted).limit_denominator(1001)
    if fps == video.output_fps or video.audio is None or not cfg.output.audio:
        return fps, None
    return fps, (f"output.fps={wanted:g} differs from the source's {float(video.output_fps):g} fps: the videos play "
                 f"{float(fps / video.output_fps):.3g}x as fast and are written without the sound, which could not stay in sync")


STAGING_PREFIX = ".tokenflow-partial-"  # the staging folder's name in the run dir, while a run writes


class StagedOutputs:
    """A run's outputs, written under temporary names in the run dir and moved into place together.

    Every output goes into one hidden staging folder inside the run dir (the same file system, so
    moving it into place is a rename) and is published, in the order written, only once all of
    them are written; run.json, written last, lands last. Until then the run dir holds none of
    this run's outputs, and `discard` removes the staging folder.
    """

    def __init__(self, out_dir: Path):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.out_dir = out_dir
        self.staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out_dir))
        self.names: list[str] = []

    def path(self, name: str) -> Path:
        """Where to write output `name` (a file or a folder) now; `publish` moves it to `final(name)`."""
        self.names.append(name)
        return self.staging / name

    def final(self, name: str) -> Path:
        return self.out_dir / name

    def publish(self) -> None:
        """Move every output into place, replacing what an earlier run in the same dir left there."""
        replaced = self.staging / ".replaced"
        for name in self.names:
            target = self.final(name)
            if target.is_dir() and not target.is_symlink():
                # a rename cannot replace a non-empty folder (an earlier run's frames/): set it aside
                replaced.mkdir(exist_ok=True)
                target.rename(replaced / name)
            os.replace(self.staging / name, target)
        shutil.rmtree(self.staging)

    def discard(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)


@contextmanager
def staged_outputs(out_dir: Path):
    """A StagedOutputs that is published when the block ends and discarded when it raises."""
    stage = StagedOutputs(out_dir)
    try:
        yield stage
        stage.publish()
    except BaseException:
        stage.discard()
        raise


def _readable(path: Path) -> Path:
    """Give a file written through a private temp file (mode 0600) the mode of any new file (0644
    under the usual umask 022), like the run's other outputs."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
    return path


def write_outputs(stage: StagedOutputs, cfg: RunConfig, video: Video, frames: torch.Tensor, edited: torch.Tensor,
                  fps: Fraction, with_sound: bool, reconstruction: torch.Tensor | None = None) -> dict[str, Path]:
    """config.yaml, the videos and the PNG frames of one run into `stage` -> {output: final path}.
    `frames`, `edited`: uint8 [n, H, W, 3] source and decoded edit; `fps`, `with_sound`: as output_fps decided;
    `reconstruction`: uint8 [n, H, W, 3], the source sampled back from the inversion (output.reconstruction)."""
    from omegaconf import OmegaConf

    crf = cfg.output.crf
    outputs = {"config": stage.final("config.yaml"), "edited": stage.final("edited.mp4")}
    stage.path("config.yaml").write_text(OmegaConf.to_yaml(cfg.to_dict()), encoding="utf-8")  # the settings this run ran with
    audio = video.audio if with_sound and cfg.output.audio else None  # the edited span's sound
    _readable(write_video(stage.path("edited.mp4"), edited, fps, crf=crf, audio=audio))
    if cfg.output.side_by_side:
        _readable(write_video(stage.path("side_by_side.mp4"), side_by_side(frames, edited), fps, crf=crf, audio=audio))
        outputs["side_by_side"] = stage.final("side_by_side.mp4")
    if reconstruction is not None:
        _readable(write_video(stage.path("reconstruction.mp4"), reconstruction, fps, crf=crf, audio=audio))
        outputs["reconstruction"] = stage.final("reconstruction.mp4")
    if cfg.output.png_frames:
        write_png_frames(stage.path("frames"), edited)
        outputs["png_frames"] = stage.final("frames")
    return outputs


def write_run_facts(stage: StagedOutputs, facts: RunFacts) -> None:
    """run.json, the last output written (so it lands last). `ranks` is there under torchrun only."""
    data = asdict(facts)
    if not data["ranks"]:
        del data["ranks"]
    stage.path("run.json").write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")
