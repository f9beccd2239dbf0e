"""The GPU check: one command, a few minutes on one H100/H200, random full-size weights, no download.

    python -m tools.maintainers.gpu_check                                   # ../shared/data/wolf.mp4, cuda, float16
    python -m tools.maintainers.gpu_check --video /work/shared/data/wolf.mp4 --markdown gpu.md
    python -m tools.maintainers.gpu_check --device cpu --model tiny         # the same code paths, tiny configs (tests)

Sections, each timed (CUDA synchronised), each in its own try so one failure still prints the rest:
1. `edit`: the 40-frame wolf clip at 512x512 in float16 through the pipeline's own stages (read,
   VAE encode, prompts, DDIM inversion, TokenFlow PnP edit, decode, write) with SD-2.1-base's
   architecture and random weights built on the device: seconds and peak CUDA memory per stage.
   Inversion takes --inversion-steps (default 50: the paper's 1,000 or the authors' 500 scale it linearly).
2. `unet vs diffusers`: one UNet forward at batch 3 and 24 (64x64 latents, the edit's batches: 3
   branches x 1 and x 8 frames), ours against diffusers' UNet2DConditionModel with the same weights
   (tools.maintainers.bench's pair), median of --repeats, time ratio ours/diffusers.
3. `keyframe pass`: the joint keyframe pass (extended attention over the keyframes, PnP on, tokens
   recorded) at --keyframes keyframes (125: a 1,000-frame clip at interval 8), its seconds and peak
   CUDA memory above what was allocated before it, against tools.memory_estimate's figure for it.
4. The same 2 and 3 with torch.compile on (ours and diffusers' both compiled; the first call's
   compile time reported apart).
The table is Markdown on stdout (and --markdown FILE). --budget-s stops starting new sections once
that many seconds have passed (they are listed as skipped), so the check stays under 8 minutes.
diffusers is imported only for section 2 (a test extra; the product never imports it).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
DEFAULT_VIDEO = REPO.parent / "shared" / "data" / "wolf.mp4"  # ../shared/data/wolf.mp4 beside the repo
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class Row:
    section: str
    what: str
    seconds: float | None = None
    peak_mib: float | None = None
    versus: str = ""  # a reference figure and the ratio to it
    note: str = ""


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


class Stage:
    """Seconds (synchronised) and peak CUDA memory above the start of a block."""

    def __init__(self, device: str):
        self.device = device

    def __enter__(self):
        sync(self.device)
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        self.seconds = time.perf_counter() - self.start
        self.peak_mib = None
        if self.device.startswith("cuda"):
            self.peak_mib = (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**20
        return False


def build_models(tiny: bool, device: str, dtype: torch.dtype):
    """SD-2.1-base's UNet, VAE and text encoder with random weights, built on the device (no
    download, no file); --model tiny: the project's tiny model."""
    from dataclasses import replace as dc_replace

    from clip_text.model import TextConfig, TextEncoder
    from clip_text.tokenizer import Tokenizer
    from sampler.schedule import Schedule
    from tokenflow.models.loading import ModelConfig, Models
    from tokenflow.models.tiny import build_tiny_models
    from unet.model import UNet, UNetConfig
    from vae.model import VAE, VAEConfig

    if tiny:
        return build_tiny_models(seed=0, dtype=dtype, device=device)
    torch.manual_seed(0)
    with torch.device(device):  # random init on the GPU: seconds, not a minute of CPU
        unet, vae = UNet(UNetConfig.sd21_base()), VAE(VAEConfig.sd21())
        text = TextEncoder(dc_replace(TextConfig.sd21()))
    schedule = Schedule()
    config = ModelConfig(source="random sd21_base", layout="random", prediction_type=schedule.prediction_type,
                         sample_size=512, schedule=schedule, dtype=dtype, device=device)
    models = [m.to(device, dtype).eval().requires_grad_(False) for m in (unet, vae, text)]
    return Models(*models, Tokenizer.from_open_clip(), config)


