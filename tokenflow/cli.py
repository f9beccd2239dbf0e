"""The `tokenflow` command: a Hydra app around `pipeline.run_edit`.

    tokenflow video=clip.mp4 prompt="a marble sculpture of a woman running, Venus de Milo"
    tokenflow video=clip.mp4 prompt_file=prompt.txt       # a long prompt, read from a UTF-8 file
    tokenflow model=tiny                                  # no weights needed: the random tiny model
    tokenflow -m model=tiny tokenflow.mode=tokenflow,per_frame   # a sweep, one folder per run

The command line is checked against the settings (tokenflow/overrides.py) before Hydra reads it,
and the composed settings once more (tokenflow/config.py) before anything heavy runs: a problem is
one `error:` line and exit code 2.

Each run's folder (outputs/DATE/TIME, or `hydra.run.dir=...`) receives config.yaml (resolved),
edited.mp4, side_by_side.mp4 and run.json: all of them, once the edit succeeded, or none. A run that
fails or is interrupted (Ctrl-C) prints one line and leaves no folder of its own behind; a folder
that already held files is left exactly as it was.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .hydra_config import register_resolvers

INTERRUPTED_EXIT = 130  # the shell's code for a process ended by SIGINT
ERROR_EXIT = 2

register_resolvers()  # on import: a launcher's worker process unpickles the job from this module


def _remove_if_empty(out_dir: Path) -> str:
    """Remove a failed run's folder if it is empty (this run made it) -> what stays there: "" when
    nothing does, else a note that the folder keeps what an earlier run wrote."""
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()
        parent = out_dir.parent  # outputs/DATE/ when this was its only run
        if parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
        return ""
    return f"{out_dir} keeps the files it held before" if out_dir.is_dir() else ""


def _nothing_written(out_dir: Path) -> str:
    """The end of a failed run's error line: no outputs, and what the folder still holds."""
    kept = _remove_if_empty(out_dir)
    return f"no outputs were written; {kept}" if kept else "no outputs were written"


def _run(hydra_cfg) -> None:
    from hydra.core.hydra_config import HydraConfig

    from .config import ConfigError, RunConfig
    from .device import device_error_line
    from .interrupt import RunInterrupted
    from .models.loading import ModelNotAvailable
    from .pipeline import run_edit

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        cfg = RunConfig.from_hydra(hydra_cfg)
        facts = run_edit(cfg, out_dir)  # writes config.yaml with the other outputs, on success only
    except (ConfigError, ModelNotAvailable, FileNotFoundError, ValueError, FloatingPointError) as e:
        # bad input or missing weights: one clear line, no traceback, and no outputs were written
        print(f"error: {e} ({_nothing_written(out_dir)})", file=sys.stderr)
        sys.exit(ERROR_EXIT)
    except KeyboardInterrupt as e:
        if isinstance(e, RunInterrupted):  # its line already says that no outputs were written
            kept = _remove_if_empty(out_dir)
            line = f"{e}" + (f" ({kept})" if kept else "")
        else:
            line = f"interrupted ({_nothing_written(out_dir)})"
        print(f"\n{line}", file=sys.stderr)
        sys.exit(INTERRUPTED_EXIT)
    except RuntimeError as e:  # from the device (CUDA start, an index, out of memory): one line; bugs keep their traceback
        line = device_error_line(e)
        if line is None:
            raise
        print(f"error: {line} ({_nothing_written(out_dir)})", file=sys.stderr)
        sys.exit(ERROR_EXIT)
    if facts is None:  # a torchrun rank other than 0: rank 0 writes and reports
        return
    print(f"[tokenflow] {facts.frames} frames, size {facts.size} (H, W), at {facts.fps:g} fps; "
          f"seconds per frame: {facts.seconds_per_frame}")
    for name, path in facts.outputs.items():
        print(f"[tokenflow] wrote {name}: {path}")
    print(f"[tokenflow] run facts: {out_dir / 'run.json'}")
    for message in facts.warnings:  # once more at the end, where they are read
        print(f"[tokenflow] warning: {message}", file=sys.stderr)


def main() -> None:
    """The console script: the command line checked and made ready for Hydra, then Hydra's app."""
    from .config import ConfigError

    try:
        from .hydra_config import conf_dir, register
        from .overrides import prepare

        sys.argv[1:] = prepare(sys.argv[1:])
        register()
        import hydra

        app = hydra.main(config_path=str(conf_dir()), config_name="config", version_base=None)(_run)
        app()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(ERROR_EXIT)
    except KeyboardInterrupt:  # before or after the run itself (imports, Hydra's set-up)
        print("\ninterrupted before the edit started: nothing was written", file=sys.stderr)
        sys.exit(INTERRUPTED_EXIT)


if __name__ == "__main__":
    main()
