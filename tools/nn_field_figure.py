"""Paper Fig. 3: the original video's features give fine-grained correspondences between frames.

The drawing is tokenflow.figures.nn_field's (the web app draws it too); this is its command-line side.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from tokenflow.config import RunConfig
from tokenflow.figures.layout import GridLayout, write_png
from tokenflow.figures.nn_field import (  # noqa: F401 (the tests and tools import them from here)
    PANELS, TOKEN_KINDS, NNFieldResult, field_colour, nn_field_image, nn_field_panels, panel_row, warp_rgb,
)
from tokenflow.figures.tokens import HIGHEST_RES_DECODER_LAYER

from .feature_capture import prepare_source


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
    fig = nn_field_image(src, 0, 1, step=step, layer=layer, tokens=tokens)
    path = write_png(out, fig.image)
    print(f"[figures] NN field of {layer} ({tokens} tokens, a {list(fig.grid)} (H, W) grid) at step {fig.step}, "
          f"frame {source_frame} -> {target_frame}", file=sys.stderr)
    return NNFieldFigure(path=path, layout=fig.layout, result=fig.result, step=fig.step, timestep=fig.timestep, layer=layer)