def check_edit(args, rows: list[Row]) -> None:
    """Section 1: the clip end to end through the pipeline's stages."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from tokenflow.edit import PromptEmbeddings, edit_video_latents
    from tokenflow.inversion import decode_latents, encode_frames, invert_frames
    from tokenflow.media import from_model_range, to_model_range, write_video
    from tokenflow.pipeline import edit_settings, load_video, tokenize_prompts

    dtype = DTYPES[args.dtype]
    overrides = [f"video={args.video}", f"frames.max={args.frames}", f"size={args.size}", f"steps={args.steps}",
                 f"inversion.steps={args.inversion_steps}", "inversion.cache=false", f"device={args.device}"]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = OmegaConf.to_container(compose("config", overrides=overrides), resolve=True)
    section = f"edit ({args.frames} frames {args.size}x{args.size} {args.dtype})"

    def row(what, st, note=""):
        rows.append(Row(section, what, st.seconds, st.peak_mib, note=note))

    with Stage(args.device) as st:
        video = load_video(cfg)
    row("read video", st, f"{video.num_frames} frames {video.width}x{video.height}")
    with Stage(args.device) as st:
        models = build_models(args.model == "tiny", args.device, dtype)
        models.unet.set_feed_forward_chunk(cfg["tokenflow"]["ff_chunk"])
    row("build random models", st, "no download")
    bs = cfg["inversion"]["batch_size"]
    with Stage(args.device) as st:
        clean = encode_frames(models.vae, to_model_range(video.frames), bs)
    row("VAE encode", st)
    with Stage(args.device) as st:
        ids, _ = tokenize_prompts(models.tokenizer, {"inversion_prompt": cfg["inversion_prompt"],
                                                     "negative_prompt": cfg["negative_prompt"], "prompt": cfg["prompt"]})
        with torch.no_grad():
            emb = models.text_encoder(ids.to(args.device))
        prompts = PromptEmbeddings(source=emb[0:1], negative=emb[1:2], target=emb[2:3])
        timesteps = models.config.schedule.timesteps(cfg["steps"]).tolist()
    row("encode prompts", st)
    with Stage(args.device) as st:
        source = invert_frames(models.unet, models.config.schedule, clean, prompts.source, inversion_steps=args.inversion_steps,
                               keep_timesteps=timesteps, batch_size=bs)
        source = {t: x.to(dtype) for t, x in source.items()}
    row("DDIM inversion", st, f"{args.inversion_steps} steps")
    with Stage(args.device) as st:
        latents, record = edit_video_latents(models.unet, models.config.schedule, edit_settings(cfg), prompts, source, clean, timesteps)
    row("TokenFlow edit (PnP)", st, f"{args.steps} steps, {len(record.keyframes[0])} keyframes/step")
    with Stage(args.device) as st:
        edited = from_model_range(decode_latents(models.vae, latents, bs))
    row("VAE decode", st)
    with Stage(args.device) as st, tempfile.TemporaryDirectory() as tmp:
        write_video(Path(tmp) / "edited.mp4", edited, video.output_fps)
    row("write mp4", st)
    total = sum(r.seconds for r in rows if r.section == section)
    peak = max((r.peak_mib or 0) for r in rows if r.section == section)
    rows.append(Row(section, "total", total, peak if args.device.startswith("cuda") else None))
    del models, source, latents


def check_unet_vs_diffusers(args, rows: list[Row], compiled: bool) -> None:
    """Section 2 (4): ours vs diffusers' UNet forward at batch 3 and 24."""
    from tools import bench

    config = "tiny" if args.model == "tiny" else "full"
    latent = 8 if args.model == "tiny" else 64
    pair = bench.unet_pair(config, DTYPES[args.dtype], args.device)
    label = "unet vs diffusers" + (" (torch.compile)" if compiled else "")
    if compiled:
        pair = replace(pair, ours=torch.compile(pair.ours, backend=args.compile_backend),
                       reference=torch.compile(pair.reference, backend=args.compile_backend))
    for batch in args.batches:
        if time.perf_counter() > args.deadline:  # compiling a full UNet per shape takes minutes: stop in time
            rows.append(Row(label, f"batch {batch}", note="skipped: past --budget-s"))
            continue
        case = bench.make_cases("unet", pair, batch, latent, DTYPES[args.dtype], args.device)[0]
        note = ""
        if compiled:  # the first calls compile: time them apart
            start = time.perf_counter()
            with torch.inference_mode():
                case.ours()
                case.reference()
            sync(args.device)
            note = f"first calls (compiling both) {time.perf_counter() - start:.1f} s; "
        timing = bench.time_case(case, args.repeats, 1, args.device)
        ours, ref = statistics.median(timing.ours_s), statistics.median(timing.reference_s)
        rows.append(Row(label, f"batch {batch} {case.inputs}", ours, None, f"diffusers {ref:.4f} s, ratio {ours / ref:.2f}",
                        note + f"max abs diff {timing.max_abs_diff:.2g} (outputs up to {timing.reference_abs_max:.2g})"))
    del pair


