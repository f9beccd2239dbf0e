"""Pixels: any decoded pixel format -> 8-bit RGB, with the source's colour range and matrix.

Cameras write 10-bit (yuv420p10le), full-chroma (yuv444p), full-range (yuvj420p, "pc" range) or
alpha (rgba) frames besides the common 8-bit yuv420p. FFmpeg's scaler converts each of them to
rgb24; what it must be told is the source's colour range: left unset it assumes the limited
(16..235) range, which washes out a full-range clip. The matrix (BT.601/709/2020) it takes from the
frame. Reading 10-bit samples as 8-bit ones is what turns frames green and purple; going through
the scaler avoids that.
"""

from __future__ import annotations

import numpy as np

PLAIN_FORMATS = ("yuv420p", "yuvj420p", "rgb24")  # formats that need no word in the run facts


def to_rgb24(frame) -> np.ndarray:
    """A decoded av.VideoFrame -> uint8 [H, W, 3] RGB."""
    if frame.format.name == "rgb24":
        return frame.to_ndarray()
    kwargs = {}
    if not frame.format.is_rgb and frame.color_range:  # 0: unspecified, leave the scaler's default
        kwargs["src_color_range"] = frame.color_range
    return frame.to_ndarray(format="rgb24", **kwargs)


def bit_depth(pixel_format: str) -> int:
    import av

    return max(c.bits for c in av.VideoFormat(pixel_format).components)


def describe(pixel_format: str) -> str | None:
    """A sentence for the run facts when the source is not plain 8-bit; None when it is."""
    if pixel_format in PLAIN_FORMATS:
        return None
    import av

    fmt = av.VideoFormat(pixel_format)
    what = [f"{bit_depth(pixel_format)}-bit"]
    if any(c.is_alpha for c in fmt.components):
        what.append("alpha dropped")
    return f"source pixel format {pixel_format} ({', '.join(what)}): converted to 8-bit RGB"
