"""The run configuration of the evaluation tools: the same Hydra config as the `tokenflow` command.

The figure and table tools compose <repo>/conf with hydra.compose, so their defaults are exactly the
main CLI's, and take the same `key=value` overrides. A few common settings also get flags
(`--model tiny`, `--size 128`, `--steps 10`, `--max-frames 16`); a flag becomes an override placed
BEFORE the free overrides, so an explicit `key=value` on the command line wins.
"""

from __future__ import annotations

import argparse
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONF_DIR = REPO / "conf"


def model_groups() -> list[str]:
    """The names of conf/model/*.yaml: `--model NAME` selects one of them."""
    return sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))


def model_override(model: str) -> str:
    """`--model tiny` -> "model=tiny" (a config group); anything else is a weights source (hub id,
    diffusers folder or ldm .safetensors file) -> "model.source=..."."""
    if model in model_groups():
        return f"model={model}"
    return f"model.source={quote(model)}"


def quote(value: str) -> str:
    """A Hydra override value that stays one string whatever it holds (spaces, '=', ',', quotes,
    backslashes, `${`): the quoting the `tokenflow` command gives prompts."""
    from tokenflow.cli import hydra_string

    return hydra_string(str(value))


def _size(text: str) -> int | str:
    if text == "full":
        return text
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a short side in pixels or full, got {text!r}")
    return int(text)


def add_run_flags(parser: argparse.ArgumentParser) -> None:
    """The flags shared by every tool that runs the pipeline, plus free Hydra overrides."""
    parser.add_argument("--model", default=None,
                        help=f"a model config ({', '.join(model_groups())}) or a weights source "
                             "(hub id, diffusers folder, ldm .safetensors); default: the config's (sd21_base)")
    parser.add_argument("--size", type=_size, default=None,
                        help="short side in pixels, or full: the input's size (override size=; default: the model's native size)")
    parser.add_argument("--steps", type=int, default=None, help="DDIM sampling steps (override steps=)")
    parser.add_argument("--max-frames", type=int, default=None, help="at most this many frames (override frames.max=)")
    parser.add_argument("overrides", nargs="*", default=[],
                        help="Hydra overrides of conf/config.yaml, as for the tokenflow command, e.g. inversion.steps=20 device=cpu")


def flag_overrides(args: argparse.Namespace, *, for_tokenflow_command: bool = False) -> list[str]:
    """The overrides the shared flags stand for, in front of the user's free overrides: prepared as
    Hydra's compose reads them, or (for_tokenflow_command) as typed, for a `tokenflow` command line,
    which prepares them itself (preparing twice would quote a prompt twice)."""
    out = []
    if args.model is not None:
        out.append(model_override(args.model))
    if args.size is not None:
        out.append(f"size={args.size}")
    if args.steps is not None:
        out.append(f"steps={args.steps}")
    if args.max_frames is not None:
        out.append(f"frames.max={args.max_frames}")
    for o in args.overrides:
        if "=" not in o:
            raise ValueError(f"override {o!r} is not key=value (e.g. steps=10)")
    # as the tokenflow command reads them: prompts taken literally, <key>_file= read, unknown keys refused
    from tokenflow.cli import prepare_argv

    prepared = prepare_argv(list(args.overrides))  # also refuses unknown keys and unreadable prompt files
    return out + (list(args.overrides) if for_tokenflow_command else prepared)


def compose_config(overrides: list[str]) -> dict:
    """conf/config.yaml with these overrides, resolved to a plain dict (what run_edit takes)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose("config", overrides=list(overrides))
    return OmegaConf.to_container(cfg, resolve=True)
