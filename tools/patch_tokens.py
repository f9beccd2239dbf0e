"""Pixels <-> tokens for the weight-free propagation demo (tools/toy_propagation.py).

A frame of H x W pixels is cut into a token grid of (H / s) x (W / s) tokens, s the token stride
(8 px at 512 px: the 64 x 64 grid of Stable Diffusion's highest-resolution layers). What a token
carries here is the 2s x 2s pixel patch centred on its s x s block, so neighbouring tokens overlap
by half a patch. Putting tokens back is overlap-add with a separable tent window of width 2s: at
stride s the tents of the tokens covering a pixel sum to one, so tokens taken from a frame and put
back unchanged give the frame back exactly (borders included: the sum of windows is divided out).

Why overlapping patches: a propagated frame is assembled from tokens of OTHER frames (the
keyframes), which rarely line up on the frame's own grid; hard s x s blocks would show every
mismatch as a seam, the tent blends neighbouring tokens across it as a decoder smooths features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def check_stride(height: int, width: int, stride: int) -> None:
    if stride < 2 or stride % 2:
        raise ValueError(f"token stride must be an even number of pixels >= 2, got {stride}")
    if height % stride or width % stride:
        raise ValueError(f"a {width}x{height} frame does not split into {stride} px token blocks; "
                         f"pick a size that is a multiple of {stride}")


def tent_window(stride: int) -> Tensor:
    """[2s, 2s] separable tent; shifted copies at stride s sum to exactly 1 in the interior."""
    u = torch.arange(2 * stride, dtype=torch.float64) + 0.5  # pixel centres in [0, 2s]
    tent = 1 - (u - stride).abs() / stride  # peak 1 at the patch centre, 1/(2s) at its edges
    return (tent[:, None] * tent[None, :]).float()


def to_tokens(images: Tensor, stride: int) -> Tensor:
    """images float [F, 3, H, W] -> tokens [F, N, 3 * 2s * 2s], N = (H/s)(W/s) row-major,
    each the 2s x 2s patch centred on its block (zero outside the frame)."""
    f, c, h, w = images.shape
    check_stride(h, w, stride)
    # kernel 2s, stride s, padding s/2: H/s patch rows, patch j centred on block j's centre
    patches = F.unfold(images, kernel_size=2 * stride, stride=stride, padding=stride // 2)  # [F, C*4s^2, N]
    return patches.transpose(1, 2).contiguous()


def from_tokens(tokens: Tensor, height: int, width: int, stride: int) -> Tensor:
    """tokens [F, N, 3 * 2s * 2s] -> images [F, 3, H, W], overlap-added with the tent window."""
    check_stride(height, width, stride)
    f, n, d = tokens.shape
    channels = d // (4 * stride * stride)
    window = tent_window(stride).to(tokens).repeat(channels, 1, 1).reshape(1, d, 1)  # [1, C*4s^2, 1]
    fold = dict(output_size=(height, width), kernel_size=2 * stride, stride=stride, padding=stride // 2)
    summed = F.fold(tokens.transpose(1, 2) * window, **fold)  # [F, C, H, W]
    weight = F.fold(window.expand(1, d, n).contiguous(), **fold)  # [1, C, H, W]
    return summed / weight
