"""The web app's stages as plain functions, one at a time, over one process's loaded models.

    invert     read, encode and invert the clip (the inversion cache), then sample it back: source | reconstruction
    keyframes  one denoising step's keyframes (Alg. 1's draw) edited jointly with extended attention (Eq. 3-4)
    nn_field   paper Fig. 3 between a frame and its nearest keyframe of that step (tokenflow.figures)
    edit       the whole run, exactly as `tokenflow` runs it (pipeline.run_edit), into a run folder

Each stage takes the run's settings as the command line composes them (form.Form -> load_config)
and calls the project's public functions; a `Workbench` keeps the models and the prepared source
between stages, so a stage reuses what the one before made. A stop request ends the running stage
where Ctrl-C would (the inversion keeps the frames it finished in its cache; an edit writes nothing):
the progress callbacks raise KeyboardInterrupt, which the pipeline turns into its one-line message.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
import threading
import traceback
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..config import ConfigError, RunConfig
from ..device import device_error_line, pick_device, pick_dtype
from ..edit import EditSettings, LoopWatch, edit_video_latents, keyframes_at
from ..figures.layout import tile_grid, upsample_nearest
from ..figures.nn_field import nn_field_image
from ..figures.tokens import default_step
from ..interrupt import RunInterrupted
from ..inversion import decode_latents
from ..media import from_model_range
from ..models import build_models
from ..models.loading import ModelNotAvailable
from ..pipeline import random_weights_warning, run_edit
from ..progress import listening
from ..prompts import embed_prompts
from ..source import SourceVideo, prepare_source
from .reconstruct import psnr, sample_source_back

VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif")
SHOWN_FRAMES = 8  # the invert stage's strip shows at most this many frames, evenly spaced
MIN_TILE = 128  # pixels: smaller frames are shown enlarged
Progress = Callable[[float | None, str], None]  # (fraction done, None: unknown; what) -> the page's progress bar

# the errors a user's input or machine causes: one line in the page, as the command line prints it
USER_ERRORS = (ConfigError, ModelNotAvailable, FileNotFoundError, ValueError, FloatingPointError)


class StopRequested(KeyboardInterrupt):
    """The page's stop button, raised where the stage next reports progress (as Ctrl-C would be)."""

    def __init__(self, phase: str):
        if phase == "the inversion":
            kept = ("the frames it finished are in the inversion cache, and the next stage resumes from them; "
                    "nothing else was written")
        else:
            kept = "nothing was written"
        super().__init__(f"stopped during {phase}; {kept}")

    def __str__(self) -> str:
        return self.args[0]


@dataclass
class StageResult:
    message: str  # one line (or a few): what happened, or the error as the command line says it
    ok: bool = True
    images: dict[str, np.ndarray] = field(default_factory=dict)  # uint8 [H, W, 3] by name
    frames: dict[str, torch.Tensor] = field(default_factory=dict)  # the frames shown, uint8 [k, H, W, 3] by row
    files: dict[str, str] = field(default_factory=dict)  # outputs by name
    facts: dict | None = None  # run.json's contents (edit)


_digests: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> content digest: typing re-reads nothing


def save_upload(path: str | Path, folder: Path) -> Path:
    """A clip the page received, copied to `folder` under its content's digest: a stable path for
    the command shown (the upload's temporary one vanishes) and the inversion cache's key."""
    path = Path(path)
    if path.suffix.lower() not in VIDEO_SUFFIXES:
        raise ValueError(f"{path.name}: not a video file this app reads (use one of {', '.join(VIDEO_SUFFIXES)})")
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _digests:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _digests[key] = h.hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    kept = folder / f"{_digests[key]}{path.suffix.lower()}"
    if not kept.exists():
        fd, tmp = tempfile.mkstemp(prefix=".upload-", dir=folder)
        os.close(fd)
        shutil.copyfile(path, tmp)
        os.replace(tmp, kept)  # atomic: a second request never reads half a copy
    return kept


