"""Warp error (Lai et al., "Learning Blind Video Temporal Consistency", ECCV 2018): how much an
edited video flickers, measured along the motion of the ORIGINAL video.

For each consecutive pair (t, t+1):
  1. flow on the source video, forward F_fw (t -> t+1) and backward F_bw (t+1 -> t);
  2. a reliability mask on frame t's grid (pixels without a trustworthy correspondence are dropped):
     - forward-backward check: F_bw sampled where F_fw points, W(x) = F_bw(x + F_fw(x)), should
       undo F_fw; unreliable where |F_fw + W|^2 > 0.01 (|F_fw|^2 + |W|^2) + 0.5;
     - motion boundaries: unreliable where |grad u|^2 + |grad v|^2 > 0.01 |F_fw|^2 + 0.002,
       (u, v) = F_fw;
     - out of frame (our addition, see `out_of_frame_mask`): x + F_fw(x) outside frame t+1;
  3. the EDITED frame t+1 warped back to t with F_fw, then
     E_t = sum(M * (edited_t - warped)^2) / sum(M), over RGB in [0, 1], where the sum over M counts
     every (pixel, channel) pair: the mean runs over valid pixels AND the 3 channels. That is what
     Lai et al.'s evaluate_WarpError.py does (its mask is read as a 3-channel image, so
     N = sum(mask) = 3 x valid pixels). A pair with no valid pixel scores 0, as there.
The video's warp error is the mean of E_t over pairs. Everything reported here is x1e-3, the unit
of the TokenFlow paper's Table 1 (e.g. 3.0 for TokenFlow, 11.3 for per-frame PnP).

Where the thresholds and the choice of flows come from (Lai et al.'s public code, utils.py
`detect_occlusion`, called as detect_occlusion(bw_flow, fw_flow) by compute_flow_occlusion.py, and
Ruder et al., "Artistic style transfer for videos", GCPR 2016, Sec. 3.2): the constants 0.01/0.5
and 0.01/0.002 are Ruder et al.'s. The motion-boundary test uses the gradients of the flow that
starts on the masked frame and is used for the warp (F_fw here; Ruder's mask lives on the later
frame, so there it is the backward flow), not of the warped flow W; the gradients are forward
differences f(x) - f(x+1) along x and y, zero in the last column/row, exactly as in Lai's code.
"""

from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tools.optical_flow import METHODS, backward_warp, flow
from tokenflow.media.size import hw

SCALE = 1e3  # results are reported x1e-3: a raw error of 0.0031 is reported as 3.1

# Ruder et al. 2016 thresholds, used unchanged by Lai et al. 2018.
FB_RELATIVE, FB_ABSOLUTE = 0.01, 0.5
MB_RELATIVE, MB_ABSOLUTE = 0.01, 0.002


@dataclass
class WarpErrorResult:
    """per_pair[t] is the error of pair (t, t+1) and mean their average, both ALREADY x1e-3.
    valid_fraction[t] is the share of frame t's pixels the reliability mask kept."""

    per_pair: list[float]
    mean: float
    valid_fraction: list[float] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# the reliability mask (True = the pixel counts)
# ---------------------------------------------------------------------------------------------


def forward_backward_occlusion(flow_fw: np.ndarray, flow_bw: np.ndarray) -> np.ndarray:
    """True where the forward-backward check fails (occluded / wrong flow), on frame t's grid."""
    flow_bw_warped = backward_warp(flow_bw, flow_fw)  # F_bw(x + F_fw(x)): [H, W, 2]
    round_trip = np.sum((flow_fw + flow_bw_warped) ** 2, axis=-1)
    magnitudes = np.sum(flow_fw ** 2, axis=-1) + np.sum(flow_bw_warped ** 2, axis=-1)
    return round_trip > FB_RELATIVE * magnitudes + FB_ABSOLUTE


def motion_boundaries(flow_fw: np.ndarray) -> np.ndarray:
    """True at motion boundaries: |grad u|^2 + |grad v|^2 > 0.01 |F|^2 + 0.002 (F = flow_fw)."""
    grad_sq = np.zeros(flow_fw.shape[:2], dtype=np.float32)
    for c in range(2):  # u then v
        f = flow_fw[..., c]
        d_x = np.zeros_like(f)
        d_y = np.zeros_like(f)
        d_x[:, :-1] = f[:, :-1] - f[:, 1:]  # forward differences, last column stays 0
        d_y[:-1, :] = f[:-1, :] - f[1:, :]
        grad_sq += d_x ** 2 + d_y ** 2
    return grad_sq > MB_RELATIVE * np.sum(flow_fw ** 2, axis=-1) + MB_ABSOLUTE


