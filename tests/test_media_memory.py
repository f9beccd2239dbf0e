"""Bounded memory on large inputs (issue 13, case 5): a 1080p clip edited at size=128 holds
128-size frames only, because reading fits each frame to the run's size as it is decoded.

Both numbers are measured, each in a fresh Python process (peak RSS is per process, and a process
that already held big arrays keeps their pages): the peak of a process holding the clip's
full-resolution frames (what the pipeline held before, decoding everything first and resizing
after), and the peak of a whole tiny-model run at size=128 on the same clip.
"""

import json
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest

FRAMES, HEIGHT, WIDTH = 60, 1080, 1920
FULL_FRAMES_MB = FRAMES * HEIGHT * WIDTH * 3 / 2**20  # 356 MiB of uint8 RGB

MEASURE = r"""
import json, sys
from pathlib import Path
sys.path.insert(0, TESTS_DIR)
import tokenflow.pipeline as pipeline
from media_clips import run_config
from tokenflow.media import read_video

def vm(key):  # /proc/self/status, MiB
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024

baseline = vm("VmRSS")
what, clip, work = sys.argv[1:4]
facts = None
if what == "hold":  # every frame at full resolution, as decoded
    video = read_video(clip)
    shape = list(video.frames.shape)
else:  # the edit: tiny model, size=128 (reconstruction, the VAE round trip: the cheapest edit mode;
    # one frame per VAE forward, so the edit's own activations do not hide what the frames take)
    run = pipeline.run_edit(run_config(Path(work), f"video={clip}", "size=128", "tokenflow.mode=reconstruction",
                                       "inversion.batch_size=1"), Path(work) / "run")
    shape = [run.frames, *run.size]
print(json.dumps({"baseline_mb": baseline, "peak_mb": vm("VmHWM"), "shape": shape}))
"""


@pytest.fixture(scope="module")
def clip_1080p(tmp_path_factory) -> Path:
    """60 frames of 1920x1080: gradients and a moving red box (fast to encode, 'ultrafast' x264)."""
    path = tmp_path_factory.mktemp("big") / "1080p.mp4"
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    base = np.stack([x * 255 // WIDTH, y * 255 // HEIGHT, (x + y) * 255 // (WIDTH + HEIGHT)], -1).astype(np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.options = {"preset": "ultrafast"}
        for i in range(FRAMES):
            image = base.copy()
            image[200:400, 100 + 20 * i:300 + 20 * i] = (255, 0, 0)
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def peak_rss(what: str, clip: Path, work: Path) -> dict:
    code = MEASURE.replace("TESTS_DIR", repr(str(Path(__file__).parent)))
    res = subprocess.run([sys.executable, "-c", code, what, str(clip), str(work)], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_1080p_edit_at_128_holds_small_frames_only(tmp_path, clip_1080p):
    hold = peak_rss("hold", clip_1080p, tmp_path)
    edit = peak_rss("edit", clip_1080p, tmp_path)
    print(f"\nfull-resolution frames held: peak {hold['peak_mb']:.0f} MiB (baseline {hold['baseline_mb']:.0f}); "
          f"edit at size=128: peak {edit['peak_mb']:.0f} MiB (baseline {edit['baseline_mb']:.0f})")
    assert hold["shape"] == [FRAMES, HEIGHT, WIDTH, 3] and edit["shape"] == [FRAMES, 128, 192]
    assert hold["peak_mb"] - hold["baseline_mb"] >= FULL_FRAMES_MB  # the measurement sees the frames
    # the whole run, models and all, peaks below what the full-resolution frames alone would need
    assert edit["peak_mb"] < edit["baseline_mb"] + FULL_FRAMES_MB
    assert edit["peak_mb"] < hold["peak_mb"]