def check_keyframe_pass(args, rows: list[Row], compiled: bool) -> None:
    """Section 3 (4): the joint keyframe pass at args.keyframes keyframes vs tools.memory_estimate."""
    from tokenflow.controls import EditControl, KeyframeTokens
    from tokenflow.edit import EditSettings, PromptEmbeddings, guided_output
    from tools import memory_estimate

    dtype = DTYPES[args.dtype]
    k, interval = args.keyframes, 8
    models = build_models(args.model == "tiny", args.device, dtype)
    models.unet.set_feed_forward_chunk(16384)
    unet = torch.compile(models.unet, backend=args.compile_backend) if compiled else models.unet
    latent = 8 if args.model == "tiny" else 64
    g = torch.Generator().manual_seed(0)
    x = torch.randn(k, 4, latent, latent, generator=g).to(args.device, dtype)
    src = torch.randn(k, 4, latent, latent, generator=g).to(args.device, dtype)
    emb = torch.randn(3, 77, models.unet.config.cross_attention_dim, generator=g).to(args.device, dtype)
    prompts = PromptEmbeddings(emb[0:1], emb[1:2], emb[2:3])
    settings = EditSettings(keyframe_interval=interval)
    pnp = settings.injection(0, 50)  # the first steps inject: the most memory

    def keyframe_pass():
        tokens = KeyframeTokens(list(range(k)), record_source_outputs=False)
        control = EditControl(k, pnp=pnp, joint_frames=k, record=tokens, query_chunk=None)
        with torch.no_grad():
            guided_output(unet, x, src, 981, prompts, control, settings.guidance_scale)
        return tokens

    label = f"keyframe pass ({k} keyframes)" + (" (torch.compile)" if compiled else "")
    note = ""
    if compiled:
        start = time.perf_counter()
        del_tokens = keyframe_pass()
        del del_tokens
        sync(args.device)
        note = f"first call (compiling) {time.perf_counter() - start:.1f} s; "
    times, peak = [], None
    for _ in range(args.repeats):
        with Stage(args.device) as st:
            tokens = keyframe_pass()
        del tokens
        times.append(st.seconds)
        peak = st.peak_mib if peak is None or st.peak_mib is None else max(peak, st.peak_mib)
    model = "tiny" if args.model == "tiny" else "sd21_base"
    est = memory_estimate.estimate(k * interval, size=latent * 8, dtype=args.dtype, keyframe_interval=interval, model=model)
    est_mib = est.keyframe_pass_peak_gib * 1024
    versus = f"memory_estimate {est_mib:.0f} MiB ({est.keyframes} keyframes of {est.frames} frames)"
    if peak is not None:
        versus += f", measured/estimate {peak / est_mib:.2f}"
    rows.append(Row(label, f"{k} keyframes x 3 branches, {latent}x{latent} latents", statistics.median(times), peak, versus,
                    note + f"median of {args.repeats}"))
    del models, unet