def out_of_frame_mask(flow_fw: np.ndarray) -> np.ndarray:
    """True where x + F_fw(x) falls outside the frame (more than half a pixel past the edge).

    Such content has left the view, so frame t+1 holds no correspondence for it. Lai et al.'s code
    does not test this (it relies on the forward-backward check, and its warp replicates the edge
    pixel), but for a clean pan or translation the check passes there and the edge colour would be
    scored as flicker; e.g. a 3 px pan of a 128 px frame would add ~0.3 x1e-3 to a perfect video.
    """
    height, width = flow_fw.shape[:2]
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    x = xs + flow_fw[..., 0]
    y = ys + flow_fw[..., 1]
    return (x < -0.5) | (x > width - 0.5) | (y < -0.5) | (y > height - 0.5)


def reliability_mask(flow_fw: np.ndarray, flow_bw: np.ndarray, *, mask_out_of_frame: bool = True) -> np.ndarray:
    """bool [H, W] on frame t's grid: True where the pixel enters the warp error."""
    unreliable = forward_backward_occlusion(flow_fw, flow_bw) | motion_boundaries(flow_fw)
    if mask_out_of_frame:
        unreliable |= out_of_frame_mask(flow_fw)
    return ~unreliable


# ---------------------------------------------------------------------------------------------
# the error
# ---------------------------------------------------------------------------------------------


def pair_warp_error(edited_t: np.ndarray, edited_next: np.ndarray, flow_fw: np.ndarray, mask: np.ndarray) -> float:
    """Raw (NOT x1e-3) masked mean over valid pixels and channels of (edited_t - warp(edited_next))^2.

    edited_* are float [H, W, 3] in [0, 1]; mask is bool [H, W] (True = counts).
    """
    warped = backward_warp(edited_next, flow_fw)
    squared = (edited_t - warped) ** 2 * mask[..., None]  # [H, W, 3]
    count = int(mask.sum()) * edited_t.shape[2]  # every valid (pixel, channel) pair
    if count == 0:
        return 0.0  # nothing reliable in this pair; Lai et al. score it 0 too
    return float(squared.sum() / count)


