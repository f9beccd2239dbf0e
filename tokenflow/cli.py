"""The `tokenflow` command: a Hydra app around `pipeline.run_edit`.

    tokenflow video=clip.mp4 prompt="a marble sculpture of a woman running, Venus de Milo"
    tokenflow video=clip.mp4 prompt_file=prompt.txt       # a long prompt, read from a UTF-8 file
    tokenflow model=tiny                                  # no weights needed: the random tiny model
    tokenflow -m model=tiny tokenflow.mode=tokenflow,per_frame   # a sweep, one folder per run

Before Hydra reads the command line, `prepare_argv` makes two changes to it:
- `prompt=`, `negative_prompt=` and `inversion_prompt=` take their value as literal text: commas,
  quotes, apostrophes, backslashes, `${...}`, unicode and emoji reach the model as typed (Hydra's
  override grammar would read a comma as a sweep or a list, and stop at quotes). So a prompt cannot
  be swept with commas; `<key>_file=PATH` reads the text from a file instead (trailing newlines dropped).
- a key conf/config.yaml does not have is refused with the nearest known key, also when written
  with `+` (Hydra's own hint for a typo is to add it with `+`, which then runs with the default
  prompt: `+promt="a cat"` would edit with the wrong prompt and no warning).

Each run's folder (Hydra's run dir; `hydra.run.dir=...` moves it) holds config.yaml (resolved),
edited.mp4, side_by_side.mp4 and run.json (frames, size, fps, timings, keyframes, peak memory,
warnings): all of them, written by run_edit once the edit succeeded, or none. A run that fails or is
interrupted (Ctrl-C) prints one line and removes the folder Hydra made for it when that folder holds
nothing else (its .hydra/ and log); a folder that already held files is left as it was.
"""

from __future__ import annotations

import difflib
import re
import shutil
import sys
from pathlib import Path

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")

TEXT_KEYS = ("prompt", "negative_prompt", "inversion_prompt")  # values taken literally
FILE_SUFFIX = "_file"  # prompt_file=PATH: the prompt is the file's text
GROUPS = ("model", "method", "experiment")  # config groups: their keys depend on the option chosen
INTERRUPTED_EXIT = 130  # the shell's code for a process ended by SIGINT


