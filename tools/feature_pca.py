"""Paper Fig. 2: PCA of self-attention output tokens, original video vs per-frame edit vs TokenFlow.

At one self-attention layer (default the highest-resolution decoder layer) and one denoising step,
the output tokens [F, N, C] of
  (a) the original video (the edit's source branch: inverted latents, inversion prompt),
  (b) the per-frame edit (mode per_frame: PnP on each frame alone),
  (c) the TokenFlow edit (mode tokenflow),
are projected onto the first three principal components of the ORIGINAL's tokens (all chosen frames
pooled), and shown as RGB token maps: rows = variants, columns = frames. One fit and one colour
mapping for all rows, so a colour means the same feature direction everywhere: the paper's point is
that (a) and (c) are consistent across frames while (b) is not.
See tools/feature_capture.py for how the edited tokens are recorded without hooks.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from torch import Tensor

from tokenflow.config import RunConfig
from tokenflow.edit import EditSettings
from tokenflow.figures.layout import GridLayout, tile_grid, upsample_nearest, write_png
from tokenflow.figures.pca import PCA, colour_range, fit_pca, to_rgb

from .feature_capture import (
    HIGHEST_RES_DECODER_LAYER, SourceVideo, default_step, edited_tokens, prepare_source, token_grid,
)


def pca_tiles(
    variants: dict[str, Tensor], grid: tuple[int, int], tile: int = 256, reference: str | None = None,
) -> tuple[list[list[np.ndarray]], PCA]:
    """variants: name -> tokens [F, N, C] (same F, N, C); the PCA and colour range come from
    `reference` (default the first variant). -> tiles [variant][frame] uint8 [tile', tile', 3]."""
    names = list(variants)
    reference = names[0] if reference is None else reference
    shapes = {name: tuple(v.shape) for name, v in variants.items()}
    if len(set(shapes.values())) != 1 or len(shapes[names[0]]) != 3:
        raise ValueError(f"pca_tiles: every variant needs tokens of one shape [F, N, C], got {shapes}")
    f, n, c = variants[reference].shape
    gh, gw = grid
    if gh * gw != n:
        raise ValueError(f"pca_tiles: a {gh}x{gw} token grid does not hold {n} tokens")
    pca = fit_pca(variants[reference].reshape(f * n, c))
    low, high = colour_range(pca.project(variants[reference].reshape(f * n, c)))
    factor = max(1, round(tile / max(gh, gw)))
    tiles = []
    for name in names:
        rgb = to_rgb(pca.project(variants[name]), low, high)  # [F, N, 3]
        tiles.append([upsample_nearest(rgb[i].reshape(gh, gw, 3), factor) for i in range(f)])
    return tiles, pca


def evenly_spaced(n_frames: int, count: int) -> list[int]:
    if count < 1:
        raise ValueError(f"--frames must be >= 1, got {count}")
    count = min(count, n_frames)
    return sorted({round(i * (n_frames - 1) / max(count - 1, 1)) for i in range(count)})


@dataclass
class PCAFigure:
    path: Path
    layout: GridLayout
    frames: list[int]
    step: int
    timestep: int
    layer: str
    explained_ratio: list[float]  # of the original's token variance, first three components


ROW_LABELS = {"original": "original", "per_frame": "per-frame edit", "tokenflow": "TokenFlow"}


def pca_figure(
    cfg: RunConfig, out: Path | str, *, frames: int = 4, step: int | None = None, layer: str = HIGHEST_RES_DECODER_LAYER,
    tile: int = 256, with_input_row: bool = True,
) -> PCAFigure:
    """Fig. 2 for the video and prompt of `cfg` (tokenflow.config.load_config's, as the figures tool makes it)."""
    out = Path(out)
    src: SourceVideo = prepare_source(cfg)
    positions = evenly_spaced(src.clean.shape[0], frames)
    base = EditSettings.from_config(cfg)
    # SDEdit runs only its last steps: the default step counts the steps it runs
    n_run = len(src.timesteps) if base.method == "pnp" else int(len(src.timesteps) * base.sdedit_strength)
    step = default_step(n_run) if step is None else step
    print(f"[figures] PCA of {layer} at step {step}, frames {positions}", file=sys.stderr)

    per_frame = edited_tokens(src, replace(base, mode="per_frame"), positions, step, layer)
    tokenflow = edited_tokens(src, replace(base, mode="tokenflow"), positions, step, layer)
    variants = {"original": per_frame.source, "per_frame": per_frame.edited, "tokenflow": tokenflow.edited}
    grid = token_grid(per_frame.source.shape[1], tuple(src.clean.shape[-2:]))
    tiles, pca = pca_tiles(variants, grid, tile)
    labels = [ROW_LABELS[k] for k in variants]
    if with_input_row:  # the input frames, for orientation (the paper's top row)
        import torch.nn.functional as F

        th, tw = tiles[0][0].shape[:2]
        rgb = src.frames[positions].permute(0, 3, 1, 2).float()
        rgb = F.interpolate(rgb, size=(th, tw), mode="bilinear", antialias=True, align_corners=False)
        tiles.insert(0, [img.round().clamp(0, 255).byte().permute(1, 2, 0).numpy() for img in rgb])
        labels.insert(0, "input")
    image, layout = tile_grid(tiles, row_labels=labels, col_labels=[f"frame {i}" for i in positions])
    path = write_png(out, image)
    return PCAFigure(
        path=path, layout=layout, frames=positions, step=step, timestep=per_frame.timestep, layer=layer,
        explained_ratio=[float(v) / pca.total_variance for v in pca.explained_variance],
    )
