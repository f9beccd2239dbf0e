"""`load_models(source)`: an SD-1.x or SD-2.x checkpoint read into the hand-written models, as one walk down.

`source` is a hub id (only the files we need are fetched with huggingface_hub; its cache is honoured,
offline gives one error saying what to do), a diffusers folder (`model_index.json`, `unet/`, `vae/`,
`text_encoder/`, `tokenizer/`, `scheduler/`) or one ldm `.safetensors` file
(`v1-5-pruned-emaonly.safetensors`, `v2-1_512-ema-pruned.safetensors`). The walk:

1. find the files (`find_files`): the folder (downloaded for a hub id) or the file, and in it the
   weights file of each part (UNet, VAE, text encoder) and the tokenizer;
2. read the headers (`read_headers`): the folder's JSON configs and every weights file's safetensors
   header (names and shapes; no weight is read);
3. build the config (`plan_folder`, `plan_ldm_file`): the model KIND (tokenflow.models.presets.KINDS,
   from a folder's configs or an ldm file's key prefixes and shapes: it decides the text tower and the
   tokenizer's rules; it must be the kind of the preset the user named, if any), eps or v, the
   UNet/VAE/text configs, and each part built on the meta device and checked key by key against the
   file's names and shapes;
4. fill strictly (`fill`): each part's tensors read in the target dtype and assigned to its model.

Every problem a file can have (missing, pickled, truncated, of no known kind, a key or a shape off)
is found by step 3, before any weight is read. Where nothing says whether an SD-2.x model predicts
eps or v, loading stops and asks: a wrong guess would not fail, it would quietly produce noise.
`prediction_type` (when given) overrides a folder's scheduler config and an ldm file's name.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

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
from unet.keys import uses_linear_projection
from unet.model import UNet, UNetConfig
from vae.keys import IGNORED_KEYS as VAE_IGNORED
from vae.keys import ldm_to_diffusers as vae_ldm_to_diffusers
from vae.keys import normalise_diffusers_keys as vae_normalise
from vae.model import VAE, VAEConfig

from .bundle import ModelFacts, Models
from .checkpoint import (
    CheckpointError, assign_strict, read_json, read_safetensors, refuse_pickle, safetensors_header, strip_prefix,
)
from .presets import KINDS, PRESETS, SD1, SD2, ModelKind, Preset, known_kinds

DEFAULT_MODEL_ID = PRESETS["sd21_base"].source
VAE_PREFIX = "first_stage_model."
# The 12 schedule buffers of an ldm file (betas, alphas_cumprod, ...): the schedule is recomputed
# from its definition, so these are known and unused.
LDM_SCHEDULE_KEYS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
)
LDM_OTHER_IGNORED = ("model_ema.decay", "model_ema.num_updates", "logvar")
PARTS = ("unet", "vae", "text_encoder")


class ModelNotAvailable(RuntimeError):
    """The weights could not be found or downloaded; the message says what to pass instead."""


def load_models(
    source: str | os.PathLike | None = None, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
    variant: str | None = None, prediction_type: str | None = None, expect: Preset | None = None,
) -> Models:
    """The four parts of the checkpoint at `source`. `expect`: the preset the user named; a checkpoint
    of another kind is refused (one line naming both) before any weight is read."""
    source = DEFAULT_MODEL_ID if source is None else source
    dtype = torch.float32 if dtype is None else dtype
    _check_prediction_type(prediction_type)
    files = find_files(str(source), variant)                                    # 1.
    header = read_headers(files)                                                # 2.
    plan = (plan_folder if files.layout == "diffusers" else plan_ldm_file)(files, header, prediction_type, expect)  # 3.
    return fill(plan, files, dtype=dtype, device=str(device))                   # 4.


def _check_prediction_type(prediction_type: str | None) -> None:
    """None (read it from the checkpoint) or one of PREDICTION_TYPES; checked before any file is read."""
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"prediction_type={prediction_type!r} is not one of {', '.join(map(repr, PREDICTION_TYPES))}; "
            "pass one of those, or None to read it from the checkpoint (Hydra: model.prediction_type=...)"
        )


# ----------------------------------------------------------------------------- 1. find the files


@dataclass
class Files:
    source: str  # as the user named it (a hub id stays a hub id in messages and facts)
    layout: str  # "diffusers" or "ldm"
    root: Path  # the folder, or the ldm file
    weights: dict[str, Path]  # each of PARTS -> the safetensors file holding it (ldm: the one file)
    tokenizer: Optional[Path] = None  # a diffusers folder's tokenizer/ (None: the open_clip package's vocabulary)


def find_files(source: str, variant: str | None) -> Files:
    path = Path(os.path.expanduser(source))
    if path.is_dir():
        return _folder_files(path, variant, source=str(path))
    if path.is_file():
        refuse_pickle(path)
        if path.suffix != ".safetensors":
            raise CheckpointError(f"{path}: expected a diffusers folder or an ldm .safetensors file")
        return Files(str(path), "ldm", path, {part: path for part in PARTS})
    if _looks_like_path(source):
        raise FileNotFoundError(f"{source}: no such file or folder (expected a diffusers folder, an ldm .safetensors file or a hub id)")
    return _folder_files(_download(source, variant), variant, source=source)


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
            "huggingface-cli download) and copy the cache, or give a local copy as model.source=PATH (--model PATH in the tools): a diffusers folder "
            "or an ldm file such as v2-1_512-ema-pruned.safetensors or v1-5-pruned-emaonly.safetensors. To try the pipeline without weights, "
            "use the random tiny model: model=tiny."
        ) from None


def _download_command(repo_id: str, variant: str | None) -> str:
    """The `hf download` line (huggingface_hub >= 0.34) that fetches just the files `_download` needs:
    a plain `hf download` of an SD repository also fetches its .ckpt and EMA files, many GB more."""
    includes = " ".join(f"--include {shlex.quote(pattern)}" for pattern in _needed_files(variant))
    return f"hf download {shlex.quote(repo_id)} {includes}"


def _folder_files(root: Path, variant: str | None, source: str) -> Files:
    for sub in PARTS:
        if not (root / sub).is_dir():
            raise FileNotFoundError(f"{root / sub}: missing; {root} is not a diffusers Stable Diffusion folder")
    weights = {
        "unet": _weights_file(root / "unet", "diffusion_pytorch_model", variant),
        "vae": _weights_file(root / "vae", "diffusion_pytorch_model", variant),
        "text_encoder": _weights_file(root / "text_encoder", "model", variant),
    }
    tokenizer = root / "tokenizer"
    return Files(source, "diffusers", root, weights, tokenizer if tokenizer.is_dir() else None)


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


# ----------------------------------------------------------------------------- 2. read the headers


@dataclass
class Header:
    configs: dict[str, Optional[dict]]  # a folder's JSON configs: each of PARTS and "scheduler" (None: no such file)
    shapes: dict[Path, dict[str, tuple[int, ...]]]  # each weights file: tensor name -> shape


def read_headers(files: Files) -> Header:
    """Names and shapes of every weights file (a truncated or foreign file is named here), and a
    folder's configs. No weight is read."""
    shapes = {}
    for f in dict.fromkeys(files.weights.values()):
        shapes[f] = {k: tuple(v["shape"]) for k, v in safetensors_header(f).items()}
    configs: dict[str, Optional[dict]] = {}
    if files.layout == "diffusers":
        configs = {part: read_json(files.root / part / "config.json") for part in PARTS}
        scheduler = files.root / "scheduler" / "scheduler_config.json"
        configs["scheduler"] = read_json(scheduler) if scheduler.is_file() else None
    return Header(configs, shapes)