def markdown(rows: list[Row], args, machine: str) -> str:
    lines = [f"## tools.maintainers.gpu_check on {machine}", "",
             f"dtype {args.dtype}; video {args.video}; {'TINY configs' if args.model == 'tiny' else 'full-size SD-2.1-base, random weights'}", "",
             "| section | what | seconds | peak MiB | versus | note |", "|---|---|---|---|---|---|"]
    for r in rows:
        secs = "" if r.seconds is None else f"{r.seconds:.3f}"
        peak = "" if r.peak_mib is None else f"{r.peak_mib:.0f}"
        lines.append(f"| {r.section} | {r.what} | {secs} | {peak} | {r.versus} | {r.note} |")
    return "\n".join(lines) + "\n"


def describe(device: str) -> str:
    if device.startswith("cuda"):
        p = torch.cuda.get_device_properties(device)
        return f"{p.name} ({p.total_memory / 2**30:.0f} GiB), torch {torch.__version__}"
    import platform

    return f"CPU {platform.processor() or platform.machine()}, torch {torch.__version__}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.maintainers.gpu_check", description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--video", type=Path, default=DEFAULT_VIDEO)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="float16", choices=sorted(DTYPES))
    p.add_argument("--model", choices=("sd21_base", "tiny"), default="sd21_base",
                   help="sd21_base: the full-size SD-2.1-base with random weights; tiny: tiny configs (a CPU test of every code path)")
    p.add_argument("--frames", type=int, default=40)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--inversion-steps", type=int, default=50)
    p.add_argument("--batches", default="3,24", help="UNet batches to compare with diffusers")
    p.add_argument("--keyframes", type=int, default=125)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile sections")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (eager: tracing only, for tests)")
    p.add_argument("--sections", default="edit,unet,keyframes,compile")
    p.add_argument("--budget-s", type=float, default=420.0, help="start no new section after this many seconds")
    p.add_argument("--markdown", type=Path, default=None)
    args = p.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: no CUDA device here; run on a GPU machine, or --device cpu --model tiny for the code paths", file=sys.stderr)
        return 2
    if not args.video.is_file():
        print(f"error: {args.video}: no such video (--video PATH; the default is ../shared/data/wolf.mp4 beside the repo)",
              file=sys.stderr)
        return 2
    wanted = set(args.sections.split(","))
    sections = [("edit", lambda rows: check_edit(args, rows)),
                ("unet", lambda rows: check_unet_vs_diffusers(args, rows, compiled=False)),
                ("keyframes", lambda rows: check_keyframe_pass(args, rows, compiled=False))]
    if not args.no_compile and "compile" in wanted:
        sections += [("compile", lambda rows: check_unet_vs_diffusers(args, rows, compiled=True)),
                     ("compile", lambda rows: check_keyframe_pass(args, rows, compiled=True))]
    rows: list[Row] = []
    start, failed = time.perf_counter(), 0
    args.deadline = start + args.budget_s
    for name, run in sections:
        if name not in wanted:
            continue
        elapsed = time.perf_counter() - start
        if elapsed > args.budget_s:
            rows.append(Row(name, "skipped", note=f"budget: {elapsed:.0f} s > --budget-s {args.budget_s:.0f}"))
            continue
        try:
            run(rows)
        except Exception as e:  # one section's failure must not hide the others' figures
            failed += 1
            traceback.print_exc()
            rows.append(Row(name, "FAILED", note=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))
        finally:
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
    rows.append(Row("all", "wall time", time.perf_counter() - start))
    report = markdown(rows, args, describe(args.device))
    print(report)
    if args.markdown:
        args.markdown.write_text(report)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
