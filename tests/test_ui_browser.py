"""The web app in headless Chromium: the tiny model's app in a subprocess, a clip uploaded, the edit
stage run; the page must play a video of the clip's frame count and show the equivalent command.
And a bad input: one line in the page, no traceback."""

from __future__ import annotations

import shlex
import urllib.request

import pytest

from tokenflow.config import load_config
from tokenflow.media import read_video
from tokenflow.media.sample_clip import make_sample_clip
from tools.maintainers.ui_browser import AppServer, Page, chromium_missing

FRAMES, FPS = 5, 10
SETTINGS = ["model=tiny", "size=64", "steps=2", "inversion.steps=3", "progress=false"]

missing = chromium_missing()
pytestmark = pytest.mark.skipif(missing is not None, reason=f"browser test: {missing} (tests/run.sh installs it)")


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    root = tmp_path_factory.mktemp("ui")
    server = AppServer(root / "outputs", root / "cache", SETTINGS, root / "server.log")
    try:
        server.wait_ready()
        yield server
    finally:
        server.close()


@pytest.fixture
def page(app):
    p = Page(app.url)
    yield p
    p.close()


def test_the_edit_stage_plays_the_uploaded_clip_edited_and_names_its_command(app, page, tmp_path):
    clip = make_sample_clip(tmp_path / "clip.mp4", frames=FRAMES, size=64, fps=FPS)
    page.upload(clip)
    status = page.run_stage("edit")
    assert status.startswith(f"wrote {FRAMES} frames 64x64 at {FPS} fps"), status
    assert "the output is noise" in status  # the tiny model says so

    video = page.video()
    assert video["error"] is None and video["ready"] >= 1, video  # the browser decodes it
    assert video["duration"] == pytest.approx(FRAMES / FPS, abs=0.5 / FPS)
    assert (video["width"], video["height"]) == (128, 64)  # source | edit
    played = tmp_path / "played.mp4"
    played.write_bytes(urllib.request.urlopen(video["src"], timeout=10).read())
    assert read_video(played).num_frames == FRAMES

    command = page.text("command")
    words = shlex.split(command)
    assert words[0] == "tokenflow" and any(w.startswith("video=") and w.endswith(".mp4") for w in words)
    cfg = load_config(words[1:])
    assert (cfg.model.name, cfg.steps, cfg.size, cfg.prompt) == ("tiny", 2, 64, "a colorful watercolor painting")
    assert read_video(cfg.video).num_frames == FRAMES  # the command's video is the uploaded clip, kept


def test_a_bad_setting_is_one_line_in_the_page_without_a_traceback(app, page):
    page.type_into("extra", "size=64\ntokenflow.keyframe_interval=0")
    status = page.run_stage("invert")
    assert status == "error: tokenflow.keyframe_interval must be an integer >= 1, got 0"
    assert "Traceback" not in page.page_text()
    assert "error: tokenflow.keyframe_interval" in page.text("command")  # the command box says it too
