"""Principal components of feature tokens, and their first three as RGB: how the figures colour
token maps (the paper's Fig. 2 and Fig. 3's feature reconstruction)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

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
