"""Variable frame rate: frames are selected by their timestamps on a constant-rate grid at the
source's average rate, the run facts say so, and the output lasts as long as the source span
(issue 13, case 3; the rule is tokenflow/media/timing.py's docstring)."""

import bisect
import json
from fractions import Fraction

import av
import pytest

from media_clips import patches, run_config, write_clip
from tokenflow.media import read_video
from tokenflow.pipeline import run_edit

# 10 frames: 100 ms apart, then 200 ms apart (a phone slowing down in the dark)
TIMES_MS = [0, 100, 200, 300, 400, 600, 800, 1000, 1200, 1400]


@pytest.fixture(scope="module")
def vfr_clip(tmp_path_factory):
    frames = patches(len(TIMES_MS), 64, 64)
    for i in range(len(TIMES_MS)):
        frames[i, :16, :16] = 25 * i  # frame i's mark
    return write_clip(tmp_path_factory.mktemp("vfr") / "vfr.mp4", frames, times_ms=TIMES_MS)


def packet_clock(path):
    """(frame times, end) in seconds as the file stores them: end is the last frame's time plus its duration."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        packets = sorted((p.pts, p.duration) for p in container.demux(stream) if p.size)
    times = [pts * stream.time_base for pts, _ in packets]
    return times, times[-1] + packets[-1][1] * stream.time_base


def mark(frames):
    """Which source frame each row is, from its 25 * i mark."""
    return [round(float(f[:16, :16].float().mean()) / 25) for f in frames]


def test_vfr_frames_are_picked_by_timestamp_on_the_average_rate_grid(vfr_clip):
    times, end = packet_clock(vfr_clip)
    assert times == [Fraction(t, 1000) for t in TIMES_MS]
    rate = (len(times) / (end - times[0])).limit_denominator(1001)
    slots = round((end - times[0]) * rate)
    expected = [bisect.bisect_right(times, times[0] + k / rate) - 1 for k in range(slots)]
    assert set(range(10)) - set(expected) and len(expected) != len(set(expected))  # the fast part skips, the slow repeats

    video = read_video(vfr_clip)
    assert video.source.vfr and video.fps == rate and video.source.frame_rate == str(rate)
    assert video.indices == expected and mark(video.frames) == expected  # the frames on screen at those times
    assert abs(video.duration - (end - times[0])) <= 1 / (2 * rate)  # lasts as long as the source (to half a slot)
    assert any("variable frame rate" in n and "100.0..200.0 ms" in n for n in video.notes)

    part = read_video(vfr_clip, start=2, stride=2, max_frames=3)  # selection counts grid slots
    assert part.indices == expected[2:8:2] and part.start_time == times[0] + 2 / rate
    assert part.duration == 6 / rate


def test_constant_rate_clip_is_not_called_vfr(tmp_path):
    video = read_video(write_clip(tmp_path / "cfr.mp4", patches(6, 64, 64), fps=15))
    assert not video.source.vfr and video.indices == list(range(6)) and video.fps == 15
    assert not any("variable" in n for n in video.notes)


def test_vfr_edit_says_so_and_lasts_the_source_span(tmp_path, vfr_clip):
    times, end = packet_clock(vfr_clip)
    out = tmp_path / "run"
    run_edit(run_config(tmp_path, f"video={vfr_clip}", "tokenflow.mode=reconstruction"), out)
    facts = json.loads((out / "run.json").read_text())
    assert facts["source"]["vfr"] is True
    rate = Fraction(facts["source"]["frame_rate"])
    assert facts["fps"] == float(rate)
    with av.open(str(out / "edited.mp4")) as container:
        stream = container.streams.video[0]
        count = sum(1 for _ in container.decode(stream))
        assert stream.average_rate == rate  # written at the constant rate the facts name
    assert abs(count / rate - (end - times[0])) <= 1 / (2 * rate)