def _as_frames(frames, name: str) -> np.ndarray:
    """uint8 [F, H, W, 3] from a numpy array or a (CPU) torch tensor, float input in [0, 1] accepted."""
    if hasattr(frames, "detach"):  # torch tensor; keep torch an optional import here
        frames = frames.detach().cpu().numpy()
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"{name}: expected frames [F, H, W, 3] (RGB), got shape {tuple(frames.shape)}")
    if frames.dtype == np.uint8:
        return frames
    if np.issubdtype(frames.dtype, np.floating):
        lo, hi = float(frames.min()), float(frames.max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(f"{name}: float frames must be RGB in [0, 1], got values in [{lo:.3f}, {hi:.3f}]")
        return np.round(np.clip(frames, 0, 1) * 255).astype(np.uint8)
    raise ValueError(f"{name}: expected uint8 (0..255) or float in [0, 1] frames, got dtype {frames.dtype}")


def warp_error(source_frames, edited_frames, *, method: str = "dis", mask_out_of_frame: bool = True,
               raft_weights=None) -> WarpErrorResult:
    """Warp error of `edited_frames` along the motion of `source_frames`, x1e-3.

    Both are [F, H, W, 3] RGB, uint8 or float in [0, 1] (numpy or torch), with the same number of
    frames and the same size: an edit produced at another resolution must be resized by the caller.
    Flow (method "dis" or "raft") is computed on the SOURCE frames only.
    """
    source = _as_frames(source_frames, "source_frames")
    edited = _as_frames(edited_frames, "edited_frames")
    if source.shape[0] != edited.shape[0]:
        raise ValueError(f"frame count mismatch: source has {source.shape[0]} frames, edited has {edited.shape[0]}")
    if source.shape[1:3] != edited.shape[1:3]:
        raise ValueError(
            f"frame size mismatch: source frames are {hw(*source.shape[1:3])} ([H, W]), edited "
            f"are {hw(*edited.shape[1:3])}; resize the edited video to the source size first"
        )
    if source.shape[0] < 2:
        raise ValueError(f"warp error needs at least 2 frames, got {source.shape[0]}")
    if method not in METHODS:
        raise ValueError(f"unknown flow method {method!r}; choose one of {METHODS}")

    edited_unit = edited.astype(np.float32) / 255.0
    per_pair, valid_fraction = [], []
    for t in range(source.shape[0] - 1):
        flow_fw = flow(source[t], source[t + 1], method=method, raft_weights=raft_weights)
        flow_bw = flow(source[t + 1], source[t], method=method, raft_weights=raft_weights)
        mask = reliability_mask(flow_fw, flow_bw, mask_out_of_frame=mask_out_of_frame)
        per_pair.append(pair_warp_error(edited_unit[t], edited_unit[t + 1], flow_fw, mask) * SCALE)
        valid_fraction.append(float(mask.mean()))
    return WarpErrorResult(per_pair=per_pair, mean=float(np.mean(per_pair)), valid_fraction=valid_fraction)


def flicker(frames, pct: float, seed: int = 0) -> np.ndarray:
    """Multiply each frame's brightness by its own random factor in [1 - pct/100, 1 + pct/100].

    A synthetic "temporally inconsistent edit" for tests and sanity checks. `pct` is in percent
    (8 -> +-8%). Returns uint8 [F, H, W, 3] (clipped to 0..255, rounded), like a real video.
    """
    frames = _as_frames(frames, "frames")
    if not 0 <= pct < 100:
        raise ValueError(f"flicker: pct is a percentage in [0, 100), got {pct}")
    rng = np.random.default_rng(seed)
    factors = rng.uniform(1 - pct / 100, 1 + pct / 100, size=frames.shape[0]).astype(np.float32)
    scaled = frames.astype(np.float32) * factors[:, None, None, None]
    return np.clip(np.round(scaled), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def _read_frames(path: str, max_frames: int | None) -> np.ndarray:
    from tokenflow.media import read_video

    return read_video(path, max_frames=max_frames).frames.numpy()


def source_like_edit(path: str, edited: np.ndarray, max_frames: int | None) -> tuple[np.ndarray, list[str]]:
    """The source frames at the edit's size: an edit made at another size (a run's `size=`) is
    compared with the source resized to cover it and centre-cropped, as the pipeline fits a video."""
    from tokenflow.media import fit_to_size, read_video

    video = read_video(path, max_frames=max_frames)
    h, w = edited.shape[1:3]
    if (video.height, video.width) == (h, w):
        return video.frames.numpy(), []
    fitted = fit_to_size(video, (h, w), multiple=1)
    note = (f"the source is {hw(video.height, video.width)} and the edit {hw(h, w)} ([H, W]): measured against the source "
            f"resized and centre-cropped to {hw(h, w)} ({'; '.join(fitted.notes[len(video.notes):])}); "
            f"--run RUN_DIR measures against the exact frames a run read")
    return fitted.frames.numpy(), [note]


def run_frames(run_dir: Path, max_frames: int | None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(source, edited, notes) of a `tokenflow` run folder: the source exactly as the run read it
    (its config.yaml's video, frame selection and size, through the pipeline's own loader) and the
    edit it wrote (frames/ when output.png_frames=true, lossless; else edited.mp4)."""
    import json

    from tokenflow.config import read_run_config
    from tokenflow.inputs import load_video
    from tokenflow.media import read_video
    from tokenflow.models.presets import RANDOM

    run_dir = Path(run_dir)
    for name in ("config.yaml", "run.json"):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(f"{run_dir}: no {name} here; --run takes the folder of a finished tokenflow run "
                                    f"(outputs/DATE/TIME, with config.yaml, edited.mp4 and run.json)")
    cfg = read_run_config(run_dir / "config.yaml")
    facts = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    video = load_video(cfg)
    if list(video.indices) != facts["source_indices"] or [video.height, video.width] != facts["size"]:
        raise ValueError(f"{run_dir}: {cfg.video} now reads as frames {video.indices[:3]}... at {hw(video.height, video.width)}, "
                         f"not the run's frames {facts['source_indices'][:3]}... at {hw(*facts['size'])} ([H, W]): "
                         f"the source changed since the run")
    edited_path = run_dir / "frames" if (run_dir / "frames").is_dir() else run_dir / "edited.mp4"
    source = video.frames.numpy()[:max_frames]
    edited = read_video(edited_path, max_frames=max_frames).frames.numpy()
    notes = [f"source: {video.path}, frames {video.indices[0]}..{video.indices[-1]} at {hw(video.height, video.width)} ([H, W]) "
             f"(as the run read it); edit: {edited_path}"]
    if cfg.model.source == RANDOM:
        notes.append(f"this run used model={cfg.model.name} (random weights): its output is noise and its warp error "
                     "says nothing about TokenFlow")
    return source, edited, notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.warp_error",
        description="Warp error (Lai et al. 2018) of an edited video along the optical flow of its source "
                    "video, x1e-3 (the unit of the TokenFlow paper's Table 1). Prints one line per frame "
                    "pair, then the mean on the last line.",
        allow_abbrev=False,
    )
    parser.add_argument("--run", default=None, metavar="RUN_DIR",
                        help="a tokenflow run folder: its edit against the source exactly as the run read it "
                             "(instead of --source and --edited)")
    parser.add_argument("--source", default=None, help="original video (file, or folder of images); flow is computed on it")
    parser.add_argument("--edited", default=None,
                        help="edited video with the source's frame count; at another size the source is resized and "
                             "centre-cropped to it (as a run's size= does), and a line says so")
    parser.add_argument("--method", default="dis", choices=METHODS, help="optical flow: dis (OpenCV, default) or raft (needs torchvision + weights)")
    parser.add_argument("--raft-weights", default=None, help="RAFT-large weights (.safetensors) for --method raft")
    parser.add_argument("--max-frames", type=int, default=None, help="use only the first N frames of both videos")
    parser.add_argument("--csv", default=None, help="write per-pair errors to this CSV file")
    parser.add_argument("--keep-out-of-frame", action="store_true",
                        help="do not mask pixels whose flow leaves the frame (Lai et al.'s code does not)")
    parser.add_argument("--flicker", type=float, default=None, metavar="PCT",
                        help="dev check: first scale each edited frame's brightness by a random factor in 1 +- PCT%%")
    parser.add_argument("--seed", type=int, default=0, help="random seed for --flicker")
    args = parser.parse_args(argv)
    if args.max_frames is not None and args.max_frames < 2:
        parser.error(f"--max-frames must be at least 2 (one pair), got {args.max_frames}")
    if (args.run is None) == (args.source is None and args.edited is None):
        parser.error("give either --run RUN_DIR, or --source and --edited")
    if args.run is None and (args.source is None or args.edited is None):
        parser.error("--source and --edited go together (or --run RUN_DIR alone)")

    try:
        if args.run is not None:
            source, edited, notes = run_frames(Path(args.run), args.max_frames)
        else:
            edited = _read_frames(args.edited, args.max_frames)
            source, notes = source_like_edit(args.source, edited, args.max_frames)
        for note in notes:
            print(f"note: {note}")
        if args.flicker is not None:
            edited = flicker(edited, args.flicker, seed=args.seed)
        result = warp_error(source, edited, method=args.method, mask_out_of_frame=not args.keep_out_of_frame,
                            raft_weights=args.raft_weights)
    except (ValueError, RuntimeError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    for t, (err, valid) in enumerate(zip(result.per_pair, result.valid_fraction)):
        print(f"pair {t:4d}-{t + 1:<4d} warp error {err:8.3f} x1e-3  (valid pixels {100 * valid:5.1f}%)")
    if args.csv:
        csv_path = Path(args.csv)
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        with open(csv_path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["frame_t", "frame_t_plus_1", "warp_error_x1e-3", "valid_fraction"])
            for t, (err, valid) in enumerate(zip(result.per_pair, result.valid_fraction)):
                writer.writerow([t, t + 1, f"{err:.6f}", f"{valid:.6f}"])
        print(f"wrote per-pair warp errors to {csv_path.resolve()}")
    print(f"mean warp error: {result.mean:.3f} x1e-3 ({len(result.per_pair)} pairs, {args.method} flow)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
