"""TokenFlow's mechanism on a real clip, without model weights: per-frame edit vs keyframes + propagation.

    python -m tools.toy_propagation --video sample|clip.mp4 [--frames 40] [--size 256] [--out DIR]

TokenFlow (Geyer et al.) edits a few keyframes and builds every other frame from the keyframes'
edited tokens, matched through the nearest-neighbour field of the ORIGINAL video's features (Eq. 5-7).
This demo runs exactly that part of the method, with the project's own code, on pixels:

  features phi(x^i)   hand-made token features of the ORIGINAL frames on an s x s token grid
                      (tools/toy_features.py: normalised luma patches at two scales, the block's
                      colour, a low-frequency position code); no network, no weights;
  keyframes           tokenflow.edit.keyframes_at: one random frame per interval of L frames (Sec. 4.1),
                      the draw of denoising step `--step`;
  the edit            tools/toy_edit.py: a colour grade whose parameters jitter from frame to frame,
                      what an image editor applied frame by frame does;
  tokens T            the EDITED keyframes cut into overlapping 2s x 2s pixel patches, one per token
                      (tools/patch_tokens.py);
  NN field, Eq. 5     tokenflow.propagation.nn_fields on the original frames' features;
  Eq. 6-7             tokenflow.propagation.keyframe_neighbours (rule "paper" or "released",
                      weighting sigmoid or linear) and blend; the blended patches are put back
                      together by overlap-add.

Two edits of the clip are compared:
  per-frame   every frame graded independently (its own jittered parameters): flickers;
  TokenFlow   only the keyframes graded (each with the same parameters it gets per frame), every
              frame (keyframes too, as in the paper) assembled from the edited keyframes' patches.
Both are scored with the project's warp error (tools/warp_error.py, Lai et al. 2018: flow of the
SOURCE video, occlusion mask, x1e-3), the source itself as the floor. The flow of each frame pair is
computed once and every video is scored against it (the same functions `warp_error` calls).

What a diffusion model adds and this demo does not: the keyframes here are edited one by one (no
extended attention, Eq. 3-4, to make them agree), the propagation happens once on pixels instead of
at every self-attention layer and denoising step, and nothing smooths the result afterwards (the
UNet's later layers and the VAE decoder do). Content that no keyframe shows (disocclusions) is
copied from the closest-looking keyframe patch. It shows the mechanism and why it is consistent:
frames built from the same edited keyframes through the original's correspondences share one edit.

Outputs in --out (default outputs/toy_propagation/<clip name>), written together at the end:
  side_by_side.mp4   source | per-frame edit | TokenFlow (first rule), with the frame number
  per_frame.mp4, tokenflow_<rule>.mp4   each edit alone
  nn_field.png       one frame's NN field to its keyframes (matplotlib, the docs extra; without it
                     everything else is written and the run says how to get the figure)
  warp_error.json    the numbers printed at the end, with the keyframes and settings
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from tokenflow.edit import EditSettings, batches, keyframes_at
from tokenflow.measure import Stopwatch
from tokenflow.propagation import RULES, WEIGHTINGS, NNFields, Neighbours, blend, keyframe_neighbours, nn_fields

from .optical_flow import flow
from .patch_tokens import from_tokens, to_tokens
from .toy_edit import edit_frames, frame_grades
from .toy_features import toy_features
from .warp_error import WarpErrorResult, pair_warp_error, reliability_mask

DEFAULT_FRAMES = 40
DEFAULT_SIZE = 256
DEFAULT_STRIDE = 4  # 64 x 64 tokens at 256 px, the token count of SD's highest-resolution layers at 512 px


# ---------------------------------------------------------------------------------------------
# the mechanism
# ---------------------------------------------------------------------------------------------


@dataclass
class Propagated:
    frames: Tensor  # float [F, 3, H, W] in [0, 1]
    neighbours: Neighbours  # of every frame: the keyframe slots it blends and w (Eq. 6-7)


def propagate_edit(
    features: Tensor, edited_keyframes: Tensor, keyframes: list[int], stride: int, *,
    rule: str = "paper", weighting: str = "sigmoid", interval: int = 8, batch_size: int = 8,
) -> Propagated:
    """Every frame assembled from the edited keyframes (Eq. 5-6).

    features: [F, N, C] phi of the ORIGINAL frames; edited_keyframes: float [K, 3, H, W] the
    keyframes (at `keyframes`, ascending) after the edit -> frames [F, 3, H, W]."""
    n_frames = features.shape[0]
    _, _, h, w = edited_keyframes.shape
    neighbours = keyframe_neighbours(list(range(n_frames)), keyframes, weighting, rule=rule, interval=interval)
    tokens = to_tokens(edited_keyframes, stride)[None]  # T_base: [1, K, N, 3*2s*2s], one branch
    keyframe_features = features[keyframes]  # [K, N, C]
    out = torch.empty(n_frames, 3, h, w)
    for frames in batches(n_frames, batch_size):
        mine = neighbours.subset(frames)
        fields = nn_fields(keyframe_features, features[frames], mine)  # Eq. 5, both neighbours
        out[frames] = from_tokens(blend(tokens, fields, mine)[0], h, w, stride)  # Eq. 6
    return Propagated(frames=out.clamp(0, 1), neighbours=neighbours)


def frame_fields(features: Tensor, keyframes: list[int], neighbours: Neighbours, frame: int) -> NNFields:
    """Eq. 5 for one frame against its two keyframes: NNFields with past/future [1, N]."""
    return nn_fields(features[keyframes], features[[frame]], neighbours.subset([frame]))


# ---------------------------------------------------------------------------------------------
# scoring: the warp error, one flow per frame pair for all videos
# ---------------------------------------------------------------------------------------------


def warp_errors(source: np.ndarray, videos: dict[str, np.ndarray], *, method: str = "dis") -> dict[str, WarpErrorResult]:
    """tools.warp_error.warp_error of every video in `videos` (uint8 [F, H, W, 3], the source's size)
    along the flow of `source`, computing each pair's flow and mask once."""
    per_pair = {name: [] for name in videos}
    valid = []
    for t in range(source.shape[0] - 1):
        flow_fw = flow(source[t], source[t + 1], method=method)
        flow_bw = flow(source[t + 1], source[t], method=method)
        mask = reliability_mask(flow_fw, flow_bw)
        valid.append(float(mask.mean()))
        for name, frames in videos.items():
            unit = frames[t : t + 2].astype(np.float32) / 255.0
            per_pair[name].append(pair_warp_error(unit[0], unit[1], flow_fw, mask) * 1e3)
    return {name: WarpErrorResult(per_pair=p, mean=float(np.mean(p)), valid_fraction=valid) for name, p in per_pair.items()}


def field_flow_agreement(fields: NNFields, source: np.ndarray, frame: int, keyframe: int, stride: int) -> float:
    """Share of tokens whose NN-field displacement (frame -> its past keyframe) lies within one
    token of the optical flow's mean displacement over the token's block: how well the toy features
    find the scene's correspondences. Uses DIS flow from `frame` to `keyframe`."""
    h, w = source.shape[1:3]
    gh, gw = h // stride, w // stride
    f = flow(source[frame], source[keyframe])  # [H, W, 2]
    block_flow = f.reshape(gh, stride, gw, stride, 2).mean(axis=(1, 3))  # [gh, gw, 2] (dx, dy)
    q = fields.past[0].numpy().reshape(gh, gw)  # matched token index in the keyframe
    ys, xs = np.mgrid[0:gh, 0:gw]
    displacement = np.stack([q % gw - xs, q // gw - ys], -1) * stride  # [gh, gw, 2] (dx, dy) px
    return float((np.abs(displacement - block_flow).max(-1) <= stride).mean())


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------


@dataclass
class ToyResult:
    video: str
    frames: int
    size: list[int]  # [H, W]
    stride: int
    interval: int
    step: int
    weighting: str
    keyframes: list[int]
    warp_error: dict[str, float]  # name -> mean x1e-3: source, per_frame, tokenflow_<rule>
    figure_frame: int
    flow_agreement: float  # field_flow_agreement of figure_frame
    seconds: float
    outputs: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # outputs left out, and why (the figure without matplotlib)
    per_pair: dict[str, list[float]] = field(default_factory=dict)


def load_clip(video: str | Path, frames: int, size: int | None, stride: int) -> Tensor:
    """uint8 [F, H, W, 3]: the first `frames` frames, short side resized to `size`, cropped to the token grid."""
    from tokenflow.media import fit_to_size, read_video

    if str(video) == "sample":  # the generated clip the tokenflow command's video=sample edits
        from tokenflow.inversion_cache import default_cache_root
        from tokenflow.media.sample_clip import cached_sample_clip
        video = cached_sample_clip(default_cache_root() / "sample_clip")
    clip = fit_to_size(read_video(video, max_frames=frames), size, multiple=stride)
    if clip.num_frames < 2:
        raise ValueError(f"{video}: the demo needs at least 2 frames, the selection has {clip.num_frames}")
    return clip.frames


def run_demo(
    frames_u8: Tensor, *, stride: int = DEFAULT_STRIDE, interval: int = 8, step: int = 0, seed: int = 0,
    rules: tuple[str, ...] = RULES, weighting: str = "sigmoid", video_name: str = "clip",
) -> tuple[ToyResult, dict[str, Tensor], dict]:
    """The whole comparison on uint8 frames [F, H, W, 3] -> (result, videos uint8 by name, figure data)."""
    watch = Stopwatch()
    n, h, w, _ = frames_u8.shape
    original = frames_u8.permute(0, 3, 1, 2).float() / 255  # [F, 3, H, W]
    settings = EditSettings(mode="tokenflow", keyframe_interval=interval, seed=seed, weighting=weighting)
    keyframes = keyframes_at(settings, n, step)
    grades = frame_grades(n, seed=seed)
    per_frame = edit_frames(original, grades)  # every frame with its own draw
    features = toy_features(original, stride)  # phi of the ORIGINAL frames
    edited_keyframes = per_frame[keyframes]  # the keyframes get the same edit as per frame
    videos = {"source": frames_u8, "per_frame": as_u8(per_frame)}
    neighbours = {}
    for rule in rules:
        result = propagate_edit(features, edited_keyframes, keyframes, stride, rule=rule, weighting=weighting, interval=interval)
        videos[f"tokenflow_{rule}"] = as_u8(result.frames)
        neighbours[rule] = result.neighbours
    scores = warp_errors(frames_u8.numpy(), {k: v.numpy() for k, v in videos.items()})

    # the figure's frame: the middle of the first gap between two keyframes (or the middle frame)
    gaps = [(a, b) for a, b in zip(keyframes, keyframes[1:]) if b - a > 1]
    figure_frame = (gaps[0][0] + gaps[0][1]) // 2 if gaps else n // 2
    rule = rules[0]
    fields = frame_fields(features, keyframes, neighbours[rule], figure_frame)
    slot_past = int(neighbours[rule].past[figure_frame])
    agreement = field_flow_agreement(fields, frames_u8.numpy(), figure_frame, keyframes[slot_past], stride)
    figure = dict(frame=figure_frame, keyframes=keyframes, neighbours=neighbours[rule], fields=fields, stride=stride,
                  rule=rule, original=frames_u8, edited_keyframes=as_u8(edited_keyframes), videos=videos)
    result = ToyResult(
        video=video_name, frames=n, size=[h, w], stride=stride, interval=interval, step=step, weighting=weighting,
        keyframes=keyframes, warp_error={k: s.mean for k, s in scores.items()}, figure_frame=figure_frame,
        flow_agreement=agreement, seconds=watch.lap("demo"),
        per_pair={k: s.per_pair for k, s in scores.items()},
    )
    return result, videos, figure


def as_u8(images: Tensor) -> Tensor:
    """float [F, 3, H, W] in [0, 1] -> uint8 [F, H, W, 3]"""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def nn_field_figure(figure: dict, path: Path) -> Path:
    """One frame's NN field to its two keyframes, as people read it (matplotlib): the frame, each
    keyframe with the field drawn as arrows from where a token is to where its match is, the frame
    rebuilt from the original keyframes through the field (what Eq. 6 does to the edit), and the
    propagated edit."""
    from .plotting import plt

    i, kf, stride = figure["frame"], figure["keyframes"], figure["stride"]
    nb: Neighbours = figure["neighbours"]
    past, future, w_future = kf[int(nb.past[i])], kf[int(nb.future[i])], float(nb.w[i])
    original = figure["original"]
    h, w = original.shape[1:3]
    gh, gw = h // stride, w // stride
    rebuilt = from_tokens(
        blend(to_tokens(original[[past, future]].permute(0, 3, 1, 2).float() / 255, stride)[None],
              figure["fields"], Neighbours(past=torch.tensor([0]), future=torch.tensor([1]), w=nb.w[[i]]))[0], h, w, stride,
    )
    propagated = figure["videos"][f"tokenflow_{figure['rule']}"][i]
    fig, axes = plt.subplots(1, 5, figsize=(16, 3.8), constrained_layout=True)
    ys, xs = np.mgrid[0:gh, 0:gw]
    every = max(1, gh // 12)  # about a dozen arrows a side
    sel = (slice(every // 2, None, every), slice(every // 2, None, every))
    for ax, key, field_, name in ((axes[1], past, figure["fields"].past[0], "past"), (axes[2], future, figure["fields"].future[0], "future")):
        ax.imshow(original[key].numpy())
        q = field_.numpy().reshape(gh, gw)
        qx, qy = (q % gw + 0.5) * stride, (q // gw + 0.5) * stride
        px, py = (xs + 0.5) * stride, (ys + 0.5) * stride
        ax.quiver(px[sel], py[sel], (qx - px)[sel], (qy - py)[sel], angles="xy", scale_units="xy", scale=1,
                  color="yellow", width=0.006)
        weight = w_future if name == "future" else 1 - w_future
        ax.set_title(f"{name} keyframe {key}, weight {weight:.2f}\narrows: token of frame {i} -> its NN", fontsize=9)
    axes[0].imshow(original[i].numpy())
    axes[0].set_title(f"original frame {i}", fontsize=9)
    axes[3].imshow(as_u8(rebuilt)[0].numpy())
    axes[3].set_title(f"frame {i} rebuilt from the ORIGINAL\nkeyframes through the NN field (Eq. 5-6)", fontsize=9)
    axes[4].imshow(propagated.numpy())
    axes[4].set_title(f"frame {i}: EDITED keyframes propagated\n(TokenFlow, rule {figure['rule']})", fontsize=9)
    for ax in axes:
        ax.set_axis_off()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_outputs(out: Path, result: ToyResult, videos: dict[str, Tensor], figure: dict, fps: float = 20) -> dict[str, Path]:
    """All outputs into a staging folder beside `out`, then moved in together (none on failure)."""
    from tokenflow.media import write_video

    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        names = {}
        first = next(k for k in videos if k.startswith("tokenflow_"))
        panels = torch.cat([videos["source"], videos["per_frame"], videos[first]], dim=2)  # [F, H, 3W, 3]
        names["side_by_side"] = write_video(stage / "side_by_side.mp4", panels, fps)
        for name, frames in videos.items():
            if name != "source":
                names[name] = write_video(stage / f"{name}.mp4", frames, fps)
        try:
            names["nn_field"] = nn_field_figure(figure, stage / "nn_field.png")
        except ImportError as err:  # matplotlib is an optional extra: the videos and numbers stand without it
            result.skipped.append(f"nn_field.png: {err}")
        final = {k: out / p.name for k, p in names.items()}
        result.outputs = {k: str(p.resolve()) for k, p in final.items()}
        (stage / "warp_error.json").write_text(json.dumps(asdict(result), indent=1))
        final["warp_error"] = out / "warp_error.json"
        out.mkdir(parents=True, exist_ok=True)
        for p in stage.iterdir():
            p.replace(out / p.name)
        return final
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def report(result: ToyResult) -> str:
    lines = [f"{result.video}: {result.frames} frames at {list(result.size)} (H, W), {result.stride} px tokens, "
             f"keyframes {result.keyframes} (interval {result.interval}, step {result.step}), weighting {result.weighting}",
             f"NN field of frame {result.figure_frame} within one token of the optical flow: {100 * result.flow_agreement:.0f}% of tokens"]
    for name, value in result.warp_error.items():
        lines.append(f"warp error {name:>20}: {value:7.3f} x1e-3")
    lines += [f"skipped {what}" for what in result.skipped]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.toy_propagation", description=__doc__.split("\n\n")[0],
                                     allow_abbrev=False)
    parser.add_argument("--video", required=True, help="video file, image folder, or sample (the generated clip)")
    parser.add_argument("--frames", type=int, default=DEFAULT_FRAMES, help=f"first N frames (default {DEFAULT_FRAMES})")
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE, help=f"short side in pixels (default {DEFAULT_SIZE}; 0 keeps the clip's)")
    parser.add_argument("--stride", type=int, default=DEFAULT_STRIDE, help=f"token block side in pixels (default {DEFAULT_STRIDE})")
    parser.add_argument("--interval", type=int, default=8, help="keyframe interval L (default 8, the paper's)")
    parser.add_argument("--step", type=int, default=0, help="whose keyframe draw: denoising step (default 0)")
    parser.add_argument("--rule", choices=(*RULES, "both"), default="both", help="propagation rule (default both)")
    parser.add_argument("--weighting", choices=WEIGHTINGS, default="sigmoid", help="Eq. 7 weighting (default sigmoid)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the keyframe draw and the edit's jitter")
    parser.add_argument("--out", default=None, help="output folder (default outputs/toy_propagation/<clip name>)")
    args = parser.parse_args(argv)
    if args.frames < 2:
        parser.error(f"--frames must be at least 2, got {args.frames}")
    rules = RULES if args.rule == "both" else (args.rule,)
    out = Path(args.out) if args.out else Path("outputs") / "toy_propagation" / Path(args.video).stem
    try:
        frames = load_clip(args.video, args.frames, args.size or None, args.stride)
        result, videos, figure = run_demo(frames, stride=args.stride, interval=args.interval, step=args.step,
                                          seed=args.seed, rules=rules, weighting=args.weighting, video_name=str(args.video))
        written = write_outputs(out, result, videos, figure)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report(result))
    for p in written.values():
        print(f"wrote {p.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
