"""An edit from video file to video files: read, encode, invert (cached), edit, decode, write.

`run_edit(cfg, out_dir)` takes the resolved Hydra config (see conf/config.yaml) as a plain dict-like
object. Everything that can be checked cheaply (video, size, prompts, settings) is checked before
the models run. The outputs (config.yaml, edited.mp4, side_by_side.mp4, frames/, run.json) are
written all or nothing: into a staging folder inside the run dir, moved into place together once
every one of them is written, so a failed run leaves none of them behind.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from fractions import Fraction
from pathlib import Path

import torch
from tqdm import tqdm

from sampler.ddim import inversion_timesteps

from .device import DeviceError, device_error_line, init_device, pick_device, pick_dtype  # noqa: F401 (re-exported)
from .distributed import Ranks, rank_facts, remove_own_run_dir
from .measure import PROCESS_PEAK_NOTE, PeakMemory, Stopwatch  # noqa: F401
from .edit import MODES, EditSettings, PromptEmbeddings, edit_video_latents
from .inversion import decode_latents, encode_frames, invert_frames
from .inversion_cache import InversionCache, default_cache_root, model_file_stats, video_digest
from .models import TINY_SOURCES
from .media import READER_VERSION, Video, from_model_range, read_video, side_by_side, to_model_range, write_png_frames, write_video

RECONSTRUCTION = "reconstruction"  # Table 1's "LDM recon.": encode and decode only, no edit
ALL_MODES = (*MODES, RECONSTRUCTION)  # every tokenflow.mode conf/config.yaml documents
RANDOM_WEIGHTS_WARNING = ("the tiny models (model=tiny, model=tiny_sd15) have random weights: the output is noise, not an edit; this run shows that the "
                          "pipeline works end to end, not what TokenFlow does (real weights: the default model=sd21_base)")
# the stages of a run, in order, as the Stopwatch names them (the first one without a time is running)
STAGES = ("read_video", "load_models", "encode", "encode_prompts", "inversion", "editing", "decode", "write")


@dataclass
class RunFacts:
    video: str
    frames: int
    source_indices: list[int]
    size: list[int]  # [H, W]
    fps: float  # frames per second of the outputs (the source's / frames.stride)
    notes: list[str]
    model: str
    mode: str
    method: str
    prompt: str
    device: str
    dtype: str
    timings_s: dict[str, float] = field(default_factory=dict)
    seconds_per_frame: dict[str, float] = field(default_factory=dict)
    keyframes_per_step: list[list[int]] = field(default_factory=list)
    unet_frame_forwards: int = 0  # frames through the UNet while editing (each with its 3 branches), all steps
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


def sample_clip_folder(cfg) -> Path:
    """Where `video=sample` keeps its generated clip: in the inversion cache's root, beside the
    latents inverted from it (inversion.cache_dir, else $TOKENFLOW_CACHE or ~/.cache/tokenflow/inversions)."""
    root = cfg["inversion"]["cache_dir"]
    return (default_cache_root() if root is None else Path(root)) / "sample_clip"


def load_video(cfg) -> Video:
    """The selected frames of cfg's video, fitted to cfg's size."""
    path, sel = cfg["video"], cfg["frames"]
    if path == "sample":  # the project's own generated clip, so a fresh clone has something to edit
        from .media.sample_clip import cached_sample_clip

        path = cached_sample_clip(sample_clip_folder(cfg))
    size, note = cfg["size"], None  # None (the model's native short side), "full", an int (short side) or [H, W]
    if size is None:
        size = cfg["model"].get("native_size")  # 512 for SD-2.1-base, 768 for SD-2.1
        if size is None:
            note = f"model {cfg['model']['source']} names no native_size: keeping the input's size"
    elif size == "full":
        size = None  # the input's own size, centre-cropped to multiples of 64
    elif isinstance(size, str):
        raise ValueError(f"size must be null (the model's native size), full, a short side in pixels or [H, W], got {size!r}")
    # each frame is fitted as it is decoded: memory holds run-size frames only (media/reading.py)
    video = read_video(path, start=sel["start"], end=sel["end"], stride=sel["stride"], max_frames=sel["max"],
                       size=size if size is None or isinstance(size, int) else tuple(size),
                       audio=bool(cfg["output"].get("audio", True)))
    if note:
        video.notes.append(note)
    return video


def random_weights_warning(cfg) -> str | None:
    """A warning for the run facts and the console when the model's weights are random."""
    return RANDOM_WEIGHTS_WARNING if cfg["model"]["source"] in TINY_SOURCES else None