def source_key(cfg: RunConfig) -> tuple:
    """What the prepared source depends on: the clip, its selection and size, the model, the
    sampling steps (their timesteps are kept) and the inversion; not the edit's own settings."""
    keep = ("video", "frames", "size", "inversion_prompt", "steps", "model", "inversion", "device", "dtype")
    d = cfg.to_dict()
    video = Path(cfg.video)
    changed = (video.stat().st_size, video.stat().st_mtime_ns) if video.is_file() else None  # a file rewritten in place
    return tuple(repr(d[k]) for k in keep) + (cfg.tokenflow.ff_chunk, changed)


def evenly_spaced(n: int, count: int) -> list[int]:
    count = min(count, n)
    return sorted({round(i * (n - 1) / max(count - 1, 1)) for i in range(count)})


def nearest_keyframe(frame: int, keyframes: list[int]) -> int:
    """The keyframe closest to `frame`, other than itself (ties: the earlier one)."""
    others = [k for k in keyframes if k != frame]
    if not others:
        raise ValueError(f"frame {frame} is the step's only keyframe: no other keyframe to match it with")
    return min(others, key=lambda k: (abs(k - frame), k))


class _StoppableWatch(LoopWatch):
    """The keyframes stage's loop watch: progress after each step, and the stop button."""

    def __init__(self, bench: Workbench, steps: int, progress: Progress):
        super().__init__()
        self.bench, self.steps, self.progress = bench, steps, progress

    def step_done(self, step: int, t: int, latents) -> None:
        self.progress((step + 1) / self.steps, f"keyframes: step {step + 1}/{self.steps}")
        self.bench.check_stop()