# ----------------------------------------------------------------------------- 3. build the config


@dataclass
class Part:
    """One model of the checkpoint: built on the meta device and checked against its file's keys."""

    module: nn.Module  # on meta, its names and shapes checked against the file's
    file: Path
    prefix: str  # the part's keys in the file ("" for a folder's own file), stripped before `rename`
    keys: Optional[list[str]]  # the file's keys to read (None: all of them)
    where: str  # the file (and prefix) errors name
    rename: Callable[[dict], dict]  # the file's names -> the module's
    ignore: tuple[str, ...] = ()  # the file's known, unused keys


@dataclass
class Plan:
    kind: ModelKind
    schedule: Schedule
    parts: dict[str, Part]  # each of PARTS


def _part(model_cls, cfg, file: Path, shapes: dict, *, prefix="", where=None, rename=dict, ignore=()) -> Part:
    """Build the part on meta and check every key and shape of the file against it (stand-in meta
    tensors carry the header's shapes through the renaming): strictness costs no read."""
    where = where or str(file)
    with torch.device("meta"):
        module = model_cls(cfg)
    assign_strict(module, rename(_stand_ins(shapes, prefix)), source=where, ignore=ignore)
    keys = [k for k in shapes if k.startswith(prefix)] if prefix else None
    return Part(module, file, prefix, keys, where, rename, tuple(ignore))