def tokenize_prompts(tokenizer, prompts: dict[str, str]) -> tuple[torch.Tensor, list[str]]:
    """{name: text} -> token ids [len(prompts), 77] in that order, and the tokenizer's warnings
    (a prompt cut to 77 tokens) with the prompt named by its config key."""
    ids, messages = [], []
    for name, text in prompts.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ids.append(tokenizer([text]))
        for w in caught:
            message = str(w.message)
            messages.append(f"{name} {message[len('prompt 0 '):]}" if message.startswith("prompt 0 ") else f"{name}: {message}")
    return torch.cat(ids), messages


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run, with one line that says what was interrupted, what is cached and how
    to resume (the staged outputs are discarded as for any failure)."""

    def __init__(self, stage: str, cache_dir: str | None, cached: int, frames: int):
        self.stage, self.cache_dir, self.cached, self.frames = stage, cache_dir, cached, frames
        if cache_dir is None:
            kept = "nothing is cached: the same command starts over"
        elif cached < frames:
            kept = (f"the inverted latents of {cached}/{frames} frames are cached in {cache_dir}: "
                    f"the same command resumes with the other {frames - cached}")
        else:
            kept = f"the inverted latents of all {frames} frames are cached in {cache_dir}: the same command reuses them"
        super().__init__(f"interrupted during {stage}; no outputs were written; {kept}")

    def __str__(self) -> str:
        return self.args[0]


def _cached_frames(cache, n: int) -> int:
    return 0 if cache is None else n - len(cache.missing(list(range(n))))


def check_output_fps(value) -> None:
    """output.fps: null (the source's rate) or a positive number of frames per second."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
        raise ValueError(f"output.fps must be null (the source's rate, fps / frames.stride) or a number > 0, got {value!r}")


def output_fps(cfg, video: Video) -> tuple[Fraction, str | None]:
    """The rate the videos are written at, and a warning when it costs the sound. By default the
    source's (fps / frames.stride: the clip plays at the source's speed); output.fps=N writes at N
    (the released TokenFlow code writes at a fixed 10, 20 or 30). At any other rate than the
    source's the sound is left out: it would play at its own speed, out of step with the frames."""
    wanted = cfg["output"].get("fps")
    check_output_fps(wanted)
    if wanted is None:
        return video.output_fps, None
    fps = Fraction(wanted).limit_denominator(1001)
    if fps == video.output_fps or video.audio is None or not cfg["output"].get("audio", True):
        return fps, None
    return fps, (f"output.fps={wanted} differs from the source's {float(video.output_fps):g} fps: the videos play "
                 f"{float(fps / video.output_fps):.3g}x as fast and are written without the sound, which could not stay in sync")


def check_prompt(prompt, what: str) -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{what} is empty: say what the edit should make of the video, e.g. prompt=\"a marble sculpture of a wolf\"")
    return prompt


def load_model_bundle(cfg, device: str, dtype: torch.dtype):
    m = cfg["model"]
    if m["source"] in TINY_SOURCES:  # tiny (SD-2.x-shaped) or tiny_sd15
        from .models.tiny import build_tiny_models

        return build_tiny_models(seed=m.get("seed", 0), dtype=dtype, device=device, source=m["source"])
    from .models.loading import load_models

    return load_models(m["source"], dtype=dtype, device=device, variant=m.get("variant"), prediction_type=m.get("prediction_type"))


