"""An edit from video file to video files: `run_edit(cfg, out_dir)`, one call per stage.

    read -> models -> encode -> prompts -> invert -> edit (Alg. 1, edit.py) -> decode -> [reconstruct] -> write -> report

Each stage is one call into the module that owns it. With `controlnet=canny|frames` the read stage
also makes the control frames (control_conditions.py), the models stage loads the ControlNet first
(models/build.py: a ControlNet of the other family fails before any weight is read) and the edit
takes it as a ControlNetGuide (controlnet_guide.py). `RunStages` is the one place that times the
stages, measures peak memory and turns Ctrl-C into a line naming the stage; `outputs.py` writes
everything or nothing. The settings arrive checked (config.RunConfig), so nothing here validates.
Under torchrun (distributed.py) each process encodes, inverts and edits its share of the frames,
and rank 0 writes.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from .config import RunConfig
from .control_conditions import check_conditions, make_conditions
from .controlnet_guide import ControlNetGuide
from .device import cpu_threads, pick_device, pick_dtype
from .distributed import Ranks, rank_facts, remove_own_run_dir
from .edit import EditSettings, edit_video_latents, first_step
from .inputs import load_video
from .interrupt import RunInterrupted
from .inversion import Inversion, decode_latents, encode_frames, invert_for_run, inversion_steps_per_frame, kept_timesteps
from .inversion_cache import open_for_run
from .measure import PeakMemory, Stopwatch
from .media import from_model_range, to_model_range
from .models import build_models
from .models.build import build_controlnet, check_controlnet_fits
from .outputs import output_fps, staged_outputs, write_outputs, write_run_facts
from .progress import FrameStepBar, ProgressWatch
from .prompts import embed_prompts
from .reconstruction import reconstruct_for_run
from .run_facts import RunFacts, unet_forwards

RANDOM_WEIGHTS_WARNING = ("model.source=random: the weights are random (model=tiny and model=tiny_sd15 have no others), so the "
                          "output is noise, not an edit; this run shows that the pipeline works end to end, not what TokenFlow does")
PER_FRAME_STAGES = ("encode", "inversion", "editing", "decode", "reconstruction")  # run.json's seconds_per_frame


def say(message: str) -> None:
    print(f"[tokenflow] {message}", file=sys.stderr)


def random_weights_warning(cfg: RunConfig) -> str | None:
    return RANDOM_WEIGHTS_WARNING if cfg.model.source == "random" else None


class RunStages:
    """Seconds and peak memory of a run's stages, and Ctrl-C inside one of them as RunInterrupted."""

    def __init__(self, device: str):
        self.memory = PeakMemory(device)  # reset now: this run's peak, not the process's
        self.watch = Stopwatch(device)
        self.cache = None  # the inversion cache, once opened: a Ctrl-C message says what it holds
        self.frames = 0

    @contextmanager
    def stage(self, name: str, lap: bool = True):
        """The block is stage `name`: timed when it ends (lap=False: it laps itself)."""
        try:
            yield
        except RunInterrupted:
            raise
        except KeyboardInterrupt:
            n = self.frames
            cached = 0 if self.cache is None else n - len(self.cache.missing(list(range(n))))
            raise RunInterrupted(name.replace("_", " "), None if self.cache is None else str(self.cache.dir), cached, n) from None
        if lap:
            self.watch.lap(name)


def run_edit(cfg: RunConfig, out_dir: Path | str, *, models=None) -> RunFacts | None:
    """One edit of cfg's video into `out_dir`: config.yaml, edited.mp4, side_by_side.mp4 (unless
    output.side_by_side=false), frames/ (output.png_frames=true) and run.json, all or none of them.
    Returns the run's facts (None on a torchrun rank other than 0, which writes nothing).
    `models`: cfg.model's models already built on cfg's device and dtype (a long-lived process such as
    the web app keeps them loaded between runs); None builds them."""
    with cpu_threads(cfg.threads):  # before any heavy work: threads= holds for every stage
        return _run_edit(cfg, Path(out_dir), models)


def _run_edit(cfg: RunConfig, out_dir: Path, models=None) -> RunFacts | None:
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    settings = None if cfg.tokenflow.mode == "reconstruction" else EditSettings.from_config(cfg)
    ranks = Ranks.from_env(device)  # torchrun: this process edits a share of the frames, rank 0 writes
    own_dir = out_dir
    if ranks is not None:
        ranks.check_mode(cfg.tokenflow.mode)
        out_dir = ranks.broadcast(out_dir)  # rank 0's run dir (Hydra names each rank's by its own clock)
        cfg = replace(cfg, progress=cfg.progress and ranks.is_root)
    run = RunStages(device)
    warnings = [w for w in [random_weights_warning(cfg)] if w]
    try:
        return _run_stages(cfg, out_dir, settings, device, dtype, ranks, run, warnings, models)
    finally:
        if ranks is not None:
            remove_own_run_dir(ranks, own_dir, out_dir)
            ranks.close()


