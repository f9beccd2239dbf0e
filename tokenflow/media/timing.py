"""Timing: when each source frame is shown, and which frames an output at a constant rate shows.

Our outputs are constant-rate H.264 (every frame lasts 1/fps). Most sources are constant-rate too,
and then the output's frame k is the source's frame k. Phones often record a variable frame rate
(VFR: frames come faster or slower with the light and the load), where frame k is not at k/fps. For
those, frames are selected by their timestamps: the source's time is laid on a constant-rate grid
at its average rate R = frames / duration, and grid slot k shows the source frame on screen at
time t0 + k / R (the last frame whose timestamp is <= it). A slow stretch repeats a frame, a fast
one skips some, and the output lasts as long as the source: slots = round(duration * R).
`frames.start/end/stride/max` then count grid slots, as they count frames in a constant-rate clip.

The timestamps come from one pass over the packets (no decoding): cheap even for long clips.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from fractions import Fraction

VFR_TOLERANCE = Fraction(1, 10)  # an interval off the mean by more than this fraction (and > 1.5 ticks) makes a clip VFR


@dataclass
class FrameClock:
    times: list[Fraction]  # presentation time of each frame in decoding-output order, seconds, ascending
    end: Fraction  # when the last frame stops being shown
    rate: Fraction  # the constant rate frames are written at: the stream's rate, or the average for VFR
    vfr: bool

    @property
    def start(self) -> Fraction:
        return self.times[0]

    def slots(self) -> list[int]:
        """Source frame index shown in each slot of the constant-rate grid (the identity when not VFR)."""
        if not self.vfr:
            return list(range(len(self.times)))
        n = max(1, round((self.end - self.start) * self.rate))
        return [max(0, bisect.bisect_right(self.times, self.slot_time(k)) - 1) for k in range(n)]

    def slot_time(self, k: int) -> Fraction:
        """When grid slot k starts on the source's clock."""
        return self.times[k] if not self.vfr else self.start + k / self.rate

    def interval_range_ms(self) -> tuple[float, float]:
        gaps = [b - a for a, b in zip(self.times, self.times[1:])] or [self.end - self.start]
        return float(min(gaps)) * 1000, float(max(gaps)) * 1000


def probe_clock(container, stream, nominal_rate: Fraction | None) -> FrameClock | None:
    """Timestamps of every frame of `stream` from its packets; None when the container gives none
    (raw streams), and then frames are taken by index at the nominal rate. Leaves `container` at its end:
    seek back (or reopen) before decoding."""
    tb = stream.time_base
    pts, durations = [], {}
    for packet in container.demux(stream):
        if packet.size == 0:  # the demuxer's closing empty packet
            continue
        if packet.pts is None:
            return None
        if packet.is_discard:  # dropped by an edit list: decoded, never shown
            continue
        pts.append(packet.pts)
        durations[packet.pts] = packet.duration or 0
    if not pts:
        return None
    pts.sort()
    times = [p * tb for p in pts]
    gaps = [b - a for a, b in zip(times, times[1:])]
    mean_gap = (times[-1] - times[0]) / len(gaps) if gaps else (1 / nominal_rate if nominal_rate else Fraction(1, 20))
    last = durations[pts[-1]] * tb or mean_gap
    end = times[-1] + last
    slack = max(Fraction(3, 2) * tb, VFR_TOLERANCE * mean_gap)
    vfr = any(abs(g - mean_gap) > slack for g in gaps)
    if vfr:
        rate = (len(times) / (end - times[0])).limit_denominator(1001)
    else:
        rate = nominal_rate or (1 / mean_gap).limit_denominator(1001)
    return FrameClock(times=times, end=end, rate=rate, vfr=vfr)