class Workbench:
    """One process's stages: the loaded models and the prepared source kept between them, one stage
    at a time (a second caller waits for the lock), and a stop request for the running one."""

    def __init__(self, out_root: Path | str = "outputs"):
        self.out_root = Path(out_root)
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.running: str | None = None  # the stage that holds the lock
        self.phase = ""  # what it is doing: a stop message names it
        self.owner: str | None = None  # who asked for it (the page's session)
        self.models_key, self.models = None, None
        self.source_key, self.source = None, None

    # ------------------------------------------------------------------ shared parts

    def check_stop(self) -> None:
        if self.stop_event.is_set():
            raise StopRequested(self.phase)

    def request_stop(self, owner: str | None = None) -> str:
        """Stop the running stage if `owner` started it (None: whoever did)."""
        if self.running is None:
            return "nothing is running"
        if owner is not None and self.owner != owner:
            return f"the running {self.running} stage is another visitor's: yours starts when it ends"
        self.stop_event.set()
        return f"stopping {self.running} at its next step"

    def models_for(self, cfg: RunConfig):
        """cfg.model's models on cfg's device, loaded once and kept while the settings name them."""
        device = pick_device(cfg.device)
        dtype = pick_dtype(cfg.dtype, device)
        key = (repr(asdict(cfg.model)), device, str(dtype))
        if key != self.models_key:
            self.models_key, self.models, self.source_key, self.source = None, None, None, None  # free the old first
            self.models = build_models(cfg.model, device=device, dtype=dtype)
            self.models_key = key
        return self.models

    def source_for(self, cfg: RunConfig, progress: Progress) -> SourceVideo:
        """The clip read, encoded and inverted (through the inversion cache), kept for the next
        stages; the prompts embedded afresh (the target prompt may have changed)."""
        key = source_key(cfg)
        if key != self.source_key:
            models = self.models_for(cfg)
            self.source_key, self.source = None, None

            done = 0

            def on_progress(k: int) -> None:  # k more frames through one inversion step
                nonlocal done
                done += k
                progress(None, f"inverting the clip: {done} frame-steps")
                self.check_stop()

            progress(None, "reading the clip, loading the model")
            self.phase = "the inversion"
            src = prepare_source(cfg, models=models, on_progress=on_progress)
            self.source_key, self.source = key, src
        self.phase = self.running or ""
        src = self.source
        src.cfg = cfg
        src.prompts, src.warnings = embed_prompts(src.models, cfg, src.device)
        return src

    @contextmanager
    def stage(self, name: str, owner: str | None = None):
        """Hold the one-stage lock while `name` runs (waiting for the stage before it to end)."""
        with self.lock:
            self.running, self.owner, self.phase = name, owner, name
            self.stop_event.clear()
            try:
                yield
            finally:
                self.running, self.owner = None, None
                self.stop_event.clear()

    def run(self, name: str, work: Callable[[], StageResult], owner: str | None = None) -> StageResult:
        """A stage's work, its failures as the command line words them (one line, no traceback)."""
        with self.stage(name, owner):
            try:
                return work()
            except (RunInterrupted, StopRequested) as e:  # the pipeline's Ctrl-C message, or the stop outside it
                return StageResult(str(e), ok=False)
            except KeyboardInterrupt:
                return StageResult(f"interrupted during {self.phase}; nothing was written", ok=False)
            except USER_ERRORS as e:
                return StageResult(f"error: {e}", ok=False)
            except RuntimeError as e:
                line = device_error_line(e)
                if line is not None:
                    return StageResult(f"error: {line}", ok=False)
                return self._bug(name)
            except Exception:
                return self._bug(name)

    @staticmethod
    def _bug(name: str) -> StageResult:
        traceback.print_exc(file=sys.stderr)  # the server's log keeps it; the page gets one line
        kind, value = sys.exc_info()[:2]
        return StageResult(f"error: {name} failed with {kind.__name__}: {value} (a bug: the traceback is in the server's log)",
                           ok=False)

    # ------------------------------------------------------------------ the stages

    def invert(self, cfg: RunConfig, progress: Progress = lambda f, s: None, owner: str | None = None) -> StageResult:
        def work() -> StageResult:
            src = self.source_for(cfg, progress)

            def on_step(done: int, total: int) -> None:
                progress(done / total, "sampling the source prompt back")
                self.check_stop()

            recon = sample_source_back(src, on_step)
            shown = evenly_spaced(src.frames.shape[0], SHOWN_FRAMES)
            image = strip({"source": src.frames[shown], "reconstruction": recon[shown]}, shown)
            n, (h, w) = src.frames.shape[0], src.frames.shape[1:3]
            lines = [f"inverted {n} frames, size [{h}, {w}] (H, W), {cfg.inversion.steps} inversion steps, "
                     f"{len(src.timesteps)} sampling steps; the source prompt sampled back: PSNR {psnr(recon, src.frames):.2f} dB"]
            return StageResult(_with_warnings(lines, cfg, src.video.warnings + src.warnings), images={"invert": image},
                               frames={"source": src.frames, "reconstruction": recon})

        return self.run("invert", work, owner)

    def keyframes(self, cfg: RunConfig, step: int | None = None, progress: Progress = lambda f, s: None,
                  owner: str | None = None) -> StageResult:
        def work() -> StageResult:
            settings = EditSettings.from_config(cfg)
            if settings.mode not in ("tokenflow", "fixed_keyframes"):
                raise ValueError(f"tokenflow.mode={settings.mode} draws no keyframes: the keyframes stage needs "
                                 "tokenflow.mode=tokenflow or fixed_keyframes")
            src = self.source_for(cfg, progress)
            n = src.frames.shape[0]
            at = _check_step(step, len(src.timesteps))
            keyframes = keyframes_at(settings, n, at)
            # the keyframes alone, every step's pass attending across them all (extended attention):
            # the keyframe pass of Alg. 1 run on this step's draw
            joint = replace(settings, mode="extended_all")
            latents = {t: x[keyframes] for t, x in src.source_latents.items()}
            maps = src.inversion.noise_maps  # DDPM inversion: each keyframe samples with its own rows
            maps = None if maps is None else {t: z[keyframes] for t, z in maps.items()}
            watch = _StoppableWatch(self, len(src.timesteps), progress)
            edited, _ = edit_video_latents(src.models.unet, src.models.config.schedule, joint, src.prompts, latents,
                                           src.clean[keyframes], src.timesteps, watch, noise_maps=maps)
            frames = from_model_range(decode_latents(src.models.vae, edited, cfg.inversion.batch_size))
            image = strip({"source": src.frames[keyframes], "edited jointly": frames}, keyframes)
            lines = [f"step {at}'s keyframes {keyframes} (of {n} frames, one per interval of {settings.keyframe_interval}) "
                     f"edited jointly with extended attention, {settings.method}, every step on these frames"]
            if cfg.controlnet.name != "none":
                lines.append("this preview runs without ControlNet; the edit stage applies it")
            return StageResult(_with_warnings(lines, cfg, src.warnings), images={"keyframes": image},
                               frames={"source": src.frames[keyframes], "edited jointly": frames})

        return self.run("keyframes", work, owner)

    def nn_field(self, cfg: RunConfig, frame: int, step: int | None = None, progress: Progress = lambda f, s: None,
                 owner: str | None = None) -> StageResult:
        def work() -> StageResult:
            # the keyframes the edit would draw (tokenflow's draw in the modes that draw none)
            drawn = cfg.tokenflow.mode if cfg.tokenflow.mode in ("tokenflow", "fixed_keyframes") else "tokenflow"
            settings = EditSettings.from_config(replace(cfg, tokenflow=replace(cfg.tokenflow, mode=drawn)))
            src = self.source_for(cfg, progress)
            n = src.frames.shape[0]
            if not 0 <= frame < n:
                raise ValueError(f"frame {frame} is outside the clip's {n} selected frames (0..{n - 1})")
            at = _check_step(step, len(src.timesteps))
            keyframes = keyframes_at(settings, n, at)
            source = nearest_keyframe(frame, keyframes)
            fig = nn_field_image(src, source, frame, step=at)
            r = fig.result
            lines = [f"NN field of frame {frame} onto keyframe {source} (step {at}'s keyframes {keyframes}), "
                     f"{fig.layer} input tokens, a {list(fig.grid)} (H, W) grid: RGB warp error {r.warp_error:.1f} "
                     f"(not warping: {r.identity_error:.1f}), token cosine {r.recon_cosine:.3f} "
                     f"(same place: {r.identity_cosine:.3f})"]
            return StageResult(_with_warnings(lines, cfg, []), images={"nn_field": fig.image})

        return self.run("NN field", work, owner)

    def edit(self, cfg: RunConfig, progress: Progress = lambda f, s: None, owner: str | None = None) -> StageResult:
        def work() -> StageResult:
            models = self.models_for(cfg)
            out_dir = self.out_root / datetime.now().strftime("%Y-%m-%d") / datetime.now().strftime("%H-%M-%S-%f")

            def listener(stage: str, done: int, total: int) -> None:
                progress(done / max(total, 1), stage)
                self.check_stop()

            progress(None, "reading and encoding the clip")
            with listening(listener):
                facts = run_edit(cfg, out_dir, models=models)
            lines = [f"wrote {facts.frames} frames, size {facts.size} (H, W), at {facts.fps:g} fps into {out_dir}"]
            lines += [f"warning: {w}" for w in facts.warnings]
            files = {**facts.outputs, "run.json": str(out_dir / "run.json")}
            return StageResult("\n".join(lines), files=files, facts=asdict(facts))

        return self.run("edit", work, owner)


def strip(rows: dict[str, torch.Tensor], frames: list[int]) -> np.ndarray:
    """Rows of frames (uint8 [k, H, W, 3] each) as one labelled image, small frames enlarged (nearest)."""
    h, w = next(iter(rows.values())).shape[1:3]
    factor = max(1, -(-MIN_TILE // min(h, w)))
    tiles = [[upsample_nearest(f.numpy(), factor) for f in row] for row in rows.values()]
    return tile_grid(tiles, row_labels=list(rows), col_labels=[f"frame {i}" for i in frames])[0]


def _check_step(step: int | None, n_steps: int) -> int:
    step = default_step(n_steps) if step is None else int(step)
    if not 0 <= step < n_steps:
        raise ValueError(f"step {step} is outside the {n_steps} denoising steps of this run (0..{n_steps - 1})")
    return step


def _with_warnings(lines: list[str], cfg: RunConfig, warnings: list[str]) -> str:
    noise = random_weights_warning(cfg)
    return "\n".join(lines + [f"warning: {w}" for w in ([noise] if noise else []) + list(warnings)])
