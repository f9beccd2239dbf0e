"""Figure layout for the paper's figures (the figure tools, the web app): a grid of equally sized
RGB tiles with text labels, drawn with matplotlib (the one way the project draws) and written as a PNG.

The tiles are token maps and frames whose pixels ARE the result, so they are placed pixel for pixel
(`Figure.figimage`, no resampling) on a figure exactly as large as the layout, and only the labels
are matplotlib text. `tile_grid` returns the rendered image with the layout (where every tile
sits), so tests and callers can read a tile back out of the written PNG exactly (PNG is lossless).
Images here are numpy uint8 [H, W, 3] RGB.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

FONT_SIZE = 11  # points; at DPI 100 a label line is about 15 px high
DPI = 100  # pixels per inch of the rendered figure: figure size (inches) = pixels / DPI
PAD = 6  # pixels around text
GAP = 4  # pixels between tiles
BACKGROUND = 255  # white paper
INK = "black"


@dataclass
class GridLayout:
    rows: int
    cols: int
    tile_hw: tuple[int, int]
    boxes: list[list[tuple[int, int]]]  # boxes[r][c] = (top, left) of tile (r, c)
    shape: tuple[int, int, int]  # of the whole image

    def tile(self, image: np.ndarray, r: int, c: int) -> np.ndarray:
        top, left = self.boxes[r][c]
        return image[top : top + self.tile_hw[0], left : left + self.tile_hw[1]]


def _figure(width: int, height: int):
    """A blank off-screen matplotlib figure of exactly width x height pixels, and its canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, facecolor=(BACKGROUND / 255,) * 3)
    return fig, FigureCanvasAgg(fig)


def text_size(text: str) -> tuple[int, int]:
    """(width, height) in pixels that `text` takes, padding included."""
    fig, canvas = _figure(100, 100)
    extent = fig.text(0, 0, text, fontsize=FONT_SIZE).get_window_extent(canvas.get_renderer())
    return int(np.ceil(extent.width)) + 2 * PAD, int(np.ceil(extent.height)) + 2 * PAD


def put_text(fig, text: str, top: int, left: int) -> None:
    """Draw `text` with its padded box's top-left corner at pixel (top, left) of the figure."""
    from matplotlib.transforms import IdentityTransform

    height = fig.bbox.height  # display coordinates start at the bottom
    fig.text(left + PAD, height - top - PAD, text, fontsize=FONT_SIZE, color=INK, va="top", ha="left",
             transform=IdentityTransform())


def upsample_nearest(image: np.ndarray, factor: int) -> np.ndarray:
    """[h, w, C] -> [h*factor, w*factor, C], every pixel a factor x factor block (token grids stay
    readable as blocks, no smoothing that would invent in-between features)."""
    if factor < 1:
        raise ValueError(f"upsample factor must be >= 1, got {factor}")
    return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)


def tile_grid(
    tiles: list[list[np.ndarray]], *, row_labels: list[str] | None = None, col_labels: list[str] | None = None,
) -> tuple[np.ndarray, GridLayout]:
    """Tiles [rows][cols] of uint8 [h, w, 3] (all the same size) -> one uint8 RGB image, labels in a
    left column (rows) and a top strip (columns)."""
    rows = len(tiles)
    if rows == 0 or any(len(r) != len(tiles[0]) for r in tiles) or len(tiles[0]) == 0:
        raise ValueError(f"tile_grid: need a non-empty rectangle of tiles, got rows of lengths {[len(r) for r in tiles]}")
    cols = len(tiles[0])
    h, w = tiles[0][0].shape[:2]
    for r, row in enumerate(tiles):
        for c, t in enumerate(row):
            if t.shape != (h, w, 3) or t.dtype != np.uint8:
                raise ValueError(f"tile_grid: tile ({r}, {c}) is {t.dtype} {t.shape}, expected uint8 {(h, w, 3)}")
    for what, labels, n in (("row_labels", row_labels, rows), ("col_labels", col_labels, cols)):
        if labels is not None and len(labels) != n:
            raise ValueError(f"tile_grid: {len(labels)} {what} for {n} {what.split('_')[0]}s")

    left0 = max((text_size(s)[0] for s in row_labels), default=0) if row_labels else 0
    top0 = max((text_size(s)[1] for s in col_labels), default=0) if col_labels else 0
    height = top0 + rows * h + (rows - 1) * GAP
    # a column label wider than its tile runs over the gap; the last one gets room at the right edge
    overflow = max(0, text_size(col_labels[-1])[0] - w) if col_labels else 0
    width = left0 + cols * w + (cols - 1) * GAP + overflow
    fig, canvas = _figure(width, height)
    boxes = []
    for r in range(rows):
        top = top0 + r * (h + GAP)
        boxes.append([])
        for c in range(cols):
            left = left0 + c * (w + GAP)
            # figimage: the tile's pixels as they are at a pixel offset (from the bottom-left corner)
            fig.figimage(tiles[r][c], xo=left, yo=height - top - h, origin="upper", resize=False)
            boxes[r].append((top, left))
        if row_labels:
            put_text(fig, row_labels[r], top + max(0, (h - text_size(row_labels[r])[1]) // 2), 0)
    if col_labels:
        for c, label in enumerate(col_labels):
            put_text(fig, label, 0, left0 + c * (w + GAP))
    canvas.draw()
    image = np.asarray(canvas.buffer_rgba())[..., :3].copy()  # [height, width, 3] uint8
    if image.shape[:2] != (height, width):
        raise RuntimeError(f"tile_grid: matplotlib rendered {image.shape[1]}x{image.shape[0]} px, expected {width}x{height}")
    return image, GridLayout(rows=rows, cols=cols, tile_hw=(h, w), boxes=boxes, shape=image.shape)


def write_png(path: Path | str, rgb: np.ndarray) -> Path:
    """Write an RGB uint8 image as PNG (creating the folder), pixel for pixel; returns the absolute path."""
    from matplotlib.image import imsave

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"{path}: figures are written as .png")
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"{path}: write_png takes uint8 [H, W, 3] RGB, got {rgb.dtype} {rgb.shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    imsave(path, np.ascontiguousarray(rgb), format="png")
    return path.resolve()


def read_png(path: Path | str) -> np.ndarray:
    """A PNG written by write_png, back as RGB uint8."""
    from matplotlib.image import imread

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a readable image")
    image = imread(path)  # PNG: float32 in [0, 1], RGB or RGBA
    return np.round(image[..., :3] * 255).astype(np.uint8)
