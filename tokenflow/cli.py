"""The `tokenflow` command: a Hydra app around `pipeline.run_edit`.

    tokenflow video=clip.mp4 prompt="a marble sculpture of a wolf"
    tokenflow model=tiny                                  # no weights needed: the random tiny model
    tokenflow -m model=tiny tokenflow.mode=tokenflow,per_frame   # a sweep, one folder per run

Each run's folder (Hydra's run dir; `hydra.run.dir=...` moves it) holds config.yaml (resolved),
edited.mp4, side_by_side.mp4 and run.json (frames, size, fps, timings, keyframes, peak memory):
all of them, written by run_edit once the edit succeeded, or none (Hydra's own .hydra/ and log
are there either way).
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def _run(cfg: DictConfig) -> None:
    from .loading import ModelNotAvailable
    from .pipeline import run_edit

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    try:
        facts = run_edit(resolved, out_dir)  # writes config.yaml with the other outputs, on success only
    except (ModelNotAvailable, FileNotFoundError, ValueError, FloatingPointError) as e:
        # bad input or missing weights: one clear line, no traceback, and no outputs were written
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"[tokenflow] {facts.frames} frames {facts.size[1]}x{facts.size[0]} at {facts.fps} fps; "
          f"seconds per frame: {facts.seconds_per_frame}")
    for name, path in facts.outputs.items():
        print(f"[tokenflow] wrote {name}: {path}")
    print(f"[tokenflow] run facts: {out_dir / 'run.json'}")


main = hydra.main(config_path=CONF_DIR, config_name="config", version_base=None)(_run)

if __name__ == "__main__":
    main()