def edit_settings(cfg) -> EditSettings:
    tf, method = cfg["tokenflow"], cfg["method"]
    return EditSettings(
        mode=tf["mode"], method=method["name"], guidance_scale=cfg["guidance_scale"],
        keyframe_interval=tf["keyframe_interval"], weighting=tf["weighting"], batch_size=tf["batch_size"],
        propagation=tf.get("propagation", "paper"), reuse_keyframes=tf.get("reuse_keyframes", True),
        seed=cfg["seed"], query_chunk=tf["query_chunk"],
        pnp_qk_fraction=method.get("qk_fraction", 0.5), pnp_feature_fraction=method.get("feature_fraction", 0.8),
        pnp_qk_layers=tuple(method.get("qk_layers", EditSettings.pnp_qk_layers)),
        pnp_feature_layers=tuple(method.get("feature_layers", EditSettings.pnp_feature_layers)),
        sdedit_strength=method.get("strength", 0.6),
    )


class FrameStepBar:
    """A tqdm bar counted in frame-steps (one frame through one denoising step), so its rate reads
    as frames/s of a single step and its ETA covers the whole stage."""

    def __init__(self, desc: str, total: int, enabled: bool):
        self.bar = tqdm(total=total, desc=desc, unit="frame", disable=not enabled, file=sys.stderr, dynamic_ncols=True)

    def __call__(self, k: int) -> None:
        self.bar.update(k)

    def close(self) -> None:
        self.bar.close()


@dataclass
class SourceVideo:
    """The original video made ready for editing (paper Alg. 1, line 1): frames as read and
    resized, the models, clean latents, prompt embeddings and the inverted latents at every
    sampling timestep (float32 like all DDIM state, kept in host memory: [n, 4, h, w] per timestep adds up
    to steps x n latents, so each step moves only its own timestep to the device)."""

    cfg: dict  # the resolved configuration it was prepared with
    video: Video
    frames: torch.Tensor  # uint8 [n, H, W, 3]: video.frames, or the chosen positions of it
    models: object  # tokenflow.models.loading.Models
    device: str
    dtype: torch.dtype
    clean: torch.Tensor  # [n, 4, h, w] scaled VAE posterior means
    prompts: PromptEmbeddings | None = None  # None when only reconstructing
    timesteps: list[int] = field(default_factory=list)
    source_latents: dict[int, torch.Tensor] = field(default_factory=dict)
    inversion_cache: str | None = None
    inversion_frames_reused: int = 0
    warnings: list[str] = field(default_factory=list)
    shard: object = None  # distributed.FrameShard under torchrun: clean/source_latents are its rows