def _stand_ins(shapes: dict[str, tuple[int, ...]], prefix: str = "") -> dict[str, torch.Tensor]:
    """Meta tensors of the header's shapes, under `prefix` and with it stripped: what the key
    renamers and the config readers (which read shapes only) take in place of the weights."""
    return {k[len(prefix):]: torch.empty(shape, device="meta") for k, shape in shapes.items() if k.startswith(prefix)}


def check_kind(kind: ModelKind, expect: Preset | None, source: str) -> None:
    """The kind found against the preset the user named (None: none named), as soon as the kind is
    known: a checkpoint of another kind would run with the preset's size and settings but the files'
    text tower and tokenizer rules. Refused, with the presets that fit it."""
    if expect is not None and kind.name != expect.kind:
        fits = [p.name for p in PRESETS.values() if p.kind == kind.name and not p.random_only]
        raise CheckpointError(
            f"model={expect.name} is an {expect.model_kind.family} model but {source} holds an {kind.family} "
            f"checkpoint: pass model={fits[0]} (or another {kind.family} preset: {', '.join(fits)}) with this source"
        )


# --- a diffusers folder: the configs say it all


def plan_folder(files: Files, header: Header, prediction_type: str | None, expect: Preset | None) -> Plan:
    c, w = header.configs, files.weights
    kind = _folder_kind(files.root, c["unet"], c["text_encoder"])
    check_kind(kind, expect, files.source)
    schedule = _folder_schedule(files.root, c["scheduler"], prediction_type, kind)  # a question costs nothing to ask
    parts = {
        "unet": _part(UNet, UNetConfig.from_diffusers_config(c["unet"]), w["unet"], header.shapes[w["unet"]]),
        "vae": _part(VAE, VAEConfig.from_diffusers_config(c["vae"]), w["vae"], header.shapes[w["vae"]],
                     rename=vae_normalise, ignore=VAE_IGNORED),
        "text_encoder": _part(TextEncoder, TextConfig.from_transformers_config(c["text_encoder"]), w["text_encoder"],
                              header.shapes[w["text_encoder"]], rename=normalise_transformers_keys, ignore=TEXT_IGNORED),
    }
    return Plan(kind, schedule, parts)


def _folder_kind(root: Path, unet_json: dict, text_json: dict) -> ModelKind:
    """The kind a diffusers folder holds, from unet/config.json (use_linear_projection; absent means
    false, as in SD-1.5's config) and text_encoder/config.json (hidden_act; transformers' default quick_gelu)."""
    linear = bool(unet_json.get("use_linear_projection", False))
    act = text_json.get("hidden_act", "quick_gelu")
    for kind in KINDS.values():
        if kind.linear_projection == linear and kind.text_act == act:
            return kind
    raise CheckpointError(
        f"{root}: matches no known model kind. Found unet/config.json use_linear_projection={linear} and "
        f"text_encoder/config.json hidden_act={act!r}. Known kinds: {known_kinds()}."
    )


