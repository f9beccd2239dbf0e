"""Dense optical flow between two RGB frames, and backward warping with it.

Convention (the same as OpenCV, FlowNet and RAFT): `flow(prev, next)[y, x] = (dx, dy)` means the
content at pixel (x, y) of `prev` is found at (x + dx, y + dy) of `next`, i.e. prev(p) ~ next(p + flow).
So `backward_warp(next, flow(prev, next))` re-draws `next` on `prev`'s pixel grid.

Methods:
- "dis": OpenCV's DIS optical flow (Kroeger et al. 2016), PRESET_MEDIUM, on grayscale. Default:
  needs nothing but opencv, runs offline, ~0.1 s per 512x512 pair on one CPU core.
- "raft": torchvision's RAFT-large. Used where torchvision and its weights exist; neither can be
  downloaded here, so asking for it without them raises an error that says what to install/provide.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

METHODS = ("dis", "raft")

# The file name torchvision gives its RAFT-large (C+T+S+K+H, v2) weights in the torch hub cache.
RAFT_TORCHVISION_CACHE_NAME = "raft_large_C_T_SKHT_V2-ff5fadd5.pth"
RAFT_WEIGHTS_ENV = "TOKENFLOW_RAFT_WEIGHTS"


def _check_rgb_uint8(image: np.ndarray, name: str) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{name}: expected an RGB image [H, W, 3], got shape {tuple(image.shape)}")
    if image.dtype != np.uint8:
        raise ValueError(f"{name}: expected dtype uint8 (0..255), got {image.dtype}")
    return image


# ---------------------------------------------------------------------------------------------
# DIS (OpenCV)
# ---------------------------------------------------------------------------------------------

_dis = None  # one DIS object reused: creating it is cheap, but reuse keeps its buffers


def _dis_flow(prev_rgb: np.ndarray, next_rgb: np.ndarray) -> np.ndarray:
    global _dis
    if _dis is None:
        _dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    # DIS works on one 8-bit channel; luma keeps the texture that matters for matching.
    prev_gray = cv2.cvtColor(np.ascontiguousarray(prev_rgb), cv2.COLOR_RGB2GRAY)
    next_gray = cv2.cvtColor(np.ascontiguousarray(next_rgb), cv2.COLOR_RGB2GRAY)
    return _dis.calc(prev_gray, next_gray, None).astype(np.float32)  # [H, W, 2] (dx, dy)


# ---------------------------------------------------------------------------------------------
# RAFT (torchvision), only where it is installed and its weights are on disk
# ---------------------------------------------------------------------------------------------

_raft = {}  # weights path -> model, built once


def _raft_weights_path(raft_weights: str | os.PathLike | None) -> Path | None:
    """An explicit safetensors file, else $TOKENFLOW_RAFT_WEIGHTS, else None (torchvision's cache)."""
    if raft_weights is None:
        raft_weights = os.environ.get(RAFT_WEIGHTS_ENV) or None
    return None if raft_weights is None else Path(raft_weights)


def _load_raft(raft_weights: str | os.PathLike | None):
    try:
        import torch
        from torchvision.models.optical_flow import Raft_Large_Weights, raft_large
    except ImportError as err:
        raise RuntimeError(
            "flow method 'raft' needs torchvision (RAFT-large lives in torchvision.models.optical_flow), "
            f"which cannot be imported here ({err}). Install a torchvision that matches your torch "
            "(pip install torchvision==<the version paired with your torch>) and provide the weights, "
            f"or use method='dis' (OpenCV, works offline)."
        ) from err

    path = _raft_weights_path(raft_weights)
    key = str(path)
    if key in _raft:
        return _raft[key]
    if path is not None:
        # Weights given as a file: safetensors only (pickles run code on load; see checkpoint.py).
        from tokenflow.models.checkpoint import read_safetensors

        if not path.is_file():
            raise FileNotFoundError(f"RAFT weights file {path} does not exist")
        model = raft_large(weights=None)
        state = read_safetensors(path)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{path}: not torchvision RAFT-large weights (missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]})"
            )
    else:
        # torchvision's own weights, but only if already in the hub cache: fetching them needs network.
        cached = Path(torch.hub.get_dir()) / "checkpoints" / RAFT_TORCHVISION_CACHE_NAME
        if not cached.is_file():
            raise RuntimeError(
                "flow method 'raft' needs RAFT-large weights, and none are available offline: "
                f"not in torchvision's cache ({cached}) and no file given. Pass raft_weights=<file "
                f".safetensors> (or set ${RAFT_WEIGHTS_ENV}) holding torchvision's raft_large state "
                "dict, or use method='dis'."
            )
        model = raft_large(weights=Raft_Large_Weights.C_T_SKHT_V2)
    model = model.eval()
    _raft[key] = model
    return model


