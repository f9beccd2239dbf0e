"""Screenshots of the web app's four stages for docs/web-app.md, taken in headless Chromium.

    python -m tools.maintainers.ui_screenshots            # writes docs/images/ui_{invert,keyframes,nn_field,edit}.png

The app runs the tiny random model on the generated sample clip (no weights, no data needed), so
the edited pictures are noise and the page says so; what the screenshots show is each stage's page.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from .ui_browser import REPO, AppServer, Page, chromium_missing

SETTINGS = ["model=tiny", "size=128", "steps=10", "inversion.steps=20", "frames.max=8", "tokenflow.keyframe_interval=4",
            "prompt=a snowy winter scene, watercolor"]
STAGES = (("invert", "ui_invert.png"), ("keyframes", "ui_keyframes.png"), ("nn", "ui_nn_field.png"), ("edit", "ui_edit.png"))


def take(out_dir: Path) -> list[Path]:
    written = []
    with tempfile.TemporaryDirectory(prefix="tokenflow-ui-shots-") as tmp:
        tmp = Path(tmp)
        server = AppServer(tmp / "outputs", tmp / "cache", SETTINGS, tmp / "server.log")
        try:
            server.wait_ready()
            page = Page(server.url, width=1400, height=1250)
            try:
                for stage, name in STAGES:
                    status = page.run_stage(stage, timeout=300)
                    print(f"[screenshots] {stage}: {status.splitlines()[0]}", file=sys.stderr)
                    if status.startswith("error"):
                        raise RuntimeError(f"the {stage} stage failed: {status}")
                    if stage == "edit":
                        page.video()
                    written.append(page.screenshot(out_dir / name))
            finally:
                page.close()
        finally:
            server.close()
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.maintainers.ui_screenshots", description=__doc__.splitlines()[0],
                                     allow_abbrev=False)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "images", help="folder of the PNGs (default docs/images)")
    args = parser.parse_args(argv)
    missing = chromium_missing()
    if missing:
        print(f"error: {missing}", file=sys.stderr)
        sys.exit(2)
    for path in take(args.out):
        print(f"[screenshots] wrote {path}")


if __name__ == "__main__":
    main()
