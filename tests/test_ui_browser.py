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
SETTINGS = ["model=tiny", "size=64", "steps=2", "inversion.steps=3", f"frames.max={FRAMES}", "progress=false"]

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
    assert status.startswith(f"wrote {FRAMES} frames, size [64, 64] (H, W), at {FPS} fps"), status
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
    page.wait_for(lambda: page.text("command").startswith("error: tokenflow.keyframe_interval"), 10,
                  "the command box to say it too")


def test_a_second_visitor_waits_in_the_queue_and_only_the_owner_stops_a_stage(app):
    first, second = Page(app.url), Page(app.url)
    try:
        first.type_into("steps", "400")  # long enough to be stopped midway
        first.open_tab("edit")
        first.find("#edit-go").click()
        first.wait_for(lambda: "editing" in first.page_text() or "inversion" in first.page_text() or
                       "inverting" in first.page_text(), 30, "the first edit to start")
        second.open_tab("edit")
        second.find("#edit-go").click()
        second.wait_for(lambda: "queue: 1/1" in second.page_text(), 15, "the second visitor to see the queue")

        second.find("#stop").click()
        assert second.wait_for(lambda: second.find("#stop-note").text, 10, "the stop note").startswith(
            "the running edit stage is another visitor's")
        first.find("#stop").click()
        status = first.wait_for(lambda: first.text("edit-status"), 30, "the first edit to stop")
        assert status.startswith("interrupted during ") and "no outputs were written" in status, status
        assert first.find("#edit-video video") is None
        assert second.wait_for(lambda: second.text("edit-status"), 60, "the second edit").startswith(f"wrote {FRAMES} frames")
    finally:
        first.close()
        second.close()