def _folder_schedule(root: Path, config: dict | None, prediction_type: str | None, kind: ModelKind = SD2) -> Schedule:
    """The folder's schedule (`scheduler/scheduler_config.json`); `prediction_type`, when given,
    overrides the config's. Without the config, an SD-2.x folder needs `prediction_type`: eps and v
    models have the same weights' shapes, and nothing else in the folder tells them apart (SD-1.x is eps)."""
    f = root / "scheduler" / "scheduler_config.json"
    if config is None:
        prediction_type = prediction_type or kind.prediction_type
        if prediction_type is None:
            raise CheckpointError(
                f"{f}: missing, so nothing says whether {root} is an epsilon (512 px, SD-2.1-base) or a "
                "v-prediction (768 px, SD-2.1) model: pass prediction_type='epsilon' or 'v_prediction' "
                "(Hydra: model.prediction_type=...), or copy scheduler/scheduler_config.json from the model's repository."
            )
        return Schedule(prediction_type=prediction_type)
    schedule = Schedule.from_scheduler_config(config)  # a config without the key is epsilon, as in diffusers
    if prediction_type is None or prediction_type == schedule.prediction_type:
        return schedule
    warnings.warn(f"{f} says prediction_type={schedule.prediction_type!r}; using {prediction_type!r} as passed")
    return dataclasses.replace(schedule, prediction_type=prediction_type)


# --- one ldm file: the key prefixes and shapes say it all, the name says eps or v


def plan_ldm_file(files: Files, header: Header, prediction_type: str | None, expect: Preset | None) -> Plan:
    path = files.root
    shapes = header.shapes[path]
    kind = ldm_kind(shapes, path)
    check_kind(kind, expect, files.source)
    prediction_type = prediction_type or prediction_type_from_name(path) or kind.prediction_type
    if prediction_type is None:
        raise CheckpointError(
            f"{path}: is this an epsilon (512 px, SD-2.x-base) or a v-prediction (768 px, SD-2.x) model? "
            "The file does not say and its name gives no hint: pass prediction_type='epsilon' or "
            "'v_prediction' (Hydra: model.prediction_type=...)."
        )
    used = UNET_PREFIX, VAE_PREFIX, kind.ldm_text_prefix
    stray = sorted(k for k in shapes if not k.startswith(used) and k not in LDM_SCHEDULE_KEYS + LDM_OTHER_IGNORED)
    if stray:
        raise CheckpointError(f"{path}: {len(stray)} unexpected key(s) outside the UNet/VAE/text tower: {stray[:8]}")
    is_v = prediction_type == "v_prediction"

    where = f"{path} [{UNET_PREFIX}*]"
    ucfg = unet_config_from_ldm(_stand_ins(shapes, UNET_PREFIX), upcast_attention=is_v, sample_size=96 if is_v else 64, source=where)
    unet = _part(UNet, ucfg, path, shapes, prefix=UNET_PREFIX, where=where, rename=lambda sd: unet_ldm_to_diffusers(sd, ucfg))

    where = f"{path} [{VAE_PREFIX}*]"
    vcfg = VAEConfig.from_state_dict(vae_ldm_to_diffusers(_stand_ins(shapes, VAE_PREFIX)), source=where)
    vae = _part(VAE, vcfg, path, shapes, prefix=VAE_PREFIX, where=where, rename=vae_ldm_to_diffusers, ignore=VAE_IGNORED)

    prefix = kind.ldm_text_prefix
    where = f"{path} [{prefix}*]"
    if kind is SD1:  # transformers' CLIPTextModel as it is (older files without the text_model. level too)
        tcfg = TextConfig.from_transformers_state_dict(normalise_transformers_keys(_stand_ins(shapes, prefix)), source=where)
        text = _part(TextEncoder, tcfg, path, shapes, prefix=prefix, where=where, rename=normalise_transformers_keys,
                     ignore=TEXT_IGNORED)
    else:  # OpenCLIP's tower: fused q,k,v, one block more than SD-2 reads
        raw = _stand_ins(shapes, prefix)
        tcfg = TextConfig.from_open_clip_state_dict(raw, source=where)
        text = _part(TextEncoder, tcfg, path, shapes, prefix=prefix, where=where,
                     rename=lambda sd: ldm_to_transformers(sd, layers=tcfg.layers, source=where),
                     ignore=TEXT_IGNORED + tuple(ldm_unused_keys(raw, tcfg.layers)))
    return Plan(kind, Schedule(prediction_type=prediction_type), {"unet": unet, "vae": vae, "text_encoder": text})


