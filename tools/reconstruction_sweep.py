"""How well each inversion comes back, and what it costs: reconstruction PSNR and UNet forwards of
DDIM inversion at several step counts and edit-friendly DDPM inversion at several step counts, on one clip.

    python -m tools.reconstruction_sweep --video wolf.mp4 --model tiny --max-frames 8
    python -m tools.reconstruction_sweep --video wolf.mp4 --ddim 50,100,500,1000 --ddpm 50,100 --steps 50

Each row inverts the clip with the source (inversion) prompt, samples it back from the inversion
(tokenflow.reconstruction: DDIM sampling from x_T on the run's `--steps` grid, unguided, as the
edit's PnP start; DDPM sampling with the stored maps on its own grid at inversion.source_guidance_scale),
decodes it and compares with the source frames: PSNR in dB over the clip, beside the VAE round
trip's (the best any inversion can do through this VAE), and with the VAE round trip itself (the
inversion's own error, without the VAE's; inf when the frames are the same). Forwards are frames through the UNet per
frame, each prompt branch counted once. The clip, models and settings are the `tokenflow` command's
(same flags and key=value overrides), read and encoded once through tokenflow.source.prepare_source;
nothing is cached (each row inverts afresh, so its forwards are its own). With model=tiny the
weights are random: the numbers describe that random model, not Stable Diffusion.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, replace

from tools.run_config import add_run_flags, flag_overrides, quote


@dataclass
class Row:
    method: str  # ddim | ddpm
    inversion_steps: int  # DDIM: inversion.steps; DDPM: its grid (= the sampling steps)
    sampling_steps: int  # the reconstruction's (and an edit's) sampling steps
    inversion_forwards: int  # UNet sample-forwards per frame
    reconstruction_forwards: int
    psnr_db: float
    vae_psnr_db: float  # the VAE round trip's, the same in every row
    against_vae_db: float  # the reconstruction against the VAE round trip: the inversion's own error (inf: none)
    seconds: float  # inversion and reconstruction of the clip


def parse_steps(text: str) -> list[int]:
    """"50,100" -> [50, 100]; "" -> []."""
    try:
        steps = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated step counts, e.g. 50,100, got {text!r}") from None
    if any(s < 1 for s in steps):
        raise argparse.ArgumentTypeError(f"step counts must be >= 1, got {text!r}")
    return steps


def sweep(overrides: list[str], ddim: list[int], ddpm: list[int], say=print) -> list[Row]:
    """The rows for `overrides` (a tokenflow command line: video=, model=, steps=, ...)."""
    import torch

    from tokenflow.config import load_config
    from tokenflow.inversion import decode_latents, invert_for_run
    from tokenflow.media import from_model_range
    from tokenflow.prompts import embed_prompts
    from tokenflow.reconstruction import psnr, reconstruct_latents
    from tokenflow.source import prepare_source

    base = load_config([*overrides, "inversion.cache=false", "inversion.skip=0"])
    src = prepare_source(base, invert=False)
    models, clean, batch = src.models, src.clean, base.inversion.batch_size
    schedule = models.config.schedule
    prompts, _ = embed_prompts(models, base, src.device)
    round_trip = from_model_range(decode_latents(models.vae, clean, batch))
    vae_psnr = round(psnr(round_trip, src.frames), 3)
    n = clean.shape[0]
    say(f"{n} frames of {src.video.path} at {src.video.height}x{src.video.width}, model {base.model.name}; "
        f"VAE round trip {vae_psnr:.2f} dB")
    rows = []
    for method, steps in [("ddim", s) for s in ddim] + [("ddpm", s) for s in ddpm]:
        if method == "ddim":
            cfg = replace(base, inversion=replace(base.inversion, method="ddim", steps=steps))
        else:
            cfg = replace(base, steps=steps, inversion=replace(base.inversion, method="ddpm"))
        timesteps = schedule.timesteps(cfg.steps).tolist()
        start = time.perf_counter()
        with torch.no_grad():
            inversion = invert_for_run(cfg, models.unet, schedule, clean, prompts, timesteps, frame_ids=list(src.video.indices))
            forwards = [0]
            latents = reconstruct_latents(models.unet, schedule, inversion, prompts.source, prompts.negative,
                                          guidance_scale=cfg.inversion.source_guidance_scale, batch_size=batch,
                                          on_forward=lambda b: forwards.__setitem__(0, forwards[0] + b))
            frames = from_model_range(decode_latents(models.vae, latents, batch))
        seconds = time.perf_counter() - start
        branches = 2 if method == "ddpm" and cfg.inversion.source_guidance_scale != 1 else 1
        row = Row(method, steps, cfg.steps, inversion.unet_frame_forwards * inversion.unet_branches // n,
                  forwards[0] * branches // n, round(psnr(frames, src.frames), 3), vae_psnr,
                  round(psnr(frames, round_trip), 3), round(seconds, 1))
        say(f"{row.method} {row.inversion_steps}: {row.psnr_db:.2f} dB, {row.inversion_forwards} + "
            f"{row.reconstruction_forwards} forwards per frame, {row.seconds:.1f} s")
        rows.append(row)
    return rows


def table(rows: list[Row]) -> str:
    """The rows as a Markdown table."""
    lines = ["| inversion | inversion steps | sampling steps | UNet forwards per frame (inversion + reconstruction) "
             "| reconstruction PSNR (dB) | VAE round trip PSNR (dB) | reconstruction against the VAE round trip (dB) | seconds |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r.method.upper()} | {r.inversion_steps} | {r.sampling_steps} | {r.inversion_forwards} + "
                     f"{r.reconstruction_forwards} | {r.psnr_db:.2f} | {r.vae_psnr_db:.2f} | {r.against_vae_db:.2f} | {r.seconds:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.reconstruction_sweep",
        description="Reconstruction PSNR and UNet forwards of DDIM and DDPM inversion at several step counts on one clip "
                    "(with model=tiny the numbers describe a random model).",
        allow_abbrev=False,
    )
    parser.add_argument("--video", required=True, help='a video file, an image folder or "sample"')
    parser.add_argument("--ddim", type=parse_steps, default=[50, 100, 500, 1000],
                        help="DDIM inversion step counts, comma-separated (default 50,100,500,1000; empty: none)")
    parser.add_argument("--ddpm", type=parse_steps, default=[50, 100],
                        help="DDPM inversion step counts (= its sampling steps), comma-separated (default 50,100)")
    add_run_flags(parser)
    args = parser.parse_intermixed_args(argv)
    try:
        overrides = [f"video={quote(args.video)}", "progress=false", *flag_overrides(args)]
        rows = sweep(overrides, args.ddim, args.ddpm, say=lambda line: print(line, file=sys.stderr))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
