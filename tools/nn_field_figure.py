"""Paper Fig. 3: the original video's features give fine-grained correspondences between frames.

At one self-attention layer (default the highest-resolution decoder layer) and one sampling step,
the ORIGINAL video's tokens of a source frame (think: a keyframe) and a target frame give the NN
field gamma[p] = argmin_q cosine distance(target[p], source[q]) (tokenflow.propagation.nn_field,
Eq. 5). From it the target is reconstructed
  (a) in feature space: every target token replaced by its nearest source token, shown with a PCA
      colouring fitted on the source and target tokens together;
  (b) in RGB: every target pixel takes the source pixel at the same offset inside the matched
      token's block (a token covers an s x s pixel block, s = frame size / token grid size);
  (c) and the field itself is drawn as colour: matched source column -> red, row -> green.
PNG panels: source frame | target frame | feature reconstruction | RGB warp | NN field.
Which tokens are matched: the self-attention INPUTS by default, as TokenFlow's propagation matches
them (controls.py records phi(x) as the inputs); `tokens="output"` uses the outputs, the paper's
wording for Fig. 3.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from tokenflow.config import RunConfig
from tokenflow.propagation import nn_field

from .feature_capture import HIGHEST_RES_DECODER_LAYER, default_step, original_tokens, prepare_source, token_grid
from .feature_pca import colour_range, fit_pca, to_rgb
from .figure_layout import GridLayout, tile_grid, upsample_nearest, write_png

PANELS = ("source frame", "target frame", "feature recon.", "RGB warp", "NN field")
TOKEN_KINDS = ("input", "output")


def block_size(image_hw: tuple[int, int], grid: tuple[int, int]) -> tuple[int, int]:
    (h, w), (gh, gw) = image_hw, grid
    if h % gh or w % gw:
        raise ValueError(f"a {w}x{h} frame does not split into the {gw}x{gh} token grid's blocks")
    return h // gh, w // gw


def warp_rgb(source_rgb: np.ndarray, field: Tensor, grid: tuple[int, int]) -> np.ndarray:
    """Target pixel (y, x) in token block (y // s, x // s) <- source pixel at the same offset in the
    block of the matched source token. source_rgb [H, W, 3]; field [gh * gw] -> [H, W, 3]."""
    h, w = source_rgb.shape[:2]
    bh, bw = block_size((h, w), grid)
    gh, gw = grid
    qy, qx = (field // gw).reshape(gh, gw).numpy(), (field % gw).reshape(gh, gw).numpy()
    ys, xs = np.mgrid[0:h, 0:w]
    src_y = qy[ys // bh, xs // bw] * bh + ys % bh  # [H, W]
    src_x = qx[ys // bh, xs // bw] * bw + xs % bw
    return source_rgb[src_y, src_x]


def field_colour(field: Tensor, grid: tuple[int, int]) -> np.ndarray:
    """The NN field as colour on the token grid, uint8 [gh, gw, 3]: red = matched column / (gw - 1),
    green = matched row / (gh - 1), blue 0 (the identity field is a red-green ramp)."""
    gh, gw = grid
    qy, qx = (field // gw).reshape(gh, gw).double(), (field % gw).reshape(gh, gw).double()
    rgb = torch.stack([qx / max(gw - 1, 1), qy / max(gh - 1, 1), torch.zeros_like(qx)], dim=-1)
    return (rgb * 255).round().to(torch.uint8).numpy()


def mean_cosine(a: Tensor, b: Tensor) -> float:
    return float(F.cosine_similarity(a.float(), b.float(), dim=-1).mean())


@dataclass
class NNFieldResult:
    panels: dict[str, np.ndarray]  # name (PANELS) -> uint8 [H, W, 3]
    field: Tensor  # [N] index of each target token's NN among the source tokens
    warp_error: float  # mean |RGB warp - target| over pixels and channels, 0..255
    identity_error: float  # mean |source - target|: what not warping at all would give
    recon_cosine: float  # mean cosine(reconstructed token, target token)
    identity_cosine: float  # mean cosine(source token at the same place, target token)


def nn_field_panels(
    source_rgb: np.ndarray, target_rgb: np.ndarray, source_tokens: Tensor, target_tokens: Tensor, grid: tuple[int, int],
) -> NNFieldResult:
    """The five panels of Fig. 3 from two frames (uint8 [H, W, 3]) and their tokens [N, C]."""
    if source_rgb.shape != target_rgb.shape or source_rgb.ndim != 3:
        raise ValueError(f"source and target frames must be [H, W, 3] of one size, got {source_rgb.shape} and {target_rgb.shape}")
    if source_tokens.shape != target_tokens.shape or source_tokens.shape[0] != grid[0] * grid[1]:
        raise ValueError(f"tokens must both be [{grid[0] * grid[1]}, C] for a {grid[0]}x{grid[1]} grid, "
                         f"got {tuple(source_tokens.shape)} and {tuple(target_tokens.shape)}")
    h, w = source_rgb.shape[:2]
    bh, bw = block_size((h, w), grid)
    field = nn_field(target_tokens[None], source_tokens[None])[0]  # [N]
    recon = source_tokens[field]  # (a) [N, C]

    both = torch.cat([source_tokens, target_tokens])
    pca = fit_pca(both)
    low, high = colour_range(pca.project(both))
    recon_rgb = to_rgb(pca.project(recon), low, high).reshape(*grid, 3)
    warped = warp_rgb(source_rgb, field, grid)  # (b)

    def blocks(img):  # token grid -> pixel blocks of the frame size
        return np.repeat(np.repeat(img, bh, axis=0), bw, axis=1)

    panels = dict(zip(PANELS, (source_rgb, target_rgb, blocks(recon_rgb), warped, blocks(field_colour(field, grid)))))
    target_f = target_rgb.astype(np.float64)
    return NNFieldResult(
        panels=panels, field=field,
        warp_error=float(np.abs(warped.astype(np.float64) - target_f).mean()),
        identity_error=float(np.abs(source_rgb.astype(np.float64) - target_f).mean()),
        recon_cosine=mean_cosine(recon, target_tokens), identity_cosine=mean_cosine(source_tokens, target_tokens),
    )


def panel_row(panels: dict[str, np.ndarray], min_side: int = 256) -> tuple[np.ndarray, GridLayout]:
    """The panels side by side, titled, enlarged by a whole factor (nearest) to at least min_side px."""
    h, w = next(iter(panels.values())).shape[:2]
    factor = max(1, -(-min_side // min(h, w)))
    return tile_grid([[upsample_nearest(p, factor) for p in panels.values()]], col_labels=list(panels))


@dataclass
class NNFieldFigure:
    path: Path
    layout: GridLayout
    result: NNFieldResult
    step: int
    timestep: int
    layer: str


def nn_field_figure(
    cfg: RunConfig, out: Path | str, *, source_frame: int = 0, target_frame: int = 5, step: int | None = None,
    layer: str = HIGHEST_RES_DECODER_LAYER, tokens: str = "input",
) -> NNFieldFigure:
    """Fig. 3 for the video of `cfg` (tokenflow.config.load_config's, as the figures tool makes it)."""
    if tokens not in TOKEN_KINDS:
        raise ValueError(f"tokens must be one of {TOKEN_KINDS}, got {tokens!r}")
    if source_frame == target_frame:
        raise ValueError(f"source and target frame are both {source_frame}: pick two different frames")
    out = Path(out)
    # only the two frames are encoded and inverted
    src = prepare_source(cfg, frames=[source_frame, target_frame])
    step = default_step(len(src.timesteps)) if step is None else step
    inputs, outputs = original_tokens(src, [0, 1], step, layer)
    chosen = inputs if tokens == "input" else outputs  # [2, N, C]
    grid = token_grid(chosen.shape[1], tuple(src.clean.shape[-2:]))
    frames = src.frames.numpy()
    result = nn_field_panels(frames[0], frames[1], chosen[0], chosen[1], grid)
    image, layout = panel_row(result.panels)
    path = write_png(out, image)
    print(f"[figures] NN field of {layer} ({tokens} tokens, a {list(grid)} (H, W) grid) at step {step}, "
          f"frame {source_frame} -> {target_frame}", file=sys.stderr)
    return NNFieldFigure(path=path, layout=layout, result=result, step=step, timestep=src.timesteps[step], layer=layer)