def _run_stages(cfg: RunConfig, out_dir: Path, settings: EditSettings | None, device, dtype, ranks: Ranks | None,
                run: RunStages, warnings: list[str], models=None) -> RunFacts | None:
    # 1. read: the selected frames, fitted to the run's size (uint8 [n, H, W, 3]); ControlNet's control
    # frames beside them (float [n, 3, H, W] in [0, 1]; None without ControlNet)
    with run.stage("read_video"):
        video = load_video(cfg)
        conditions = None if settings is None else make_conditions(cfg, video, check_conditions(cfg, video))
    for line in video.notes + [f"warning: {w}" for w in video.warnings + warnings]:
        say(line)  # once the input reads (a run refused for its input says that only), and the warnings again at the end
    n = video.num_frames
    shard = None if ranks is None else ranks.shard(n)  # torchrun: this process's share of the frames
    own = list(range(n)) if shard is None else shard.frames
    run.frames = len(own)

    # 2. models: the ControlNet (checked against the preset before any weight is read), then UNet, VAE,
    # text encoder, tokenizer (tokenflow/models)
    with run.stage("load_models"):
        controlnet = None if conditions is None else build_controlnet(cfg.controlnet, cfg.model, device=device, dtype=dtype)
        models = build_models(cfg.model, device=device, dtype=dtype) if models is None else models
        models.unet.set_feed_forward_chunk(cfg.tokenflow.ff_chunk)
        if controlnet is not None:
            check_controlnet_fits(controlnet, models.unet, cfg.controlnet, cfg.model)

    # 3. encode: VAE posterior means, float32 (the DDIM state)  [len(own), 4, H/8, W/8]
    with run.stage("encode"):
        clean = encode_frames(models.vae, to_model_range(video.frames[own[0]: own[-1] + 1]), cfg.inversion.batch_size)

    edited_latents, record, reused, forwards, cn_forwards = clean, None, 0, 0, 0  # reconstruction: the clean latents, decoded
    inversion = recon = None
    if settings is not None:
        # 4. prompts: the inversion (source), negative and target prompts' embeddings
        with run.stage("encode_prompts"):
            prompts, prompt_warnings = embed_prompts(models, cfg, device)
        for w in prompt_warnings:  # a prompt cut to CLIP's 77 tokens
            say(f"warning: {w}")
        # 5. invert: DDIM or DDPM inversion of the original frames (Alg. 1 line 1), cached per frame
        with run.stage("inversion"):
            timesteps = models.config.schedule.timesteps(cfg.steps).tolist()
            inversion, reused = _invert(cfg, video, models, clean, prompts, timesteps, dtype, shard, run)
        # 6. edit: Alg. 1 at every denoising step (edit.py)
        with run.stage("editing"):
            guide = None if controlnet is None else ControlNetGuide(
                controlnet, conditions, scale=cfg.controlnet.scale, start=cfg.controlnet.guidance_start,
                end=cfg.controlnet.guidance_end, chunk=cfg.tokenflow.batch_size)
            edited_latents, record, (forwards, cn_forwards) = _edit(cfg, models, settings, prompts, inversion, clean,
                                                                    timesteps, shard, guide)
        warnings = warnings + prompt_warnings

    # 7. decode: the edited latents back to uint8 frames [len(own), H, W, 3]
    with run.stage("decode"):
        edited = from_model_range(decode_latents(models.vae, edited_latents, cfg.inversion.batch_size))

    # 8. reconstruct (output.reconstruction=true): the inversion prompt sampled back from the inversion
    if cfg.output.reconstruction and inversion is not None:
        with run.stage("reconstruction"):
            recon = reconstruct_for_run(cfg, models, inversion, prompts, clean, video.frames[own[0]: own[-1] + 1])

    fps, lost_sound = output_fps(cfg, video)  # the source's rate unless output.fps names one
    facts = RunFacts(
        video=str(video.path), frames=n, source_indices=list(video.indices), size=[video.height, video.width],
        fps=float(fps), notes=list(video.notes), model=cfg.model.name if cfg.model.source == "random" else str(cfg.model.source),
        mode=cfg.tokenflow.mode, method=cfg.method.name, prompt=cfg.prompt, device=device,
        dtype=str(dtype).replace("torch.", ""), inversion_cache=None if run.cache is None else str(run.cache.dir),
        inversion_frames_reused=reused, warnings=warnings + video.warnings + ([lost_sound] if lost_sound else []),
        source=asdict(video.source), unet_frame_forwards=forwards, controlnet_frame_forwards=cn_forwards,
        controlnet=None if controlnet is None else controlnet_facts(cfg), started=run.watch.started,
        threads=torch.get_num_threads(),
        keyframes_per_step=[] if record is None else record.keyframes, timesteps=[] if record is None else record.timesteps,
        inversion_method=None if inversion is None else inversion.method,
    )
    if recon is not None:  # its PSNRs over the clip (torchrun: every rank's errors, frames to rank 0)
        facts.reconstruction_psnr_db, facts.vae_round_trip_psnr_db = recon.psnrs(shard)
    if shard is not None:  # torchrun: every rank's decoded frames to rank 0, which writes; the others are done
        facts.ranks = rank_facts(ranks, shard, device, run.watch.timings, reused, run.memory.report())
        facts.inversion_frames_reused = sum(r["inversion_frames_reused"] for r in facts.ranks)
        if inversion is not None:  # forwards of all ranks together
            facts.unet_frame_forwards, facts.controlnet_frame_forwards, inversion.unet_frame_forwards = ranks.sum(
                (forwards, cn_forwards, inversion.unet_frame_forwards))
        edited = shard.gather_to_root(edited)
        if edited is None:
            return None
    facts.unet_forwards = unet_forwards(inversion, facts.unet_frame_forwards, recon)

    # 9. write, 10. report: every output staged, run.json last, all moved into place together
    with run.stage("write", lap=False), staged_outputs(out_dir) as stage:
        outputs = write_outputs(stage, cfg, video, video.frames, edited, fps, with_sound=not lost_sound,
                                reconstruction=None if recon is None else recon.frames)
        run.watch.lap("write")
        facts.timings_s = dict(run.watch.timings)
        facts.seconds_per_frame = {k: round(v / n, 4) for k, v in facts.timings_s.items() if k in PER_FRAME_STAGES}
        facts.peak_memory_mb = run.memory.report()
        facts.notes += [run.memory.note] if run.memory.note else []
        facts.outputs = {k: str(v) for k, v in outputs.items()}
        facts.finished = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        write_run_facts(stage, facts)
    return facts


