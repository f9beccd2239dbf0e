"""Writing: H.264 mp4 and PNG frames, each file written under a temporary name and renamed into place."""

from __future__ import annotations

import os
import tempfile
from fractions import Fraction
from pathlib import Path

import torch
import torch.nn.functional as F

from .audio import SourceAudio, add_audio_stream, mux_audio
from .frames import as_fraction, check_frames


def write_video(
    path: Path | str, frames: torch.Tensor, fps: Fraction | float | int, *, crf: int = 18,
    audio: SourceAudio | None = None,
) -> Path:
    """Write exactly F frames as H.264 (libx264, yuv420p) mp4 at exactly `fps`, atomically.

    `audio`: a source's sound for the same span (audio.py), muxed beside the frames so that its
    first sample plays with the first frame; None writes a silent video.

    The file is encoded into a temp file beside `path` and renamed into place, so a crash leaves
    either the old file or none, never half a video. yuv420p stores colour at half resolution, so
    it needs an even width and height: an odd side is padded by repeating its last pixel row/column
    (the written video is then one pixel larger there).
    """
    import av

    path = Path(path)
    if path.suffix.lower() != ".mp4":
        raise ValueError(f"{path}: write_video writes H.264 mp4; give the path a .mp4 suffix")
    check_frames(frames, "frames")
    fps = as_fraction(fps, "fps")
    if not isinstance(crf, int) or not 0 <= crf <= 51:
        raise ValueError(f"crf must be an int in 0..51 (lower is better quality), got {crf!r}")

    frames = frames.detach().cpu()
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        x = frames.permute(0, 3, 1, 2).float()  # [F, 3, H, W]; replicate-pad wants float
        x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        frames = x.to(torch.uint8).permute(0, 2, 3, 1)  # [F, H+ph, W+pw, 3]
    array = frames.contiguous().numpy()
    n, h, w, _ = array.shape

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with av.open(tmp, "w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            stream.options = {"crf": str(crf)}
            sound = None if audio is None else add_audio_stream(container, audio)
            for i in range(n):
                frame = av.VideoFrame.from_ndarray(array[i], format="rgb24")
                frame.pts = i  # one tick of 1/fps per frame: no duplicated or dropped frames
                frame.time_base = 1 / fps
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode():  # flush the encoder's delayed frames
                container.mux(packet)
            if sound is not None:
                mux_audio(container, sound, audio)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_png_frames(folder: Path | str, frames: torch.Tensor) -> list[Path]:
    """Write frames as folder/00000.png, 00001.png, ... (each file written to a temp then renamed)."""
    import av

    check_frames(frames, "frames")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    array = frames.detach().cpu().contiguous().numpy()
    paths = []
    for i, image in enumerate(array):
        codec = av.CodecContext.create("png", "w")
        codec.width, codec.height, codec.pix_fmt = image.shape[1], image.shape[0], "rgb24"
        frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        data = b"".join(bytes(p) for p in [*codec.encode(frame), *codec.encode(None)])
        target = folder / f"{i:05d}.png"
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, target)
        paths.append(target)
    return paths
