"""Shared or per-frame noise for DDPM inversion (`inversion.shared_noise`): how much each choice
changes from one frame to the next, in the noise maps and in the edit.

    python -m tools.noise_sharing --video wolf.mp4 --model tiny --max-frames 8 --steps 10

For each choice the clip is DDPM-inverted (tokenflow.source.prepare_source, nothing cached) and
edited (tokenflow.edit.edit_video_latents with the maps; the run's mode, technique and prompt).
Printed per choice, each a temporal difference: the root mean square of frame i+1 minus frame i over
the clip, divided by the same of the source's clean latents (1.0: the frames differ as much as the
source's do; more: something that is not the video's motion changes between frames):
- noisy versions x_t and noise maps z_t, averaged over the steps (maps: divided by their own RMS,
  the source's differences mean nothing for unit-variance noise; 1.41 is two independent draws);
- the edited latents, at the end of the edit.
With model=tiny the weights are random: the maps' numbers still follow from the noise (the model
only moves mu_t), while the edit's describe a random model's edit, not Stable Diffusion's.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, replace

from tools.run_config import add_run_flags, flag_overrides, quote


@dataclass
class Sharing:
    shared: bool
    versions: float  # temporal RMS difference of x_t / the clean latents', mean over steps
    maps: float  # temporal RMS difference of z_t / RMS of z_t, mean over steps
    edit: float  # temporal RMS difference of the edited latents / the clean latents'


def temporal_rms(x) -> float:
    """RMS of x[i+1] - x[i] over the frames of x [n, ...] (n >= 2)."""
    return float((x[1:] - x[:-1]).double().pow(2).mean().sqrt())


def measure(overrides: list[str]) -> list[Sharing]:
    """Both choices for `overrides` (a tokenflow command line with inversion.method=ddpm implied)."""
    import torch

    from tokenflow.config import load_config
    from tokenflow.edit import EditSettings, edit_video_latents
    from tokenflow.source import prepare_source

    base = load_config([*overrides, "inversion.method=ddpm", "inversion.cache=false"])
    out = []
    for shared in (True, False):
        cfg = replace(base, inversion=replace(base.inversion, shared_noise=shared))
        src = prepare_source(cfg)
        if src.clean.shape[0] < 2:
            raise ValueError("noise sharing: the clip needs at least 2 frames (frames.max)")
        clean, inv = src.clean, src.inversion
        base_rms = temporal_rms(clean)
        versions = sum(temporal_rms(x) for x in inv.latents.values()) / len(inv.latents) / base_rms
        maps = sum(temporal_rms(z) / float(z.double().pow(2).mean().sqrt()) for z in inv.noise_maps.values()) / len(inv.noise_maps)
        with torch.no_grad():
            edited, _ = edit_video_latents(src.models.unet, src.models.config.schedule, EditSettings.from_config(cfg), src.prompts,
                                           inv.latents, clean, src.timesteps, noise_maps=inv.noise_maps)
        out.append(Sharing(shared, round(versions, 3), round(maps, 3), round(temporal_rms(edited) / base_rms, 3)))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.noise_sharing",
        description="Temporal differences of DDPM inversion's noisy versions, noise maps and edit with shared and with "
                    "per-frame noise (inversion.shared_noise), relative to the source's (with model=tiny: a random model).",
        allow_abbrev=False,
    )
    parser.add_argument("--video", required=True, help='a video file, an image folder or "sample"')
    add_run_flags(parser)
    args = parser.parse_intermixed_args(argv)
    try:
        rows = measure([f"video={quote(args.video)}", "progress=false", *flag_overrides(args)])
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("| inversion.shared_noise | noisy versions x_t | noise maps z_t | edited latents |")
    print("| --- | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {str(r.shared).lower()} | {r.versions:.3f} | {r.maps:.3f} | {r.edit:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
