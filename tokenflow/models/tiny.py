"""`build_tiny_models`: the random tiny models under the name callers use until they move to
`tokenflow.models.build_models` (a random build is any preset's; see random_weights.py)."""

from __future__ import annotations

import torch

from .bundle import Models
from .presets import PRESETS
from .random_weights import build_random


def build_tiny_models(seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu", source: str = "tiny") -> Models:
    tiny = [name for name, p in PRESETS.items() if p.random_only]
    if source not in tiny:
        raise ValueError(f"no tiny model {source!r}; there are {', '.join(tiny)}")
    return build_random(source, seed=seed, dtype=dtype, device=device)
