"""Clips as phones and cameras write them, generated with PyAV for the media tests: a sine tone
sound track, a rotation in the display matrix, irregular timestamps, 10-bit and other pixel
formats. Each writer takes the frames as uint8 [F, H, W, 3] RGB and returns the path."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from tokenflow.config import RunConfig, load_config

REPO = Path(__file__).resolve().parents[1]
SAMPLE_RATE = 44100


def run_config(tmp_path, *overrides) -> RunConfig:
    """The settings of a fast tiny-model run (2 steps, 4 inversion steps) caching under tmp_path."""
    return load_config(["model=tiny", "size=64", "steps=2", "inversion.steps=4", "progress=false",
                        f"inversion.cache_dir={tmp_path / 'cache'}", *overrides])


def patches(n: int, h: int, w: int) -> np.ndarray:
    """uint8 [n, h, w, 3]: flat colour blocks (no edge smaller than 16 px, so 4:2:0 chroma keeps
    them) that change from frame to frame, and differ left/right and top/bottom (orientation shows)."""
    frames = np.zeros((n, h, w, 3), np.uint8)
    ys, xs = np.arange(h)[:, None] // 16, np.arange(w)[None, :] // 16
    for i in range(n):
        frames[i, ..., 0] = (40 + 25 * xs + 7 * i) % 256
        frames[i, ..., 1] = (30 + 45 * ys) % 256
        frames[i, ..., 2] = (200 - 30 * ((xs + ys + i) % 5)) % 256
    return frames


def sine(seconds: float, rate: int = SAMPLE_RATE) -> np.ndarray:
    """float32 [1, n]: a 440 Hz tone whose loudness grows with time, so a shifted span would not match."""
    t = np.arange(round(seconds * rate)) / rate
    return (0.2 * (1 + t) * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None]


def write_clip(
    path: Path, frames: np.ndarray, fps: int = 15, *, codec: str = "libx264", pix_fmt: str = "yuv420p",
    rotation: int | None = None, times_ms: list[int] | None = None, audio: np.ndarray | None = None,
    audio_codec: str = "aac", options: dict | None = None,
) -> Path:
    """Encode `frames`. rotation: counter-clockwise degrees in the display matrix (a phone's portrait
    clip: -90). times_ms: each frame's timestamp (a variable frame rate). audio: float32 [1, n] mono."""
    n, h, w, _ = frames.shape
    with av.open(str(path), "w") as container:
        video = container.add_stream(codec, rate=fps)
        video.width, video.height, video.pix_fmt = w, h, pix_fmt
        if options:
            video.options = options
        if times_ms is not None:
            video.codec_context.time_base = Fraction(1, 1000)
        if rotation is not None:
            video.set_display_rotation(rotation)
        sound = None
        if audio is not None:
            sound = container.add_stream(audio_codec, rate=SAMPLE_RATE)
            sound.layout = "mono"
            if audio_codec.startswith("pcm_"):
                sound.format = "s16"
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frames[i]), format="rgb24")
            frame.pts = i if times_ms is None else times_ms[i]
            frame.time_base = Fraction(1, fps) if times_ms is None else Fraction(1, 1000)
            for packet in video.encode(frame):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
        if sound is not None:
            pcm = audio if not audio_codec.startswith("pcm_") else (audio * 32767).round().astype(np.int16)
            for s in range(0, pcm.shape[1], 1024):
                chunk = av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm[:, s:s + 1024]),
                                                   format="fltp" if pcm.dtype == np.float32 else "s16p", layout="mono")
                chunk.sample_rate, chunk.pts, chunk.time_base = SAMPLE_RATE, s, Fraction(1, SAMPLE_RATE)
                for packet in sound.encode(chunk):
                    container.mux(packet)
            for packet in sound.encode():
                container.mux(packet)
    return path


def decoded_audio(path: Path) -> tuple[np.ndarray, Fraction]:
    """(float32 mono samples as a player hears them, the time in seconds of the first one)."""
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="fltp", layout="mono", rate=SAMPLE_RATE)
        first, parts = None, []
        for frame in container.decode(stream):
            if first is None:
                first = frame.pts * stream.time_base
            parts += [f.to_ndarray()[0] for f in resampler.resample(frame)]
        parts += [f.to_ndarray()[0] for f in resampler.resample(None)]
    return np.concatenate(parts), first


def stream_types(path: Path) -> list[str]:
    with av.open(str(path)) as container:
        return [s.type for s in container.streams]