def prepare_source(
    cfg, *, stopwatch: Stopwatch | None = None, positions: list[int] | None = None, invert: bool = True,
    ranks: Ranks | None = None,
) -> SourceVideo:
    """Read and fit the video, load the models, VAE-encode, embed the prompts and DDIM-invert
    (cached). `positions`: only these frames of the selection (a figure of two frames needs no
    more). `invert=False` stops after encoding (the reconstruction baseline). `ranks` (torchrun):
    this process encodes and inverts only its share of the frames (src.shard; clean and source
    latents hold its rows only). Writes nothing but the caches (inversion, generated sample clip)."""
    device = pick_device(cfg["device"])
    watch = stopwatch or Stopwatch(device)
    show = bool(cfg.get("progress", True))
    dtype = pick_dtype(cfg["dtype"], device)
    video = load_video(cfg)
    for note in video.notes:
        print(f"[tokenflow] {note}", file=sys.stderr)
    for message in video.warnings:
        print(f"[tokenflow] warning: {message}", file=sys.stderr)
    if positions is None:
        positions = list(range(video.num_frames))
    bad = [i for i in positions if not 0 <= i < video.num_frames]
    if bad:
        raise ValueError(f"frames {bad} are outside the clip's {video.num_frames} selected frames (0..{video.num_frames - 1})")
    frames = video.frames[positions]
    n = len(positions)
    watch.lap("read_video")
    models = load_model_bundle(cfg, device, dtype)
    models.unet.set_feed_forward_chunk(cfg["tokenflow"]["ff_chunk"])
    watch.lap("load_models")
    shard = None if ranks is None else ranks.shard(n)
    own = frames if shard is None else frames[shard.frames[0]: shard.frames[-1] + 1]
    clean = encode_frames(models.vae, to_model_range(own), cfg["inversion"]["batch_size"])
    n = clean.shape[0]  # the frames this process encodes and inverts (all but under torchrun)
    watch.lap("encode")
    src = SourceVideo(cfg=cfg, video=video, frames=frames, models=models, device=device, dtype=dtype, clean=clean, shard=shard)
    if not invert:
        return src

    ids, src.warnings = tokenize_prompts(models.tokenizer, {
        "inversion_prompt": cfg["inversion_prompt"], "negative_prompt": cfg["negative_prompt"], "prompt": cfg["prompt"]})
    for message in src.warnings:
        print(f"[tokenflow] warning: {message}", file=sys.stderr)
    with torch.no_grad():
        emb = models.text_encoder(ids.to(device))
    src.prompts = PromptEmbeddings(source=emb[0:1], negative=emb[1:2], target=emb[2:3])
    schedule = models.config.schedule
    src.timesteps = schedule.timesteps(cfg["steps"]).tolist()
    inv = cfg["inversion"]
    cache = None
    if inv["cache"]:
        model = cfg["model"]
        is_tiny = model["source"] in TINY_SOURCES
        cache = InversionCache.for_run(
            inv["cache_dir"], video_digest=video_digest(video.path), indices=[video.indices[i] for i in positions],
            size=[video.height, video.width], model_id=str(model["source"]), inversion_steps=inv["steps"],
            keep_timesteps=src.timesteps, prompt=cfg["inversion_prompt"],
            # a local path alone does not say which weights are there now (see model_file_stats)
            model_files=None if is_tiny else model_file_stats(model["source"]),
            extra={"dtype": str(dtype).replace("torch.", ""), "seed": model.get("seed", 0) if is_tiny else None,
                   "variant": model.get("variant"), "prediction_type": model.get("prediction_type"),
                   "reader": READER_VERSION},  # how the file's frames were read (media/reading.py)
        )
        if inv["force"] and (shard is None or shard.ranks.is_root):
            cache.clear()
        if shard is not None:
            cache = shard.cache_view(cache)  # keyed and numbered as the whole selection's
        src.inversion_cache = str(cache.dir)
    watch.lap("encode_prompts")
    inversion_grid = inversion_timesteps(schedule, inv["steps"], src.timesteps)  # the path each frame climbs
    bar = FrameStepBar("inversion", n * len(inversion_grid), show)

    def reused(k: int) -> None:
        src.inversion_frames_reused = k
        bar.bar.total -= k * len(inversion_grid)  # cached frames cost nothing: keep the ETA honest
        bar.bar.refresh()
        print(f"[tokenflow] reusing cached inversion of {k}/{n} frames from {cache.dir}", file=sys.stderr)

    try:
        source_latents = invert_frames(
            models.unet, schedule, clean, src.prompts.source, inversion_steps=inv["steps"], keep_timesteps=src.timesteps,
            batch_size=inv["batch_size"], cache=cache, on_progress=bar, on_reuse=reused,
        )
    except KeyboardInterrupt:  # Ctrl-C: say which frames the cache kept (each is saved as it finishes)
        bar.close()
        raise RunInterrupted("inversion", src.inversion_cache, _cached_frames(cache, n), n) from None
    bar.close()
    if cache is not None and src.inversion_frames_reused < n:
        print(f"[tokenflow] inverted latents cached in {cache.dir}", file=sys.stderr)
    src.source_latents = source_latents  # float32 (the DDIM state), stays on the CPU
    watch.lap("inversion")
    return src


