"""The page's settings as the command line's overrides: what the stages run and the command shown.

The page holds a few main fields and a box of free-form overrides (one per line, the command line's
syntax). `Form.overrides()` writes them all as `key=value` overrides, the extra ones last so they
win; `tokenflow.config.load_config` composes them exactly as the `tokenflow` command does, so a bad
value gets the command line's one-line error, and `Form.command()` is that command.
"""

from __future__ import annotations

import shlex
import threading
from dataclasses import dataclass

from ..config import ConfigError, RunConfig, load_config

# Hydra composes in one global instance: the page's requests (a stage, the command box updating) run
# in threads, so they compose one at a time
_COMPOSING = threading.Lock()

MAIN_KEYS = ("video", "model", "prompt", "method", "steps", "tokenflow.keyframe_interval", "tokenflow.propagation",
             "tokenflow.mode", "seed")


@dataclass
class Form:
    video: str  # a file, or "sample" (the generated clip)
    model: str  # a preset name (tokenflow.models.presets)
    prompt: str
    method: str  # pnp | sdedit
    steps: int
    keyframe_interval: int
    propagation: str  # paper | released
    mode: str  # tokenflow.mode
    seed: int
    extra: str = ""  # further overrides, one per line (blank lines and # comments skipped)

    def extra_overrides(self) -> list[str]:
        lines = [line.strip() for line in (self.extra or "").splitlines()]
        lines = [line for line in lines if line and not line.startswith("#")]
        for line in lines:
            if "=" not in line:
                raise ConfigError(f"extra override {line!r} is not key=value (one override per line, as on the command line)")
        return lines

    def overrides(self) -> list[str]:
        """The command line's overrides, in its syntax (prompts as typed: no quoting needed)."""
        values = (self.video, self.model, self.prompt, self.method, _whole(self.steps, "steps"),
                  _whole(self.keyframe_interval, "tokenflow.keyframe_interval"), self.propagation, self.mode,
                  _whole(self.seed, "seed"))
        return [f"{key}={value}" for key, value in zip(MAIN_KEYS, values)] + self.extra_overrides()

    def config(self) -> RunConfig:
        """The checked settings (ConfigError: the command line's one-line message)."""
        return compose(self.overrides())

    def command(self) -> str:
        """The equivalent shell command."""
        return "tokenflow " + " ".join(shlex.quote(o) for o in self.overrides())


def _whole(value, key: str) -> int:
    """A number field's value as an integer override (the page's number boxes send floats)."""
    if value is None or (isinstance(value, float) and not value.is_integer()):
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    return int(value)


def compose(overrides: list[str]) -> RunConfig:
    """tokenflow.config.load_config, one thread at a time."""
    with _COMPOSING:
        return load_config(overrides)


def form_from_overrides(overrides: list[str]) -> Form:
    """The page's first values: the settings of `tokenflow OVERRIDES` (the app's own command line),
    each main key in its field and every other override in the extra box."""
    cfg = compose(overrides)
    main = set(MAIN_KEYS)
    extra = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in main]
    return Form(video=cfg.video, model=cfg.model.name, prompt=cfg.prompt, method=cfg.method.name, steps=cfg.steps,
                keyframe_interval=cfg.tokenflow.keyframe_interval, propagation=cfg.tokenflow.propagation,
                mode=cfg.tokenflow.mode, seed=cfg.seed, extra="\n".join(extra))
