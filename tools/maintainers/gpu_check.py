"""The GPU check: one command, a few minutes on one H100/H200, random full-size weights, no download.

    python -m tools.maintainers.gpu_check                                   # generated clip, cuda, float16
    python -m tools.maintainers.gpu_check --video wolf.mp4 --markdown gpu.md
    python -m tools.maintainers.gpu_check --device cpu --model tiny         # the same code paths, tiny configs (tests)

Sections, each in its own try so one failure still prints the rest:
1. `edit`: the product's own `tokenflow.pipeline.run_edit` on a clip (default: the generated sample
   scene rendered at --frames frames and --size pixels; --video PATH for a real one) with
   `model=<--model> model.source=random` (the preset's full-size architecture with seeded random
   weights, built on the device), PnP and TokenFlow as the `tokenflow` command runs them: the
   seconds of each of its stages and the run's peak CUDA memory, from its run.json.
   Inversion takes --inversion-steps (default 50: the paper's 1,000 or the authors' 500 scale it linearly).
2. `unet vs diffusers`: one UNet forward at batch 3 and 24 (64x64 latents, the edit's batches: 3
   branches x 1 and x 8 frames), ours against diffusers' UNet2DConditionModel with the same weights
   (tools.maintainers.bench's pair), median of --repeats, time ratio ours/diffusers.
3. `keyframe pass`: the joint keyframe pass (extended attention over the keyframes, PnP on, tokens
   recorded) at --keyframes keyframes (125: a 1,000-frame clip at interval 8), its seconds and peak
   CUDA memory above what was allocated before it, against tools.memory_estimate's figure for it.
4. The same 2 and 3 with torch.compile on (ours and diffusers' both compiled; the first call's
   compile time reported apart).
Every time and peak comes from tokenflow.measure (Stopwatch, PeakMemory), as the product's run.json.
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

from tokenflow.measure import PeakMemory, Stopwatch
from tokenflow.models.presets import PRESETS

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
SAMPLE = "sample"  # --video sample: the generated scene at the check's frames and size
# run_edit's stages (its run.json timings) as the table names them
STAGES = {"read_video": "read video", "load_models": "build random models", "encode": "VAE encode",
          "encode_prompts": "encode prompts", "inversion": "DDIM inversion", "editing": "TokenFlow edit (PnP)",
          "decode": "VAE decode", "write": "write mp4"}


@dataclass
class Row:
    section: str
    what: str
    seconds: float | None = None
    peak_mib: float | None = None
    versus: str = ""  # a reference figure and the ratio to it
    note: str = ""


def random_models(args):
    """The --model preset's architecture with seeded random weights, built on the device (no
    download, no file): the product's own builder, as `model.source=random` runs it."""
    from tokenflow.config import load_config
    from tokenflow.models import build_models

    cfg = load_config([f"model={args.model}", "model.source=random"])
    return build_models(cfg.model, device=args.device, dtype=DTYPES[args.dtype])


def edit_overrides(args, video: str) -> list[str]:
    """The `tokenflow` command line of section 1 (as typed: load_config prepares it)."""
    from tools.run_config import quote

    return [f"video={quote(video)}", f"model={args.model}", "model.source=random", f"frames.max={args.frames}",
            f"size={args.size}", f"steps={args.steps}", f"inversion.steps={args.inversion_steps}",
            "inversion.cache=false", f"device={args.device}", f"dtype={args.dtype}", "progress=false"]


def parse_edit(spec: str) -> tuple[str, list[str]]:
    """--edit NAME=OVERRIDES: a label and the overrides (space-separated) it adds to section 1's command."""
    name, _, overrides = spec.partition("=")
    if not name or not overrides:
        raise argparse.ArgumentTypeError(f"--edit takes NAME=OVERRIDES (e.g. ddpm50='inversion.method=ddpm'), got {spec!r}")
    return name, overrides.split()


