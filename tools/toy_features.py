"""Weight-free token features that carry real correspondences, for tools/toy_propagation.py.

TokenFlow matches the ORIGINAL video's diffusion features phi(x^i) between frames (Eq. 5). Without
a trained network, the features here are hand-made from the original frames on the same token grid
(one token per s x s block), and built so that the project's `nn_field` (cosine similarity of the
whole vector) finds the same place of the scene in another frame:

  texture   the luma of the 2s x 2s patch centred on the block, and of the 4s x 4s patch around it
            (more context, against repeated texture), each pooled to a few values, mean removed and
            scaled to unit length: their dot product is normalised cross-correlation, blind to
            brightness and contrast. A flat patch (no texture to match) shrinks towards zero instead
            of having its noise blown up to unit length (`FLAT`), so colour and position decide there.
  colour    the block's mean RGB minus the clip's mean colour (what a flat patch still tells apart).
  position  sin/cos of the block centre at two low frequencies (periods 2x and 1x the frame side):
            the dot product of two of these falls with the distance, a mild pull towards nearby
            matches, like the positional information real diffusion features carry (padding, the
            layout the network saw).

The weights of the parts (TEXTURE_WEIGHTS, COLOUR_WEIGHT, POSITION_WEIGHT) set what a match must
agree on; with them the NN field of the shared clips follows the optical flow (tools/toy_propagation
reports how closely). Shapes: frames float [F, 3, H, W] in [0, 1] -> tokens [F, N, C], N = (H/s)(W/s).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .patch_tokens import check_stride

DESCRIPTOR_SIDE = 4  # each texture window is pooled to about 4 x 4 ... 8 x 8 values
TEXTURE_WEIGHTS = (1.0, 0.7)  # the 2s window, the 4s window
COLOUR_WEIGHT = 2.0
POSITION_WEIGHT = 0.5
FLAT = 0.02  # luma std (0..1) below which a patch counts as flat
LUMA = (0.299, 0.587, 0.114)


def luma(images: Tensor) -> Tensor:
    """[F, 3, H, W] -> [F, 1, H, W]"""
    return (images * torch.tensor(LUMA, dtype=images.dtype)[None, :, None, None]).sum(1, keepdim=True)


def texture_descriptor(grey: Tensor, stride: int, window: int) -> Tensor:
    """Normalised luma patches of side `window` (a multiple of the stride s) centred on every block.
    grey [F, 1, H, W] -> [F, N, D]."""
    # the largest pooling that keeps ~DESCRIPTOR_SIDE..2x values a side and an even step on the grid
    pool = max(p for p in range(1, stride + 1)
               if p <= max(1, window // (2 * DESCRIPTOR_SIDE)) and stride % p == 0 and (stride // p) % 2 == 0)
    pooled = F.avg_pool2d(grey, pool) if pool > 1 else grey
    step, side = stride // pool, window // pool
    pad = (side - step) // 2  # patch j centred on block j's centre
    patches = F.unfold(pooled, kernel_size=side, stride=step, padding=pad).transpose(1, 2)  # [F, N, side^2]
    centred = patches - patches.mean(-1, keepdim=True)
    flat = FLAT * math.sqrt(centred.shape[-1])  # the norm a patch of std FLAT has
    return centred / (centred.norm(dim=-1, keepdim=True) ** 2 + flat ** 2).sqrt()


def position_code(grid_h: int, grid_w: int) -> Tensor:
    """[N, 8]: cos/sin of pi k x / W and pi k y / H at the block centres, k = 1, 2."""
    ys, xs = torch.meshgrid((torch.arange(grid_h) + 0.5) / grid_h, (torch.arange(grid_w) + 0.5) / grid_w, indexing="ij")
    parts = []
    for k in (1, 2):
        for c in (xs, ys):
            parts += [torch.cos(math.pi * k * c), torch.sin(math.pi * k * c)]
    return torch.stack(parts, -1).reshape(grid_h * grid_w, -1) / math.sqrt(2)  # unit-ish norm


def toy_features(frames: Tensor, stride: int) -> Tensor:
    """The demo's phi(x^i): frames float [F, 3, H, W] in [0, 1] -> tokens [F, N, C] (see module doc)."""
    f, _, h, w = frames.shape
    check_stride(h, w, stride)
    grey = luma(frames)
    grey = F.avg_pool2d(F.pad(grey, (1, 1, 1, 1), mode="replicate"), 3, stride=1)  # a little less noise
    parts = [weight * texture_descriptor(grey, stride, window)
             for weight, window in zip(TEXTURE_WEIGHTS, (2 * stride, 4 * stride))]
    colour = F.avg_pool2d(frames, stride).flatten(2).transpose(1, 2)  # [F, N, 3]
    parts.append(COLOUR_WEIGHT * (colour - frames.mean(dim=(0, 2, 3))[None, None]))
    parts.append(POSITION_WEIGHT * position_code(h // stride, w // stride).to(frames)[None].expand(f, -1, -1))
    return torch.cat(parts, dim=-1)