def _register_resolvers() -> None:
    """`${mod:a,b}` = a mod b, for one GPU per job in a parallel sweep: device=cuda:${mod:${hydra:job.num},4}
    (README: Sweeps and clusters). Registered on import, so a launcher's worker process has it too."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("mod"):
        OmegaConf.register_new_resolver("mod", lambda a, b: int(a) % int(b))


_register_resolvers()

# key=value, +key=value, ++key=value, ~key[=value] (Hydra's override forms); the value may hold anything
OVERRIDE = re.compile(r"^(?P<prefix>\+\+|\+|~)?(?P<key>[A-Za-z_][\w.\-]*)(?P<package>@[\w.\-]*)?=(?P<value>.*)$", re.S)


class UsageError(ValueError):
    """A command-line problem found before Hydra runs."""


def hydra_string(text: str) -> str:
    """`text` as a quoted Hydra override value that composes back to exactly `text`.

    Two layers read it: Hydra's override grammar (in a quoted string a backslash is literal except
    before the closing quote or an escaped quote, where backslashes come doubled) and OmegaConf,
    which would resolve `${...}` (escaped as `\\${`, with the backslashes before it doubled)."""
    text = re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", text)
    text = re.sub(r"(\\*)('|$)", lambda m: m.group(1) * 2 + ("\\'" if m.group(2) else ""), text)
    return "'" + text + "'"


def read_text_file(key: str, path: str) -> str:
    """The text of `<key>_file=path` (UTF-8, trailing whitespace dropped)."""
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{key}{FILE_SUFFIX}={path}: no such file") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"{key}{FILE_SUFFIX}={path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise UsageError(f"{key}{FILE_SUFFIX}={path}: cannot read it ({e.strerror})") from None
    text = text.rstrip()
    if not text:
        raise UsageError(f"{key}{FILE_SUFFIX}={path}: the file is empty")
    return text


def known_keys() -> dict[str, set[str] | None]:
    """conf/config.yaml's top-level keys -> the keys of that section (None: not a section, or a
    config group whose keys depend on the option chosen)."""
    from omegaconf import DictConfig, OmegaConf

    conf = OmegaConf.load(Path(CONF_DIR) / "config.yaml")
    keys: dict[str, set[str] | None] = {g: None for g in GROUPS}
    for k, v in conf.items():
        if k == "defaults":
            continue
        keys[str(k)] = set(map(str, v.keys())) if isinstance(v, DictConfig) and k != "hydra" else None
    for k in TEXT_KEYS:
        keys[k + FILE_SUFFIX] = None
    return keys


def _nearest(word: str, choices) -> str:
    close = difflib.get_close_matches(word, sorted(choices), n=1, cutoff=0.6)
    return f"did you mean {close[0]}?" if close else f"known keys: {', '.join(sorted(choices))}"


def check_key(prefix: str, key: str, known: dict[str, set[str] | None]) -> None:
    """Refuse a key conf/config.yaml does not have (with or without `+`), naming the nearest one."""
    if prefix == "~":
        return
    top, _, rest = key.partition(".")
    if top == "hydra":
        return
    if top not in known:
        raise UsageError(f"unknown key {prefix}{key} ({_nearest(top, known)}); every key is in conf/config.yaml")
    section = known[top]
    if rest and section is not None:
        sub = rest.split(".")[0]
        if sub not in section:
            raise UsageError(f"unknown key {prefix}{key} ({_nearest(sub, section).replace('did you mean ', f'did you mean {top}.')}); "
                             f"every key is in conf/config.yaml")


def prepare_argv(args: list[str]) -> list[str]:
    """The command line as Hydra should read it: prompts quoted, `<key>_file=` read, keys checked."""
    known = known_keys()
    out, given = [], {}
    for arg in args:
        m = OVERRIDE.match(arg)
        if m is None or arg.startswith("-"):
            out.append(arg)  # a flag (-m, --cfg job, ...) or a group path (hydra/launcher=...)
            continue
        prefix, key, value = m["prefix"] or "", m["key"], m["value"]
        check_key(prefix, key, known)
        if key.endswith(FILE_SUFFIX) and key[: -len(FILE_SUFFIX)] in TEXT_KEYS:
            key, value = key[: -len(FILE_SUFFIX)], read_text_file(key[: -len(FILE_SUFFIX)], value)
        if key in TEXT_KEYS and not m["package"]:
            if key in given:
                raise UsageError(f"{key} is given twice ({given[key]} and {arg!r}); give it once")
            given[key] = repr(arg)
            out.append(f"{prefix}{key}={hydra_string(value)}")
        else:
            out.append(arg)
    return out


def _only_hydra_files(out_dir: Path) -> bool:
    """True when the run dir holds nothing but what Hydra put there for this run (.hydra/, *.log)."""
    return out_dir.is_dir() and all(p.name == ".hydra" or p.suffix == ".log" for p in out_dir.iterdir())


def _remove_failed_run_dir(out_dir: Path) -> str:
    """Remove a failed run's folder if it holds only Hydra's own files; say what stays."""
    if _only_hydra_files(out_dir):
        shutil.rmtree(out_dir, ignore_errors=True)
        parent = out_dir.parent  # outputs/DATE/ when this was its only run
        if parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
        return "no outputs were written"
    return f"no outputs were written; {out_dir} keeps the files it held before"


def _run(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from .models.loading import ModelNotAvailable
    from .pipeline import RunInterrupted, device_error_line, run_edit

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    try:
        facts = run_edit(resolved, out_dir)  # writes config.yaml with the other outputs, on success only
    except (ModelNotAvailable, FileNotFoundError, ValueError, FloatingPointError) as e:
        # bad input or missing weights: one clear line, no traceback, and no outputs were written
        print(f"error: {e} ({_remove_failed_run_dir(out_dir)})", file=sys.stderr)
        sys.exit(2)
    except (RunInterrupted, KeyboardInterrupt) as e:
        what = str(e) if isinstance(e, RunInterrupted) else "interrupted"
        print(f"\n{what} ({_remove_failed_run_dir(out_dir)})", file=sys.stderr)
        sys.exit(INTERRUPTED_EXIT)
    except RuntimeError as e:  # from the device (CUDA start, an index, out of memory): one line; bugs keep their traceback
        line = device_error_line(e)
        if line is None:
            raise
        print(f"error: {line} ({_remove_failed_run_dir(out_dir)})", file=sys.stderr)
        sys.exit(2)
    print(f"[tokenflow] {facts.frames} frames {facts.size[1]}x{facts.size[0]} at {facts.fps:g} fps; "
          f"seconds per frame: {facts.seconds_per_frame}")
    for name, path in facts.outputs.items():
        print(f"[tokenflow] wrote {name}: {path}")
    print(f"[tokenflow] run facts: {out_dir / 'run.json'}")
    for message in facts.warnings:  # once more at the end, where they are read
        print(f"[tokenflow] warning: {message}", file=sys.stderr)


def main() -> None:
    """The console script: the command line made ready for Hydra, then Hydra's app."""
    try:
        sys.argv[1:] = prepare_argv(sys.argv[1:])
        import hydra

        app = hydra.main(config_path=CONF_DIR, config_name="config", version_base=None)(_run)
        app()
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # before or after the run itself (imports, Hydra's set-up)
        print("\ninterrupted before the edit started: nothing was written", file=sys.stderr)
        sys.exit(INTERRUPTED_EXIT)


if __name__ == "__main__":
    main()