def check_edit(args, rows: list[Row], name: str = "", extra: tuple[str, ...] = ()) -> None:
    """Section 1: the clip end to end through the product's run_edit (with `extra` overrides, labelled `name`)."""
    from tokenflow.config import load_config
    from tokenflow.media.sample_clip import make_sample_clip
    from tokenflow.pipeline import run_edit

    section = f"edit{' ' + name if name else ''} ({args.frames} frames {args.size}x{args.size} {args.dtype})"
    with tempfile.TemporaryDirectory() as tmp:
        video = str(args.video)
        if video == SAMPLE:  # rendered at the check's size and length, so nothing is read from outside the clone
            video = str(make_sample_clip(Path(tmp) / "sample.mp4", frames=args.frames, size=args.size))
        cfg = load_config(edit_overrides(args, video) + list(extra))
        facts = run_edit(cfg, Path(tmp) / "run")
    method = cfg.inversion.method
    notes = {"read_video": f"{facts.frames} frames {facts.size[1]}x{facts.size[0]}", "load_models": "no download",
             "inversion": f"{cfg.inversion.steps if method == 'ddim' else cfg.steps} steps",
             "editing": f"{args.steps} steps, {len(facts.keyframes_per_step[0]) if facts.keyframes_per_step else 0} "
                        "keyframes/step"}
    for stage, seconds in facts.timings_s.items():
        what = f"{method.upper()} inversion" if stage == "inversion" else STAGES.get(stage, stage)
        rows.append(Row(section, what, seconds, note=notes.get(stage, "")))
    peak = facts.peak_memory_mb.get("cuda_allocated")
    counted = {k: v for k, v in vars(facts).items() if k.endswith("forwards") and v}  # run.json's forward counts
    rows.append(Row(section, "total", sum(facts.timings_s.values()), peak, " ".join(extra),
                    ("peak: the run's CUDA allocation (run.json); " if peak is not None else "")
                    + ", ".join(f"{k} {v}" for k, v in counted.items())))


def check_unet_vs_diffusers(args, rows: list[Row], compiled: bool) -> None:
    """Section 2 (4): ours vs diffusers' UNet forward at batch 3 and 24."""
    from tools.maintainers import bench

    latent = args.size // 8
    pair = bench.unet_pair(args.model, DTYPES[args.dtype], args.device)
    label = "unet vs diffusers" + (" (torch.compile)" if compiled else "")
    if compiled:
        pair = replace(pair, ours=torch.compile(pair.ours, backend=args.compile_backend),
                       reference=torch.compile(pair.reference, backend=args.compile_backend))
    for batch in args.batches:
        if time.monotonic() > args.deadline:  # compiling a full UNet per shape takes minutes: stop in time
            rows.append(Row(label, f"batch {batch}", note="skipped: past --budget-s"))
            continue
        case = bench.make_cases("unet", pair, batch, latent, DTYPES[args.dtype], args.device)[0]
        note = ""
        if compiled:  # the first calls compile: time them apart
            watch = Stopwatch(args.device)
            with torch.inference_mode():
                case.ours()
                case.reference()
            note = f"first calls (compiling both) {watch.lap('compile'):.1f} s; "
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
    models = random_models(args)
    models.unet.set_feed_forward_chunk(16384)
    unet = torch.compile(models.unet, backend=args.compile_backend) if compiled else models.unet
    latent = args.size // 8
    g = torch.Generator().manual_seed(0)
    # the DDIM state is float32, as in the product (guided_output casts it to the UNet's dtype)
    x = torch.randn(k, 4, latent, latent, generator=g).to(args.device)
    src = torch.randn(k, 4, latent, latent, generator=g).to(args.device)
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
        watch = Stopwatch(args.device)
        del_tokens = keyframe_pass()
        del del_tokens
        note = f"first call (compiling) {watch.lap('compile'):.1f} s; "
    times, peak = [], None
    for _ in range(args.repeats):
        watch = Stopwatch(args.device)
        watch.restart()  # after the device's queued work
        memory = PeakMemory(args.device)  # the peak above what is allocated now (weights, inputs)
        tokens = keyframe_pass()
        times.append(watch.lap("keyframe pass"))
        del tokens
        mib = memory.increase().get("cuda_allocated")
        peak = mib if peak is None or mib is None else max(peak, mib)
    est = memory_estimate.estimate(k * interval, size=latent * 8, dtype=args.dtype, keyframe_interval=interval, model=args.model)
    est_mib = est.keyframe_pass_peak_gib * 1024
    versus = f"memory_estimate {est_mib:.0f} MiB ({est.keyframes} keyframes of {est.frames} frames)"
    if peak is not None:
        versus += f", measured/estimate {peak / est_mib:.2f}"
    rows.append(Row(label, f"{k} keyframes x 3 branches, {latent}x{latent} latents", statistics.median(times), peak, versus,
                    note + f"median of {args.repeats}"))
    del models, unet


