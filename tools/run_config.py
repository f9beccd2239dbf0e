"""The command-line flags of the evaluation tools, made into the `tokenflow` command's overrides.

The figure and table tools read their settings with `tokenflow.config.load_config(overrides)`, so
their defaults are exactly the main CLI's, and take the same `key=value` overrides, as typed. A few
common settings also get flags (`--model tiny`, `--size 128`, `--steps 10`, `--max-frames 16`); a
flag becomes an override placed BEFORE the free overrides, so an explicit `key=value` wins.
"""

from __future__ import annotations

import argparse


def model_groups() -> list[str]:
    """The model presets (tokenflow/models/presets.py): `--model NAME` selects one of them."""
    from tokenflow.models.presets import PRESETS

    return list(PRESETS)


def model_override(model: str) -> str:
    """`--model tiny` -> "model=tiny" (a config group); anything else is a weights source (hub id,
    diffusers folder or ldm .safetensors file) -> "model.source=..."."""
    if model in model_groups():
        return f"model={model}"
    return f"model.source={quote(model)}"


def quote(value: str) -> str:
    """A Hydra override value that stays one string whatever it holds (spaces, '=', ',', quotes,
    backslashes, `${`): the quoting the `tokenflow` command gives prompts. For values of keys that are
    not prompts (video=, model.source=); prompts are taken literally as typed."""
    from tokenflow.overrides import hydra_string

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


def flag_overrides(args: argparse.Namespace) -> list[str]:
    """The overrides the shared flags stand for, in front of the user's free overrides, as typed on a
    `tokenflow` command line (load_config and the command prepare them; preparing twice would quote a
    prompt twice). Unknown keys and unreadable prompt files are refused here already."""
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
    from tokenflow.overrides import prepare

    prepare(list(args.overrides))  # the tokenflow command's checks: unknown keys, prompt files
    return out + list(args.overrides)
