"""The paper's explanatory figures as commands (the work is in feature_pca.py and nn_field_figure.py).

    python -m tools.figures pca --video clip.mp4 --prompt "a marble wolf" [--frames 4] [--step 10] [--out fig2.png]
    python -m tools.figures nnfield --video clip.mp4 --source-frame 0 --target-frame 5 [--out fig3.png]
    python -m tools.figures pca --model tiny --video sample --prompt "a watercolor" inversion.steps=20

Both compose conf/config.yaml like the `tokenflow` command (same defaults, same key=value overrides)
and reuse the pipeline's inversion cache.
"""

from __future__ import annotations

import argparse
import sys

from tokenflow.config import load_config
from tokenflow.models.presets import RANDOM

from .feature_capture import HIGHEST_RES_DECODER_LAYER
from .run_config import add_run_flags, flag_overrides, quote


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tools.figures", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    sub = parser.add_subparsers(dest="figure", required=True)

    pca = sub.add_parser("pca", allow_abbrev=False, help="Fig. 2: PCA of self-attention output tokens (original, per-frame edit, TokenFlow)",
                         description="Fig. 2: PCA (first three components as RGB, fitted on the original video's tokens) "
                                     "of self-attention output tokens at one layer and step; rows: input, original, "
                                     "per-frame edit, TokenFlow; columns: frames.")
    pca.add_argument("--video", required=True, help='video file, image folder, or "sample" (the generated clip)')
    pca.add_argument("--prompt", required=True, help="the edit prompt")
    pca.add_argument("--frames", type=int, default=4, help="how many frames (evenly spaced over the clip); default 4")
    pca.add_argument("--step", type=int, default=None, help="denoising step 0..steps-1; default steps // 5 (10 of 50)")
    pca.add_argument("--layer", default=HIGHEST_RES_DECODER_LAYER, help=f"self-attention path; default {HIGHEST_RES_DECODER_LAYER}")
    pca.add_argument("--tile", type=int, default=256, help="tile side in pixels (token maps are enlarged by a whole factor)")
    pca.add_argument("--no-input-row", action="store_true", help="leave out the row of input frames")
    pca.add_argument("--out", default="outputs/figures/fig2_feature_pca.png", help="PNG to write (default outputs/figures/fig2_feature_pca.png)")
    add_run_flags(pca)

    nn = sub.add_parser("nnfield", allow_abbrev=False, help="Fig. 3: NN-field reconstruction of a target frame from a source frame",
                        description="Fig. 3: the original video's features at one layer and step; each target token's "
                                    "nearest source token (cosine) reconstructs the target in feature space and in RGB. "
                                    "Panels: source, target, feature reconstruction, RGB warp, NN field.")
    nn.add_argument("--video", required=True, help='video file, image folder, or "sample"')
    nn.add_argument("--source-frame", type=int, default=0, help="source (keyframe) position in the selected frames")
    nn.add_argument("--target-frame", type=int, default=5, help="target position in the selected frames")
    nn.add_argument("--step", type=int, default=None, help="sampling step whose inverted latents give the features; default steps // 5")
    nn.add_argument("--layer", default=HIGHEST_RES_DECODER_LAYER, help=f"self-attention path; default {HIGHEST_RES_DECODER_LAYER}")
    nn.add_argument("--tokens", default="input", choices=("input", "output"),
                    help="match self-attention inputs (what TokenFlow's propagation uses; default) or outputs")
    nn.add_argument("--out", default="outputs/figures/fig3_nn_field.png", help="PNG to write (default outputs/figures/fig3_nn_field.png)")
    add_run_flags(nn)
    return parser


def main(argv: list[str] | None = None) -> int:
    from hydra.errors import HydraException

    parser = build_parser()
    # overrides may sit between flags: argparse hands back the ones it could not place
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if "=" not in a or a.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = list(args.overrides) + extra
    try:
        overrides = flag_overrides(args) + [f"video={quote(args.video)}", "progress=false"]
        if args.figure == "pca":
            from .feature_pca import pca_figure

            cfg = load_config(overrides + [f"prompt={args.prompt}"])  # prompts are taken as typed
            fig = pca_figure(cfg, args.out, frames=args.frames, step=args.step, layer=args.layer, tile=args.tile,
                             with_input_row=not args.no_input_row)
            ratios = ", ".join(f"{100 * r:.1f}%" for r in fig.explained_ratio)
            print(f"PCA of {fig.layer} at step {fig.step} (t={fig.timestep}), frames {fig.frames}; "
                  f"first three components explain {ratios} of the original's token variance")
        else:
            from .nn_field_figure import nn_field_figure

            cfg = load_config(overrides)
            fig = nn_field_figure(cfg, args.out, source_frame=args.source_frame, target_frame=args.target_frame,
                                  step=args.step, layer=args.layer, tokens=args.tokens)
            r = fig.result
            print(f"mean |RGB warp - target| = {r.warp_error:.2f} / 255 (no warp, |source - target|: {r.identity_error:.2f}); "
                  f"token cosine to target: reconstruction {r.recon_cosine:.3f}, source in place {r.identity_cosine:.3f}")
    except (ValueError, FileNotFoundError, RuntimeError, HydraException) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {fig.path}")
    if cfg.model.source == RANDOM:  # a figure of random features shows noise: say so
        print(f"note: model={cfg.model.name} has random weights (model.source=random): the figure shows the "
              "features of a random network, noise, not what TokenFlow's features look like")
    return 0


if __name__ == "__main__":
    sys.exit(main())