def _invert(cfg: RunConfig, video, models, clean, prompts, timesteps: list[int], dtype, shard, run: RunStages):
    """The inversion cfg.inversion asks for, of `clean`, through the run's cache, with a progress bar
    -> (inversion.Inversion: {t: [n, 4, h, w]} float32 on the CPU, and DDPM's noise maps; the
    number of frames the cache already held)."""
    keep = kept_timesteps(timesteps, cfg.inversion.skip)  # the edit's steps: a skipped step needs no inversion
    cache = open_for_run(cfg, video, list(range(video.num_frames)), keep, dtype, may_clear=shard is None or shard.ranks.is_root)
    cache = run.cache = cache if shard is None or cache is None else shard.cache_view(cache)  # numbered as the whole clip's
    n = clean.shape[0]
    own = list(range(n)) if shard is None else shard.frames
    grid = inversion_steps_per_frame(cfg, models.config.schedule, keep)
    bar = FrameStepBar("inversion", n * grid, cfg.progress, frames=n)
    reused = 0

    def on_reuse(k: int) -> None:
        nonlocal reused
        reused = k
        bar.skip(k * grid)
        say(f"reusing cached inversion of {k}/{n} frames from {cache.dir}")

    try:
        inversion = invert_for_run(cfg, models.unet, models.config.schedule, clean, prompts, keep,
                                   frame_ids=[video.indices[i] for i in own], cache=cache, on_progress=bar, on_reuse=on_reuse)
    finally:
        bar.close()
    if cache is not None and reused < n:
        say(f"inverted latents cached in {cache.dir}")
    return inversion, reused


def controlnet_facts(cfg: RunConfig) -> dict:
    """run.json's `controlnet`: what steered the edit."""
    from .models.build import controlnet_source

    c = cfg.controlnet
    facts = {"condition": c.name, "checkpoint": controlnet_source(c, cfg.model), "scale": c.scale,
             "guidance_start": c.guidance_start, "guidance_end": c.guidance_end}
    facts.update({"low_threshold": c.low_threshold, "high_threshold": c.high_threshold} if c.name == "canny" else {"video": c.video})
    return facts


def _edit(cfg: RunConfig, models, settings: EditSettings, prompts, inversion: Inversion, clean, timesteps: list[int], shard,
          controlnet: ControlNetGuide | None):
    """Alg. 1 with a progress bar -> (edited latents of this process's frames, the loop's record,
    (UNet frame-forwards, ControlNet frame-forwards))."""
    frames = clean.shape[0]
    source_latents, noise_maps = inversion.latents, inversion.noise_maps
    steps = len(timesteps) - first_step(settings, len(timesteps))
    bar = FrameStepBar(f"editing ({settings.mode}, {settings.method})", frames * steps, cfg.progress, frames=frames)
    watch = ProgressWatch(bar, frames, shard=shard)
    if shard is not None:  # the loop indexes clip-sized tensors: this rank's rows filled, keyframe rows exchanged
        source_latents, clean = shard.full_source(source_latents), shard.full(clean)
        noise_maps = None if noise_maps is None else shard.full_source(noise_maps)
    try:
        latents, record = edit_video_latents(models.unet, models.config.schedule, settings, prompts, source_latents, clean,
                                             timesteps, watch=watch, noise_maps=noise_maps, controlnet=controlnet)
    finally:
        bar.close()
    forwards = (watch.unet_frame_forwards, watch.controlnet_frame_forwards)
    return (latents if shard is None else shard.own_rows(latents)), record, forwards
