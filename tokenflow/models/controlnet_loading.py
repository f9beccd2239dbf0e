"""`load_controlnet(source, unet_config)`: a ControlNet checkpoint read into unet.controlnet.ControlNet,
strictly, for the UNet it will condition; `build_random_controlnet`: a seeded random one.

`source` is a diffusers folder (`config.json` + `diffusion_pytorch_model.safetensors`, as
`lllyasviel/control_v11p_sd15_canny` is published), an original single `.safetensors` file
(`control_model.*` keys), a hub id (only those two files are fetched with huggingface_hub) or one
original file in a hub repository, `owner/repo/file.safetensors` (as `thibaud/controlnet-sd21` holds
SD-2.1's). The hub's cache is honoured; offline, one error names the files to fetch. The walk is the models' (loading.py):

1. find the files; 2. read the config and the safetensors header (names and shapes, no weight);
3. check the ControlNet against the model: the same family (SD-1.x: 1x1-conv projections, 768-wide
   text; SD-2.x: Linear, 1024) and the same encoder widths, so its residuals fit the UNet's skip
   connections; build it on the meta device and check every key and shape of the file against it;
4. read the tensors in the target dtype and assign them.

Every problem (a missing file, a pickle, another family, a key or a shape off) is one line, found
before any weight is read.
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import replace
from pathlib import Path

import torch

from unet.controlnet import EMBEDDING_CHANNELS, ControlNet, config_from_diffusers
from unet.controlnet_keys import PREFIX as CONTROL_PREFIX
from unet.controlnet_keys import conditioning_channels, family, hint_conv_count, ldm_to_diffusers
from unet.model import UNetConfig

from .checkpoint import CheckpointError, assign_strict, read_json, read_safetensors, refuse_pickle, safetensors_header, strip_prefix
from .loading import ModelNotAvailable, _looks_like_path, _part, _prefix_summary, _stand_ins, _weights_file
from .presets import KINDS

WEIGHTS_STEM = "diffusion_pytorch_model"
# One original single file inside a hub repository (how SD-2.x ControlNets are published, several per
# repository): 'owner/repo/path/in/repo.safetensors', when no such local file exists.
HUB_FILE = re.compile(r"((?!\.\.?/)[\w.-]+/[\w.-]+)/([\w.-]+(?:/[\w.-]+)*\.safetensors)")


def load_controlnet(
    source: str | os.PathLike, unet_config: UNetConfig, *, device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32, variant: str | None = None,
) -> ControlNet:
    """The ControlNet at `source`, checked to fit a UNet of `unet_config`, in eval mode on `device`."""
    layout, weights, config, where = find_controlnet(str(source), variant)                     # 1.
    shapes = {k: tuple(v["shape"]) for k, v in safetensors_header(weights).items()}            # 2.
    if layout == "diffusers":                                                                  # 3.
        try:
            cfg, channels, widths = config_from_diffusers(read_json(config))
        except ValueError as e:
            raise CheckpointError(f"{config}: {e}") from None
        check_fits(cfg, unet_config, where)
        prefix, rename = "", dict
    else:
        prefix = CONTROL_PREFIX
        cfg, channels, widths = plan_single_file(shapes, unet_config, where)
        rename = lambda sd: ldm_to_diffusers(sd, cfg)  # noqa: E731
    part = _part(lambda c: ControlNet(c, channels, widths), cfg, weights, shapes, prefix=prefix, where=where, rename=rename)
    state = strip_prefix(read_safetensors(weights, dtype=dtype, device=str(device), keys=part.keys), prefix)  # 4.
    return assign_strict(part.module, rename(state), source=where).eval()


def build_random_controlnet(
    unet_config: UNetConfig, seed: int = 0, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
    conditioning_channels: int = 3,
) -> ControlNet:
    """A ControlNet for a UNet of `unet_config` with weights drawn from `seed` (on the CPU, so a seed
    gives the same weights on every device; device="meta": shapes only). Its zero convolutions are
    drawn like any other conv, not zero: a trained ControlNet's are not zero either, and a random one
    must change the UNet's output for the runs that use it to show anything. The global random state
    is left as it was."""
    device = str(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device("meta" if device == "meta" else "cpu"):
            net = ControlNet(unet_config, conditioning_channels)
            zero_convs = [*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out]
            for conv in zero_convs:
                conv.reset_parameters()
    return net.to(device, dtype).eval().requires_grad_(False)


# ----------------------------------------------------------------------------- 1. find the files


def find_controlnet(source: str, variant: str | None) -> tuple[str, Path, Path | None, str]:
    """(layout "diffusers" or "single", weights file, config.json or None, what errors name)."""
    path = Path(os.path.expanduser(source))
    if path.is_dir():
        return "diffusers", _weights_file(path, WEIGHTS_STEM, variant), _config(path), str(path)
    if path.is_file():
        refuse_pickle(path)
        if path.suffix != ".safetensors":
            raise CheckpointError(f"{path}: expected a diffusers ControlNet folder or an original .safetensors ControlNet file")
        return "single", path, None, str(path)
    if hub_file := HUB_FILE.fullmatch(source):  # 'owner/repo/control_v11p_sd21_canny.safetensors'
        return "single", _download_file(hub_file.group(1), hub_file.group(2), source), None, source
    if _looks_like_path(source):
        raise FileNotFoundError(f"{source}: no such file or folder (expected a diffusers ControlNet folder, "
                                f"an original .safetensors ControlNet file, a hub id or a hub id/file.safetensors)")
    root = _download(source, variant)
    return "diffusers", _weights_file(root, WEIGHTS_STEM, variant), _config(root), source


def _config(folder: Path) -> Path:
    f = folder / "config.json"
    if not f.is_file():
        raise FileNotFoundError(f"{f}: missing (a diffusers ControlNet folder holds config.json beside its weights)")
    return f


def controlnet_download_files(variant: str | None = None) -> list[str]:
    """The two files of a hub ControlNet that loading reads."""
    v = f".{variant}" if variant else ""
    return ["config.json", f"{WEIGHTS_STEM}{v}.safetensors"]


def _download(repo_id: str, variant: str | None) -> Path:
    from huggingface_hub import constants, snapshot_download

    files = controlnet_download_files(variant)
    try:
        return Path(snapshot_download(repo_id, allow_patterns=files))
    except Exception as e:  # offline, unknown id, network: all end the same way for the user
        includes = " ".join(f"--include {shlex.quote(f)}" for f in files)
        raise ModelNotAvailable(
            f"could not get the ControlNet '{repo_id}' from the Hugging Face hub ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200]}). Looked in the cache {constants.HF_HUB_CACHE}. It needs "
            f"{' and '.join(files)}: download them where the hub is reachable (hf download {shlex.quote(repo_id)} "
            f"{includes}) and copy the cache, or pass a local path: the folder holding them or an original "
            "single .safetensors ControlNet file."
        ) from None


def _download_file(repo_id: str, filename: str, source: str) -> Path:
    from huggingface_hub import constants, hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, filename))
    except Exception as e:  # offline, unknown id or file, network
        raise ModelNotAvailable(
            f"{source}: no such local file, and could not get {filename} of '{repo_id}' from the Hugging Face hub "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200]}). Looked in the cache {constants.HF_HUB_CACHE}. "
            f"Download it where the hub is reachable (hf download {shlex.quote(repo_id)} {shlex.quote(filename)}) "
            "and copy the cache, or pass the file's local path."
        ) from None


# ----------------------------------------------------------------------------- 3. check against the model


def _family(cfg: UNetConfig) -> str:
    """'SD-1.x (1x1-conv projections, 768-wide text)': what decides which model a ControlNet fits."""
    kind = next(k for k in KINDS.values() if k.linear_projection == cfg.use_linear_projection)
    proj = "Linear" if cfg.use_linear_projection else "1x1-conv"
    return f"{kind.family} ({proj} projections, {cfg.cross_attention_dim}-wide text)"


def check_fits(cfg: UNetConfig, unet_config: UNetConfig, where: str) -> None:
    """A ControlNet fits a UNet of the same family whose encoder has its widths (its residuals are
    added to the skip connections one for one)."""
    mine, theirs = _family(cfg), _family(unet_config)
    if mine != theirs:
        raise CheckpointError(f"{where}: an {mine} ControlNet cannot condition the {theirs} model; "
                              f"pass a ControlNet made for the model's family")
    encoder = lambda c: (c.in_channels, c.block_out_channels, c.layers_per_block, c.attention_levels)  # noqa: E731
    if encoder(cfg) != encoder(unet_config):
        raise CheckpointError(
            f"{where}: the ControlNet's encoder (in_channels, block_out_channels, layers_per_block, attention_levels) "
            f"{encoder(cfg)} is not the model's UNet's {encoder(unet_config)}")


def plan_single_file(shapes: dict, unet_config: UNetConfig, where: str) -> tuple[UNetConfig, int, tuple[int, ...]]:
    """An original file carries no config: its family and condition channels are read off the shapes
    and checked against the model, and its encoder is the model UNet's (the strict key and shape
    check that follows names anything else)."""
    stray = sorted(k for k in shapes if not k.startswith(CONTROL_PREFIX))
    if stray:
        if len(stray) == len(shapes):
            raise CheckpointError(f"{where}: no {CONTROL_PREFIX}* keys: not an original-layout ControlNet. "
                                  f"Found: {_prefix_summary(shapes)}")
        raise CheckpointError(f"{where}: {len(stray)} unexpected key(s) outside {CONTROL_PREFIX}*: {stray[:8]}")
    inner = {k: v.shape for k, v in _stand_ins(shapes, CONTROL_PREFIX).items()}
    src = f"{where} [{CONTROL_PREFIX}*]"
    try:
        linear, width = family(inner, src)
        channels = conditioning_channels(inner, src)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    cfg = replace(unet_config, use_linear_projection=linear, cross_attention_dim=width)
    check_fits(cfg, unet_config, where)
    # conv_in's width, then each stride-2 conv's (Sequential indices 4, 8, 12: every second conv after conv_in)
    n = hint_conv_count(inner)
    outs = [inner.get(f"input_hint_block.{i}.weight") for i in range(0, 2 * (n - 1), 4)]
    widths = tuple(int(s[0]) for s in outs) if n >= 4 and n % 2 == 0 and None not in outs else EMBEDDING_CHANNELS
    return unet_config, channels, widths  # odd hint blocks keep the default widths: the strict check names their keys
