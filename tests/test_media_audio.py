"""Sound: the outputs carry exactly the edited span's audio, in sync (issue 13, case 1).

Each test generates a 2-second clip at 15 fps with a 440 Hz tone that grows louder (so a span
shifted by even a sample would not match), edits a strided part of it with the tiny model and
decodes the outputs' sound against the source's.
"""

import json
from fractions import Fraction

import av
import numpy as np
import pytest

from media_clips import SAMPLE_RATE, decoded_audio, patches, run_config, sine, stream_types, write_clip
from tokenflow.pipeline import run_edit

FPS = 15
AUDIO_FRAME = Fraction(1024, SAMPLE_RATE)  # one AAC frame: what copying whole packets may add at the end
START, STRIDE, COUNT = 5, 2, 6  # frames 5, 7, ..., 15: a span of 6 * 2 / 15 = 0.8 s starting at 1/3 s


@pytest.fixture(scope="module")
def aac_clip(tmp_path_factory):
    return write_clip(tmp_path_factory.mktemp("aac") / "tone.mp4", patches(30, 64, 64), FPS, audio=sine(2.0))


def edit(tmp_path, clip, *overrides):
    out = tmp_path / "run"
    facts = run_edit(run_config(tmp_path, f"video={clip}", f"frames.start={START}", f"frames.stride={STRIDE}",
                                f"frames.max={COUNT}", *overrides), out)
    return out, facts


def video_seconds(path) -> Fraction:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return sum(1 for _ in container.decode(stream)) / Fraction(stream.average_rate)


def test_aac_span_is_copied_in_sync_into_both_videos(tmp_path, aac_clip):
    out, facts = edit(tmp_path, aac_clip)
    source, first = decoded_audio(aac_clip)
    assert first == 0
    t0 = Fraction(START, FPS)
    span = Fraction(COUNT * STRIDE, FPS)
    for name in ("edited.mp4", "side_by_side.mp4"):
        assert stream_types(out / name) == ["video", "audio"], name
        assert video_seconds(out / name) == span  # frames at fps/stride: the source speed
        sound, start = decoded_audio(out / name)
        assert start == 0  # the span's first sample plays with the first frame
        assert span <= Fraction(len(sound), SAMPLE_RATE) <= span + AUDIO_FRAME, name
        expected = source[int(t0 * SAMPLE_RATE):][:len(sound)]
        # the copied packets decode to the source's samples (the decoder's float state differs by ~1e-5:
        # below one 16-bit step)
        assert np.abs(sound - expected).max() < 2 ** -15, name
    assert "copied" in facts.source["audio"] and "0.333-1.133 s" in facts.source["audio"]
    run = json.loads((out / "run.json").read_text())
    assert run["source"]["audio"] == facts.source["audio"]


def test_output_audio_false_drops_the_sound(tmp_path, aac_clip):
    out, facts = edit(tmp_path, aac_clip, "output.audio=false", "tokenflow.mode=reconstruction")
    assert stream_types(out / "edited.mp4") == ["video"]
    assert stream_types(out / "side_by_side.mp4") == ["video"]
    assert facts.source["audio"] is None


def test_pcm_sound_is_reencoded_as_aac_cut_to_the_sample(tmp_path):
    # PCM is not an MP4 codec players take: the span is decoded, cut to the sample and encoded as AAC
    clip = write_clip(tmp_path / "pcm.mov", patches(30, 64, 64), FPS, audio=sine(2.0), audio_codec="pcm_s16le")
    out, facts = edit(tmp_path, clip, "output.side_by_side=false", "tokenflow.mode=reconstruction")
    with av.open(str(out / "edited.mp4")) as container:
        assert container.streams.audio[0].codec_context.name == "aac"
    source, _ = decoded_audio(clip)
    sound, start = decoded_audio(out / "edited.mp4")
    span = Fraction(COUNT * STRIDE, FPS)
    assert start == 0 and span <= Fraction(len(sound), SAMPLE_RATE) <= span + AUDIO_FRAME
    n = int(span * SAMPLE_RATE) - 8
    first = int(Fraction(START, FPS) * SAMPLE_RATE)

    def rms_error(lag):  # of the output against the source span shifted by `lag` samples
        return np.sqrt(((sound[4:n] - source[first + 4 + lag:first + n + lag]) ** 2).mean())

    assert rms_error(0) < 0.05 * np.sqrt((source[first:first + n] ** 2).mean())  # AAC is lossy: within -26 dB
    assert rms_error(0) < min(rms_error(-1), rms_error(1)) / 2  # and the span starts on the right sample
    assert "re-encoded as AAC" in facts.source["audio"]


def test_unreadable_sound_still_gets_its_edit_with_a_warning(tmp_path, aac_clip):
    # the same clip with the AAC packets' bytes replaced by noise: the stream is there, no decoder takes it
    broken = tmp_path / "broken.mp4"
    rng = np.random.default_rng(0)
    with av.open(str(aac_clip)) as src, av.open(str(broken), "w") as dst:
        video = dst.add_stream_from_template(src.streams.video[0])
        sound = dst.add_stream_from_template(src.streams.audio[0])
        for packet in src.demux():
            if packet.size == 0:
                continue
            if packet.stream.type == "audio":
                noise = av.Packet(rng.integers(0, 256, packet.size, dtype=np.uint8).tobytes())
                noise.pts, noise.dts, noise.duration = packet.pts, packet.dts, packet.duration
                noise.time_base, noise.stream = packet.time_base, sound
                dst.mux(noise)
            else:
                packet.stream = video
                dst.mux(packet)
    out, facts = edit(tmp_path, broken, "tokenflow.mode=reconstruction")
    assert stream_types(out / "edited.mp4") == ["video"]
    assert video_seconds(out / "edited.mp4") == Fraction(COUNT * STRIDE, FPS)
    run = json.loads((out / "run.json").read_text())
    assert any("audio stream 1 (aac) cannot be read" in w and "without sound" in w for w in run["warnings"]), run["warnings"]


def test_output_fps_other_than_the_sources_drops_the_sound_and_says_so(tmp_path, aac_clip):
    # the released TokenFlow code writes at a fixed rate: output.fps=N; the source plays at 15/2 here
    out, facts = edit(tmp_path, aac_clip, "output.fps=30", "tokenflow.mode=reconstruction")
    for name in ("edited.mp4", "side_by_side.mp4"):
        assert stream_types(out / name) == ["video"], name
        assert video_seconds(out / name) == Fraction(COUNT, 30)  # same frames, 4x as fast
    assert facts.fps == 30.0
    assert any("output.fps=30" in w and "without the sound" in w for w in facts.warnings)
    same, facts = edit(tmp_path / "same", aac_clip, "output.fps=7.5", "tokenflow.mode=reconstruction")
    assert stream_types(same / "edited.mp4") == ["video", "audio"] and not any("output.fps" in w for w in facts.warnings)