def ldm_kind(shapes: dict[str, tuple[int, ...]], path: Path) -> ModelKind:
    """The kind of an ldm file from its keys and shapes (the safetensors header: no weight is read):
    the text tower's prefix, checked against the UNet's proj_in shape.

    A file that matches no kind (an SDXL or inpainting file, a UNet-only export, a VAE file) gets one
    error listing the known kinds and the prefixes found, before any config is inferred from what is not there.
    """
    kinds = KINDS.values()
    found = [kind for kind in kinds if any(k.startswith(kind.ldm_text_prefix) for k in shapes)]
    missing = [f"{what} weights ({prefix}*)" for what, prefix in (("UNet", UNET_PREFIX), ("VAE", VAE_PREFIX))
               if not any(k.startswith(prefix) for k in shapes)]
    if len(found) != 1 or missing:
        if not found:
            missing.append(f"text encoder weights ({' or '.join(k.ldm_text_prefix + '*' for k in kinds)})")
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


def _prefix_summary(keys, n: int = 8) -> str:
    """'model.diffusion_model.* (686), conditioner.embedders.* (...)': what a file holds, by two-part prefix."""
    counts: dict[str, int] = {}
    for k in keys:
        parts = k.split(".")
        head = ".".join(parts[:2]) + ".*" if len(parts) > 2 else k
        counts[head] = counts.get(head, 0) + 1
    shown = [f"{h} ({c})" for h, c in sorted(counts.items(), key=lambda hc: -hc[1])]
    return ", ".join(shown[:n]) + (f", ... ({len(shown) - n} more)" if len(shown) > n else "") if shown else "no tensors"


def prediction_type_from_name(path: Path) -> str | None:
    """'v2-1_768-ema-pruned' -> v_prediction; '..._512-...' or '-base' -> epsilon; else None."""
    name = path.stem.lower()
    if re.search(r"768|(^|[-_])v($|[-_])|v[-_]?pred", name):
        return "v_prediction"
    if re.search(r"512|base|eps", name):
        return "epsilon"
    return None


# ----------------------------------------------------------------------------- 4. fill strictly


def fill(plan: Plan, files: Files, *, dtype: torch.dtype, device: str) -> Models:
    """Each part's tensors read in `dtype` on `device` (only its own keys: one part in memory at a time
    besides the models) and assigned, strictly, to its model built on meta."""
    models = {}
    for name, part in plan.parts.items():
        state = strip_prefix(read_safetensors(part.file, dtype=dtype, device=device, keys=part.keys), part.prefix)
        models[name] = assign_strict(part.module, part.rename(state), source=part.where, ignore=part.ignore).eval()
    unet, vae, text = models["unet"], models["vae"], models["text_encoder"]
    rules = plan.kind.tokenizer_rules  # the tokenizer the text tower was trained with
    tokenizer = Tokenizer.from_folder(files.tokenizer, rules) if files.tokenizer else Tokenizer.from_open_clip(rules)
    facts = ModelFacts(
        source=files.source, layout=files.layout, prediction_type=plan.schedule.prediction_type,
        sample_size=unet.config.sample_size * vae.downsample_factor, schedule=plan.schedule, dtype=dtype, device=device,
        kind=plan.kind.name,
    )
    return Models(unet, vae, text, tokenizer, facts)

