"""The web app in a real browser: `AppServer` starts `python -m tokenflow.ui` in a subprocess and
`Page` drives it in headless Chromium with Selenium (Debian's `chromium` and `chromium-driver`).
The browser test (tests/test_ui_browser.py) and the screenshots (ui_screenshots.py) share them.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STAGE_TABS = {"invert": "1. invert", "keyframes": "2. keyframes", "nn": "3. NN field", "edit": "4. edit"}


def chromium_missing() -> str | None:
    """Why the browser cannot run here, or None when it can."""
    try:
        import gradio  # noqa: F401
        import selenium  # noqa: F401
    except ImportError as e:
        return f"{e.name} is not installed (pip install -e \".[test,ui]\")"
    for tool in ("chromium", "chromedriver"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install chromium chromium-driver)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AppServer:
    """`python -m tokenflow.ui --port P --out OUT OVERRIDES` in its own process group, caching in `cache`."""

    def __init__(self, out: Path, cache: Path, overrides: list[str], log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        env = {**os.environ, "TOKENFLOW_CACHE": str(cache), "PYTHONPATH": str(REPO), "GRADIO_ANALYTICS_ENABLED": "False"}
        self.log = open(log, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tokenflow.ui", "--port", str(self.port), "--out", str(out), *overrides],
            cwd=str(out.parent), env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 60) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.process.poll() is not None:
                log = Path(self.log.name).read_text()[-2000:]
                raise RuntimeError(f"the app ended with code {self.process.returncode}: {log}")
            try:
                urllib.request.urlopen(self.url, timeout=2).close()
                return
            except OSError:
                time.sleep(0.3)
        raise TimeoutError(f"the app did not answer on {self.url} within {timeout:.0f} s")

    def close(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)  # its own group: Gradio's threads and children end with it
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log.close()


class Page:
    """The app's page in headless Chromium."""

    def __init__(self, url: str, width: int = 1400, height: int = 1800):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        options.binary_location = shutil.which("chromium")  # the system's: Selenium looks for no other browser
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                    f"--window-size={width},{height}", "--autoplay-policy=no-user-gesture-required", "--hide-scrollbars"):
            options.add_argument(arg)
        self.driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
        self.driver.get(url)
        self.wait_for(lambda: self.find("#command textarea"), 30, "the page to load")

    def find(self, css: str):
        from selenium.webdriver.common.by import By

        found = self.driver.find_elements(By.CSS_SELECTOR, css)
        return found[0] if found else None

    def wait_for(self, condition, timeout: float, what: str):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            value = condition()
            if value:
                return value
            time.sleep(0.2)
        raise TimeoutError(f"waited {timeout:.0f} s for {what}")

    def text(self, elem_id: str) -> str:
        """A textbox's value."""
        box = self.find(f"#{elem_id} textarea") or self.find(f"#{elem_id} input")
        return "" if box is None else box.get_attribute("value")

    def type_into(self, elem_id: str, text: str) -> None:
        from selenium.webdriver.common.keys import Keys

        box = self.find(f"#{elem_id} textarea") or self.find(f"#{elem_id} input")
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(Keys.DELETE)
        box.send_keys(text)
        box.send_keys(Keys.TAB)  # leaves the box: Gradio sends the change

    def upload(self, path: Path) -> None:
        before = self.text("command")
        self.find("#upload input[type=file]").send_keys(str(path))
        self.wait_for(lambda: self.text("command") != before, 30, "the upload to reach the command")

    def open_tab(self, stage: str) -> None:
        from selenium.webdriver.common.by import By

        for tab in self.driver.find_elements(By.CSS_SELECTOR, "button[role=tab]"):
            if tab.text.strip() == STAGE_TABS[stage]:
                tab.click()
                return
        raise LookupError(f"no tab {STAGE_TABS[stage]!r}")

    def run_stage(self, stage: str, timeout: float = 120) -> str:
        """Open the stage's tab, press its button and wait until its status line changes; returns it
        (a fresh page's status is empty, so every first run of a stage is seen)."""
        self.open_tab(stage)
        status = f"{stage}-status"
        before = self.text(status)
        self.find(f"#{stage}-go").click()
        return self.wait_for(lambda: (lambda t: t if t and t != before else None)(self.text(status)), timeout,
                             f"the {stage} stage to answer")

    def video(self, elem_id: str = "edit-video", timeout: float = 30) -> dict:
        """The player's state once it has loaded the video: src, readyState, duration, size, error."""
        def loaded():
            v = self.find(f"#{elem_id} video")
            if v is None:
                return None
            state = self.driver.execute_script(
                "const v = arguments[0]; return {src: v.currentSrc || v.src, ready: v.readyState, duration: v.duration, "
                "width: v.videoWidth, height: v.videoHeight, error: v.error ? v.error.code : null};", v)
            return state if state["ready"] >= 1 or state["error"] else None
        return self.wait_for(loaded, timeout, "the video to load")

    def page_text(self) -> str:
        return self.driver.execute_script("return document.body.innerText") + "\n" + "\n".join(
            self.driver.execute_script("return Array.from(document.querySelectorAll('textarea')).map(t => t.value)"))

    def screenshot(self, path: Path, css: str | None = None) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        if css is None:
            self.driver.save_screenshot(str(path))
        else:
            self.find(css).screenshot(str(path))
        return path

    def close(self) -> None:
        self.driver.quit()
