"""Figure layout for the paper-figure tools: a grid of equally sized RGB tiles with text labels,
written as a PNG through OpenCV (no plotting library).

Images here are numpy uint8 [H, W, 3] RGB; OpenCV wants BGR, which `write_png` converts at the end.
`tile_grid` returns the layout (where every tile sits) with the image, so tests and callers can read
a tile back out of the written PNG exactly (PNG is lossless).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

FONT = cv2.FONT_HERSHEY_SIMPLEX
FONT_SCALE = 0.5
FONT_THICKNESS = 1
PAD = 6  # pixels around text
GAP = 4  # pixels between tiles
BACKGROUND = 255  # white paper
INK = (0, 0, 0)


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


def text_size(text: str) -> tuple[int, int]:
    """(width, height) in pixels that `text` takes, padding included."""
    (w, h), baseline = cv2.getTextSize(text, FONT, FONT_SCALE, FONT_THICKNESS)
    return w + 2 * PAD, h + baseline + 2 * PAD


def put_text(image: np.ndarray, text: str, top: int, left: int) -> None:
    """Draw `text` with its padded box's top-left corner at (top, left), in place."""
    (_, h), _ = cv2.getTextSize(text, FONT, FONT_SCALE, FONT_THICKNESS)
    cv2.putText(image, text, (left + PAD, top + PAD + h), FONT, FONT_SCALE, INK, FONT_THICKNESS, cv2.LINE_AA)


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
    width = left0 + cols * w + (cols - 1) * GAP
    image = np.full((height, width, 3), BACKGROUND, dtype=np.uint8)
    boxes = []
    for r in range(rows):
        top = top0 + r * (h + GAP)
        boxes.append([])
        for c in range(cols):
            left = left0 + c * (w + GAP)
            image[top : top + h, left : left + w] = tiles[r][c]
            boxes[r].append((top, left))
        if row_labels:
            put_text(image, row_labels[r], top + max(0, (h - text_size(row_labels[r])[1]) // 2), 0)
    if col_labels:
        for c, label in enumerate(col_labels):
            put_text(image, label, 0, left0 + c * (w + GAP))
    return image, GridLayout(rows=rows, cols=cols, tile_hw=(h, w), boxes=boxes, shape=image.shape)


def write_png(path: Path | str, rgb: np.ndarray) -> Path:
    """Write an RGB uint8 image as PNG (creating the folder); returns the absolute path."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"{path}: figures are written as .png")
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR)):
        raise OSError(f"{path}: OpenCV could not write the PNG")
    return path.resolve()


def read_png(path: Path | str) -> np.ndarray:
    """A PNG written by write_png, back as RGB uint8."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise FileNotFoundError(f"{path}: not a readable image")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
