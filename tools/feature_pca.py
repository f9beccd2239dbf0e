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
import torch
from torch import Tensor

from tokenflow.config import RunConfig
from tokenflow.edit import EditSettings

from .feature_capture import (
    HIGHEST_RES_DECODER_LAYER, SourceVideo, default_step, edited_tokens, prepare_source, token_grid,
)
from .figure_layout import GridLayout, tile_grid, upsample_nearest, write_png

LOW_PERCENTILE, HIGH_PERCENTILE = 1.0, 99.0  # colour range: robust to a few extreme tokens


@dataclass
class PCA:
    mean: Tensor  # [C]
    components: Tensor  # [k, C] unit rows, by decreasing variance
    explained_variance: Tensor  # [k] variance of the data along each component
    total_variance: float  # sum over all C directions: explained_variance / total_variance is the ratio

    def project(self, tokens: Tensor) -> Tensor:
        """[..., C] -> [..., k]"""
        return (tokens.double() - self.mean) @ self.components.T


def fit_pca(tokens: Tensor, k: int = 3) -> PCA:
    """Principal components of tokens [M, C] (rows are samples), from the eigendecomposition of the
    C x C covariance in float64 (C is at most 1280: cheap and exact, unlike a randomised SVD).
    Each component's sign is fixed so that its largest-magnitude loading is positive (repeatable colours)."""
    if tokens.ndim != 2 or tokens.shape[0] < 2:
        raise ValueError(f"fit_pca: need tokens [M >= 2, C], got {tuple(tokens.shape)}")
    if not 1 <= k <= tokens.shape[1]:
        raise ValueError(f"fit_pca: k={k} components from {tokens.shape[1]} channels")
    x = tokens.double()
    mean = x.mean(0)
    centred = x - mean
    cov = centred.T @ centred / (x.shape[0] - 1)  # [C, C]
    values, vectors = torch.linalg.eigh(cov)  # ascending
    order = torch.argsort(values, descending=True)[:k]
    components = vectors[:, order].T  # [k, C]
    signs = torch.sign(components.gather(1, components.abs().argmax(1, keepdim=True)))
    return PCA(mean=mean, components=components * signs, explained_variance=values[order].clamp(min=0),
               total_variance=float(torch.diagonal(cov).sum()))


def colour_range(projected: Tensor) -> tuple[Tensor, Tensor]:
    """Per-component (low, high) percentiles of projections [M, 3]: the RGB range of every row."""
    p = projected.double()
    return (torch.quantile(p, LOW_PERCENTILE / 100, dim=0), torch.quantile(p, HIGH_PERCENTILE / 100, dim=0))


def to_rgb(projected: Tensor, low: Tensor, high: Tensor) -> np.ndarray:
    """[..., 3] projections -> uint8 [..., 3]: component i -> channel i (R, G, B), low..high -> 0..255."""
    unit = ((projected.double() - low) / (high - low).clamp(min=1e-12)).clamp(0, 1)
    return (unit * 255).round().to(torch.uint8).numpy()


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