STAGING_PREFIX = ".tokenflow-partial-"  # the staging folder's name in the run dir, while a run writes


class StagedOutputs:
    """A run's outputs, written under temporary names in the run dir and moved into place together.

    Every output goes into one hidden staging folder inside the run dir (the same file system, so
    moving it into place is a rename) and is published, in the order written, only once all of
    them are written; run.json, written last, lands last. Until then the run dir holds none of
    this run's outputs, and `discard` removes the staging folder (Hydra's .hydra/ and log are not ours).
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


def write_outputs(stage: StagedOutputs, cfg, src: SourceVideo, edited: torch.Tensor, fps: Fraction,
                  with_sound: bool) -> dict[str, Path]:
    """config.yaml, the videos and the PNG frames of one run into `stage` -> {output: final path}.
    `edited`: uint8 [n, H, W, 3] decoded edit; `fps`, `with_sound`: as output_fps decided."""
    from omegaconf import OmegaConf

    crf = cfg["output"]["crf"]
    outputs = {"config": stage.final("config.yaml"), "edited": stage.final("edited.mp4")}
    stage.path("config.yaml").write_text(OmegaConf.to_yaml(cfg))  # the resolved config this run ran with
    audio = src.video.audio if with_sound and cfg["output"].get("audio", True) else None  # the edited span's sound
    _readable(write_video(stage.path("edited.mp4"), edited, fps, crf=crf, audio=audio))
    if cfg["output"]["side_by_side"]:
        _readable(write_video(stage.path("side_by_side.mp4"), side_by_side(src.frames, edited), fps, crf=crf, audio=audio))
        outputs["side_by_side"] = stage.final("side_by_side.mp4")
    if cfg["output"]["png_frames"]:
        write_png_frames(stage.path("frames"), edited)
        outputs["png_frames"] = stage.final("frames")
    return outputs


def run_edit(cfg, out_dir: Path | str) -> RunFacts:
    """One edit of cfg's video into `out_dir`: config.yaml, edited.mp4, side_by_side.mp4 (unless
    output.side_by_side=false), frames/ (output.png_frames=true) and run.json, all or none of them."""
    out_dir = Path(out_dir)
    mode = cfg["tokenflow"]["mode"]
    if mode not in ALL_MODES:
        raise ValueError(f"tokenflow.mode must be one of {', '.join(ALL_MODES)}, got {mode!r}")
    is_reconstruction = mode == RECONSTRUCTION
    # cheap checks first: nothing runs (or is written) for a bad mode, fraction, strength or prompt
    settings = None if is_reconstruction else edit_settings(cfg)
    prompt = cfg["prompt"] if is_reconstruction else check_prompt(cfg["prompt"], "prompt")
    check_output_fps(cfg["output"].get("fps"))
    device = pick_device(cfg["device"])
    pick_dtype(cfg["dtype"], device)
    ranks = Ranks.from_env(device)  # torchrun: this process edits a share of the frames, rank 0 writes
    if ranks is not None:
        ranks.check_mode(mode)
        own_dir, out_dir = out_dir, ranks.broadcast(out_dir)  # rank 0's run dir (Hydra's is named by each rank's clock)
        cfg = {**cfg, "progress": bool(cfg.get("progress", True)) and ranks.is_root}
    show = bool(cfg.get("progress", True))
    memory = PeakMemory(device)
    watch = Stopwatch(device)
    watch.inversion_cache, watch.frames = None, None
    random_weights = random_weights_warning(cfg)
    if random_weights:
        print(f"[tokenflow] warning: {random_weights}", file=sys.stderr)
    try:
        return _run_edit(cfg, out_dir, settings, prompt, show, memory, watch, random_weights, ranks)
    except RunInterrupted:
        raise
    except KeyboardInterrupt:  # Ctrl-C outside the inversion: name the stage it stopped
        skipped = ("encode_prompts", "inversion", "editing") if is_reconstruction else ()
        stage = next((s for s in STAGES if s not in watch.timings and s not in skipped), "write")
        cache = watch.inversion_cache
        frames = watch.frames or 0
        raise RunInterrupted(stage.replace("_", " "), cache, frames if cache else 0, frames) from None
    finally:
        if ranks is not None:
            remove_own_run_dir(ranks, own_dir, out_dir)
            ranks.close()


def _run_edit(cfg, out_dir: Path, settings, prompt: str, show: bool, memory: PeakMemory, watch: Stopwatch,
              random_weights: str | None, ranks: Ranks | None = None) -> RunFacts:
    is_reconstruction = settings is None
    src = prepare_source(cfg, stopwatch=watch, invert=not is_reconstruction, ranks=ranks)
    shard = src.shard
    watch.inversion_cache, watch.frames = src.inversion_cache, src.frames.shape[0]
    video, models, n = src.video, src.models, src.frames.shape[0]
    fps, lost_sound = output_fps(cfg, video)  # the source's rate unless output.fps names one
    facts = RunFacts(
        video=str(video.path), frames=n, source_indices=list(video.indices), size=[video.height, video.width],
        fps=float(fps), notes=list(video.notes), model=str(cfg["model"]["source"]),
        mode=cfg["tokenflow"]["mode"], method=cfg["method"]["name"], prompt=prompt, device=src.device,
        dtype=str(src.dtype).replace("torch.", ""), inversion_cache=src.inversion_cache,
        inversion_frames_reused=src.inversion_frames_reused, warnings=[w for w in (random_weights, *src.warnings) if w],
        source=asdict(video.source),
    )
    facts.warnings += video.warnings  # e.g. a sound track that cannot be read
    facts.warnings += [lost_sound] if lost_sound else []  # output.fps away from the source's rate

    if is_reconstruction:
        edited_latents = src.clean
    else:
        sample_bar = FrameStepBar(f"editing ({settings.mode}, {settings.method})", n * len(src.timesteps), show)

        def progress(steps):
            for s in steps:
                yield s
                sample_bar(n)

        edited_latents, record = edit_video_latents(
            models.unet, models.config.schedule, settings, src.prompts,
            *((src.source_latents, src.clean) if shard is None else (shard.full_source(src.source_latents), shard.full(src.clean))),
            src.timesteps, progress=progress, shard=shard,
        )
        if shard is not None:
            edited_latents = shard.own_rows(edited_latents)
        sample_bar.close()
        facts.keyframes_per_step, facts.timesteps = record.keyframes, record.timesteps
        facts.unet_frame_forwards = record.unet_frame_forwards
        watch.lap("editing")

    edited = from_model_range(decode_latents(models.vae, edited_latents, cfg["inversion"]["batch_size"]))
    watch.lap("decode")
    if shard is not None:  # torchrun: every rank's decoded frames to rank 0, which writes; the others are done
        facts.ranks = rank_facts(ranks, shard, src.device, watch.timings, src.inversion_frames_reused, memory.report())
        facts.inversion_frames_reused = sum(r["inversion_frames_reused"] for r in facts.ranks)
        edited = shard.gather_to_root(edited)
        if edited is None:
            facts.timings_s = watch.timings
            return facts

    with staged_outputs(out_dir) as stage:
        outputs = write_outputs(stage, cfg, src, edited, fps, with_sound=not lost_sound)
        watch.lap("write")
        facts.timings_s = watch.timings
        facts.seconds_per_frame = {k: round(v / n, 4) for k, v in watch.timings.items() if k in ("encode", "inversion", "editing", "decode")}
        facts.peak_memory_mb = memory.report()
        if memory.note:
            facts.notes.append(memory.note)
        facts.outputs = {k: str(v) for k, v in outputs.items()}
        facts.started, facts.finished = watch.started, datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        stage.path("run.json").write_text(json.dumps(asdict(facts), indent=2, ensure_ascii=False), encoding="utf-8")
    return facts
