"""Draws docs/images/demo_strip.png, the README's picture, from the weight-free demo's videos.

    python -m tools.toy_propagation --video sample
    python docs/images/demo_strip.py outputs/toy_propagation/sample docs/images/demo_strip.png

Rows: the generated sample clip, the per-frame edit (a colour grade drawn anew for every frame:
it flickers) and TokenFlow's propagation (only the keyframes graded, every frame assembled from
them through the ORIGINAL frames' nearest-neighbour field, paper rule). Columns: a few frames.
"""

import json
import sys
from pathlib import Path

from PIL import Image, ImageDraw

from tokenflow.media import read_video
from tokenflow.media.sample_clip import render_sample_frames

FRAMES = (0, 4, 7, 11, 15)
TILE = 128  # pixels a frame is shown at
LABEL_W = 140


def main(demo: str, out: str) -> None:
    demo = Path(demo)
    facts = json.loads((demo / "warp_error.json").read_text())
    keyframes, err = facts["keyframes"], facts["warp_error"]
    panels = [render_sample_frames(facts["frames"], facts["size"][0]),  # the demo's source, drawn again
              read_video(demo / "per_frame.mp4").frames, read_video(demo / "tokenflow_paper.mp4").frames]
    labels = [f"source\nwarp error {err['source']:.2f}\n(x1e-3)",
              f"per-frame edit\nwarp error {err['per_frame']:.2f}",
              f"TokenFlow\nwarp error {err['tokenflow_paper']:.2f}"]
    sheet = Image.new("RGB", (LABEL_W + TILE * len(FRAMES), 22 + TILE * 3), "white")
    draw = ImageDraw.Draw(sheet)
    for c, f in enumerate(FRAMES):
        mark = " (keyframe)" if f in keyframes else ""
        draw.text((LABEL_W + c * TILE + 6, 5), f"frame {f}{mark}", fill="black")
    for r, (frames, label) in enumerate(zip(panels, labels)):
        draw.multiline_text((6, 22 + r * TILE + TILE // 2 - 12), label, fill="black", spacing=4)
        for c, f in enumerate(FRAMES):
            tile = Image.fromarray(frames[f].numpy()).resize((TILE, TILE), Image.LANCZOS)
            sheet.paste(tile, (LABEL_W + c * TILE, 22 + r * TILE))
    sheet.save(out, optimize=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