def _raft_flow(prev_rgb: np.ndarray, next_rgb: np.ndarray, raft_weights) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    model = _load_raft(raft_weights)
    height, width = prev_rgb.shape[:2]
    # [H, W, 3] uint8 -> [1, 3, H, W] in [-1, 1], the input range torchvision's RAFT weights expect
    pair = [torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1)[None].float() / 127.5 - 1.0
            for im in (prev_rgb, next_rgb)]
    # RAFT downsamples by 8: pad (replicating the border) up to a multiple of 8, crop the flow back.
    pad_h, pad_w = (-height) % 8, (-width) % 8
    pair = [F.pad(im, (0, pad_w, 0, pad_h), mode="replicate") for im in pair]
    with torch.no_grad():
        flow = model(pair[0], pair[1])[-1]  # the last refinement: [1, 2, H', W']
    return flow[0, :, :height, :width].permute(1, 2, 0).numpy().astype(np.float32)


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------


def flow(prev_rgb: np.ndarray, next_rgb: np.ndarray, *, method: str = "dis",
         raft_weights: str | os.PathLike | None = None) -> np.ndarray:
    """Optical flow from `prev_rgb` to `next_rgb` (uint8 [H, W, 3]) -> float32 [H, W, 2] (dx, dy).

    prev(x, y) ~ next(x + dx, y + dy). `raft_weights` is only read by method="raft".
    """
    prev_rgb = _check_rgb_uint8(prev_rgb, "prev_rgb")
    next_rgb = _check_rgb_uint8(next_rgb, "next_rgb")
    if prev_rgb.shape != next_rgb.shape:
        raise ValueError(f"flow: prev_rgb {prev_rgb.shape} and next_rgb {next_rgb.shape} differ in size")
    if method == "dis":
        return _dis_flow(prev_rgb, next_rgb)
    if method == "raft":
        return _raft_flow(prev_rgb, next_rgb, raft_weights)
    raise ValueError(f"unknown flow method {method!r}; choose one of {METHODS}")


def backward_warp(image: np.ndarray, flow_field: np.ndarray) -> np.ndarray:
    """Sample `image` ([H, W] or [H, W, C]) at (x + dx, y + dy) with bilinear interpolation.

    Border: coordinates are clamped to the image (replicate the edge pixel), which is what Lai et
    al.'s Resample2d layer (FlowNet2) does; pixels whose target leaves the frame therefore get the
    edge colour, and callers that care mask them (see `tools.warp_error.out_of_frame_mask`).
    Written in numpy rather than cv2.remap because remap quantizes sub-pixel positions to 1/32 px.
    Returns float32 with the image's shape.
    """
    image = np.asarray(image)
    flow_field = np.asarray(flow_field, dtype=np.float32)
    height, width = image.shape[:2]
    if flow_field.shape != (height, width, 2):
        raise ValueError(f"backward_warp: flow shape {tuple(flow_field.shape)} does not match image "
                         f"{tuple(image.shape)}; expected ({height}, {width}, 2)")
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    x = np.clip(xs + flow_field[..., 0], 0, width - 1)
    y = np.clip(ys + flow_field[..., 1], 0, height - 1)
    x0 = np.floor(x).astype(np.int64)
    y0 = np.floor(y).astype(np.int64)
    x1 = np.minimum(x0 + 1, width - 1)
    y1 = np.minimum(y0 + 1, height - 1)
    wx = x - x0
    wy = y - y0
    img = image.astype(np.float32)
    if img.ndim == 3:  # broadcast the [H, W] weights over channels
        wx, wy = wx[..., None], wy[..., None]
    top = img[y0, x0] * (1 - wx) + img[y0, x1] * wx
    bottom = img[y1, x0] * (1 - wx) + img[y1, x1] * wx
    return (top * (1 - wy) + bottom * wy).astype(np.float32)
