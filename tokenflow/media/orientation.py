"""Orientation: stand frames upright the way players show them.

A phone stores a portrait clip as landscape pictures plus a display matrix (MP4/MOV) or an old
`rotate` tag saying how far to turn them. FFmpeg decodes the stored pictures; players, and so the
people choosing an edit, see them turned. We turn each frame by the stream's rotation right after
decoding, so the edit works on, and writes, upright frames (the written file carries no rotation).

Angles here are counter-clockwise degrees, as FFmpeg's display matrix reads (av_display_rotation_get,
PyAV's `VideoFrame.rotation`); the `rotate` tag counts clockwise, so it is negated.
"""

from __future__ import annotations

import numpy as np


def stream_rotation(stream, first_frame) -> int:
    """Counter-clockwise degrees (0, 90, 180 or 270) to turn the decoded frames by to show them upright."""
    degrees = first_frame.rotation  # the display matrix FFmpeg attaches to each decoded frame
    if not degrees:
        tag = stream.metadata.get("rotate")  # containers older muxers tagged instead
        try:
            degrees = -int(float(tag)) if tag is not None else 0
        except ValueError:
            degrees = 0
    return normalise(degrees)


def normalise(degrees: float) -> int:
    """Any angle -> the nearest of 0, 90, 180, 270 (display matrices hold rounding noise)."""
    return int(round(degrees / 90)) % 4 * 90


def upright(image: np.ndarray, degrees: int) -> np.ndarray:
    """Turn an [H, W, C] picture counter-clockwise by `degrees` (a multiple of 90)."""
    k = normalise(degrees) // 90
    return np.ascontiguousarray(np.rot90(image, k=k)) if k else image