def markdown(rows: list[Row], args, machine: str) -> str:
    lines = [f"## tools.maintainers.gpu_check on {machine}", "",
             f"dtype {args.dtype}; video {args.video}; model={args.model} model.source=random (its architecture, random weights)", "",
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
    p.add_argument("--video", default=SAMPLE,
                   help="a video file, or sample (default): the generated scene at --frames frames and --size pixels")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="float16", choices=sorted(DTYPES))
    p.add_argument("--model", choices=tuple(PRESETS), default="sd21_base",
                   help="any preset of tokenflow.models.presets, at its architecture with random weights (default "
                        "sd21_base, the paper's model; tiny: a CPU test of every code path)")
    p.add_argument("--frames", type=int, default=40)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--inversion-steps", type=int, default=50)
    p.add_argument("--batches", default="3,24", help="UNet batches to compare with diffusers")
    p.add_argument("--keyframes", type=int, default=125)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile sections")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (eager: tracing only, for tests)")
    p.add_argument("--edit", type=parse_edit, action="append", metavar="NAME=OVERRIDES",
                   help="section 1 once per --edit, adding these overrides to its command, e.g. "
                        "--edit ddim500='inversion.steps=500' --edit ddpm50='inversion.method=ddpm' (default: one plain edit)")
    p.add_argument("--sections", default="edit,unet,keyframes,compile")
    p.add_argument("--budget-s", type=float, default=420.0, help="start no new section after this many seconds")
    p.add_argument("--markdown", type=Path, default=None)
    args = p.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: no CUDA device here; run on a GPU machine, or --device cpu --model tiny for the code paths", file=sys.stderr)
        return 2
    if args.video != SAMPLE and not Path(args.video).is_file():
        print(f"error: {args.video}: no such video (--video PATH, or sample: the generated clip)", file=sys.stderr)
        return 2
    wanted = set(args.sections.split(","))
    edits = args.edit or [("", [])]
    sections = [("edit", lambda rows, e=e: check_edit(args, rows, *e)) for e in edits] + [
        ("unet", lambda rows: check_unet_vs_diffusers(args, rows, compiled=False)),
        ("keyframes", lambda rows: check_keyframe_pass(args, rows, compiled=False))]
    if not args.no_compile and "compile" in wanted:
        sections += [("compile", lambda rows: check_unet_vs_diffusers(args, rows, compiled=True)),
                     ("compile", lambda rows: check_keyframe_pass(args, rows, compiled=True))]
    rows: list[Row] = []
    watch, failed = Stopwatch(), 0
    start = time.monotonic()  # the budget's clock (a deadline, not a measurement)
    args.deadline = start + args.budget_s
    for name, run in sections:
        if name not in wanted:
            continue
        elapsed = time.monotonic() - start
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
    rows.append(Row("all", "wall time", watch.lap("all")))
    report = markdown(rows, args, describe(args.device))
    print(report)
    if args.markdown:
        args.markdown.write_text(report)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
