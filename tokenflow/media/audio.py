"""Audio: the sound of exactly the edited time span, read from the source and muxed into the outputs.

The edited frames cover the source's time span [start, end): from the first selected frame's
timestamp for num_frames * stride / fps seconds (frames.py). The outputs carry the audio of that
span, in sync: the span's first sample plays with the first frame.

Two ways, chosen by codec:
- copy (AAC, MP3, AC-3, E-AC-3, ALAC: codecs an MP4 holds and players play): the source's packets
  that overlap the span are copied bit for bit, plus a PREROLL of earlier packets a decoder needs to
  warm up (AAC's first frame after a cut decodes wrong without the one before it). Their timestamps
  are shifted so the span's start is 0; the packets before it get negative times, which the MP4 muxer
  turns into an edit list that players (and FFmpeg) skip. The result decodes to the source's samples.
  Packets are whole audio frames (AAC: 1024 samples, 21-23 ms), so the copied sound may run up to
  one audio frame past the video's end.
- re-encode (anything else: PCM, Vorbis, ...): the span's samples, cut to the sample, are encoded
  as AAC.

A source whose audio cannot be read (no decoder, damaged packets) raises AudioUnreadable here; the
reader turns that into a warning and the edit is written without sound.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np

COPYABLE = ("aac", "mp3", "ac3", "eac3", "alac")
PREROLL = Fraction(1, 10)  # seconds of packets kept before the span to warm the decoder up (AAC: one frame; MP3: its bit reservoir)
AAC_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350)
ENCODE_LAYOUTS = ("mono", "stereo")  # re-encoded sound keeps these; other layouts are mixed down to stereo


class AudioUnreadable(ValueError):
    """The source's audio stream exists but cannot be read."""


@dataclass
class SourceAudio:
    """The audio of one time span of a source file, ready to be muxed (see the module doc)."""

    path: str
    stream_index: int
    codec: str
    sample_rate: int
    layout: str
    start: Fraction  # seconds on the source's clock: plays with the first written frame
    end: Fraction
    copy: bool
    time_base: Fraction | None = None  # copy: the packets' time base
    packets: list[tuple[bytes, int, int]] = field(default_factory=list)  # copy: (data, pts - start, duration)
    samples: np.ndarray | None = None  # re-encode: float32 [channels, n] of exactly the span

    def describe(self) -> str:
        how = "copied" if self.copy else "re-encoded as AAC"
        return (f"{self.codec} {self.sample_rate} Hz {self.layout}, {how}: source "
                f"{float(self.start):.3f}-{float(self.end):.3f} s")


def read_audio_span(path: str, start: Fraction, end: Fraction) -> SourceAudio | None:
    """The first audio stream's sound over [start, end) seconds; None when the file has no audio.
    Raises AudioUnreadable when the stream is there but cannot be decoded."""
    import av

    with av.open(str(path)) as container:
        if not container.streams.audio:
            return None
        stream = container.streams.audio[0]
        ctx = stream.codec_context
        codec = ctx.name if ctx is not None else "unknown"
        layout = stream.layout.name if stream.layout is not None else "unknown"
        base = dict(path=str(path), stream_index=stream.index, codec=codec, sample_rate=stream.sample_rate,
                    layout=layout, start=start, end=end)
        try:
            if codec in COPYABLE:
                return _copy_packets(container, stream, SourceAudio(copy=True, **base))
            return _decode_samples(container, stream, SourceAudio(copy=False, **base))
        except AudioUnreadable:
            raise
        except Exception as e:  # the sound is optional: whatever stops reading it must not stop the edit
            raise AudioUnreadable(f"{path}: audio stream {stream.index} ({codec}) cannot be read "
                                  f"({type(e).__name__}: {e})") from None


def _copy_packets(container, stream, audio: SourceAudio) -> SourceAudio:
    tb = stream.time_base
    first, last, warm = int(audio.start / tb), int(audio.end / tb), int((audio.start - PREROLL) / tb)
    kept = []
    for packet in container.demux(stream):
        if packet.pts is None or packet.size == 0:  # the demuxer's closing empty packet
            continue
        duration = packet.duration or 0
        if packet.pts + duration > warm and packet.pts < last:
            kept.append(packet)
    # Decode what is copied: a packet no decoder takes would make a file that plays silence or fails.
    decoded = sum(f.samples for p in kept for f in stream.codec_context.decode(p))
    decoded += sum(f.samples for f in stream.codec_context.decode(None))
    if kept and not decoded:
        raise AudioUnreadable(f"{audio.path}: audio stream {stream.index} ({audio.codec}) decodes to no samples")
    audio.time_base = tb
    audio.packets = [(bytes(p), p.pts - first, p.duration or 0) for p in kept]
    return audio


def _decode_samples(container, stream, audio: SourceAudio) -> SourceAudio:
    import av

    rate = audio.sample_rate if audio.sample_rate in AAC_RATES else 48000
    layout = audio.layout if audio.layout in ENCODE_LAYOUTS else "stereo"
    resampler = av.AudioResampler(format="fltp", layout=layout, rate=rate)
    first = round(audio.start * rate)  # the span in samples at `rate`
    last = round(audio.end * rate)
    origin, parts, position = None, [], None
    for frame in container.decode(stream):
        if origin is None:  # where the sound starts on the source's clock, in samples at `rate`
            origin = round((frame.pts or 0) * stream.time_base * rate)
            position = origin
        for out in resampler.resample(frame):
            chunk = out.to_ndarray()  # [channels, n] float32
            if position + chunk.shape[1] > first and position < last:
                parts.append((position, chunk))
            position += chunk.shape[1]
        if position >= last:
            break
    if origin is None:
        raise AudioUnreadable(f"{audio.path}: audio stream {stream.index} ({audio.codec}) decodes to no samples")
    channels = 1 if layout == "mono" else 2
    span = np.zeros((channels, max(0, min(last, position) - first)), dtype=np.float32)  # silence where the sound has not begun
    for pos, chunk in parts:
        lo, hi = max(pos, first), min(pos + chunk.shape[1], last)
        if hi > lo:
            span[:, lo - first:hi - first] = chunk[:, lo - pos:hi - pos]
    audio.sample_rate, audio.layout, audio.samples = rate, layout, span
    return audio


def add_audio_stream(container, audio: SourceAudio):
    """Add the output stream for `audio` (before anything is muxed: the header lists every stream)."""
    import av

    if audio.copy:
        with av.open(audio.path) as source:  # the codec parameters (AAC's config) come from the source stream
            return container.add_stream_from_template(source.streams[audio.stream_index])
    stream = container.add_stream("aac", rate=audio.sample_rate)
    stream.layout = audio.layout
    return stream


def mux_audio(container, stream, audio: SourceAudio) -> None:
    """Write the span's sound into `stream` (from add_audio_stream); time 0 is the first video frame."""
    import av

    if audio.copy:
        for data, pts, duration in audio.packets:
            packet = av.Packet(data)
            packet.pts = packet.dts = pts  # < 0 before the span: the muxer's edit list skips it
            packet.duration = duration
            packet.time_base = audio.time_base
            packet.stream = stream
            container.mux(packet)
        return
    step = 1024  # AAC's frame size
    for s in range(0, audio.samples.shape[1], step):
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(audio.samples[:, s:s + step]), format="fltp", layout=audio.layout)
        frame.sample_rate, frame.pts, frame.time_base = audio.sample_rate, s, Fraction(1, audio.sample_rate)
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode(None):
        container.mux(packet)
