"""CLIP score of an edited video: the mean over frames of cos(CLIP image embedding of the frame,
CLIP text embedding of the target prompt). Raw cosine, not x100 and not clipped at 0, which is the
scale of the TokenFlow paper's Table 1 (0.33 for TokenFlow, 0.23 for the unedited reconstruction).

Default model: ViT-L/14, `openai/clip-vit-large-patch14` (a transformers CLIPModel). Weights come
from a local folder or the Hugging Face hub (only config, safetensors weights, preprocessing and
tokenizer files are fetched). Where neither is available: `load_clip` raises ClipUnavailable saying
what to provide; `clip_score_or_none` (Table 1, where the score is one column of several) prints
"CLIP score skipped: ..." and carries on; the CLI, whose only job is the score, prints one error line
naming --clip-model and exits with code 2, as for bad input.

The model: both towers are clip_text's transformer (`clip_text.model.Encoder` of pre-LN `Block`s).
The text tower IS clip_text's `TextTransformer` (causal, final LayerNorm); the image tower is the same
`Encoder` without the causal mask. What CLIP adds around them:
  - image: 2-D patches (conv, stride = kernel = patch, no bias), a learned class token in front,
    learned positions, `pre_layrnorm` (transformers' spelling) before the blocks and
    `post_layernorm` on the class token after them, then `visual_projection`;
  - text: the feature at the end-of-text token (the highest id in CLIP's vocabulary, so argmax of
    the ids finds it), then `text_projection`.
Attribute names follow the transformers CLIPModel checkpoint's keys (`vision_model.*`, `text_model.*`,
`visual_projection.weight`, `text_projection.weight`, `logit_scale`), so loading is a strict walk over
the file. Nothing is a buffer (the model is built on meta and filled): position ids are made on the fly.

    python -m tools.clip_score --video edited.mp4 --prompt "a red wolf" [--clip-model PATH_OR_ID] [--device cpu]
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clip_text.model import ACTIVATIONS, Encoder, TextConfig, TextTransformer
from clip_text.tokenizer import Tokenizer
from tokenflow.models.checkpoint import (CheckpointError, assign_strict, env_flag, read_json, read_safetensors,
                                         refuse_pickle)

DEFAULT_MODEL = "openai/clip-vit-large-patch14"
# Everything load_clip_folder reads; the hub repos also hold pickle/TF/Flax copies we never want.
HUB_FILES = ["config.json", "model.safetensors", "preprocessor_config.json", "vocab.json", "merges.txt",
             "tokenizer_config.json", "special_tokens_map.json"]

# Older exports store the position ids as buffers; the model recomputes them.
IGNORED_KEYS = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")

# transformers' CLIPTextConfig / CLIPVisionConfig / CLIPConfig defaults, for keys a config.json
# leaves out (transformers only writes what it was given in some versions).
TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                     num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5)
VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5)
PROJECTION_DIM_DEFAULT = 512

# OpenAI CLIP's preprocessing (used when a folder has no preprocessor_config.json).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipUnavailable(RuntimeError):
    """CLIP weights could be neither found locally nor downloaded; the message says what to provide."""


@dataclass
class ClipScoreResult:
    per_frame: list[float]  # cosine of each frame with the prompt
    mean: float


# ---------------------------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------------------------

@dataclass
class VisionConfig:
    image_size: int = 224
    patch_size: int = 14
    width: int = 1024
    heads: int = 16
    layers: int = 24
    mlp: int = 4096
    channels: int = 3
    act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        for name in ("image_size", "patch_size", "width", "heads", "layers", "mlp", "channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"VisionConfig.{name} must be a positive int, got {value!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"VisionConfig: image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.width % self.heads:
            raise ValueError(f"VisionConfig: width {self.width} does not split into {self.heads} heads")
        if self.act not in ACTIVATIONS:
            raise ValueError(f"VisionConfig.act must be one of {ACTIVATIONS}, got {self.act!r}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class ClipConfig:
    text: TextConfig
    vision: VisionConfig
    projection_dim: int = 768

    @classmethod
    def from_transformers_config(cls, d: dict, *, source: str = "config.json") -> "ClipConfig":
        """From a transformers CLIPConfig dict (top level with text_config / vision_config)."""
        if "text_config" not in d and "text_config_dict" not in d:
            raise ValueError(f"{source}: no 'text_config'; not a transformers CLIPConfig (model_type {d.get('model_type')!r})")
        if "vision_config" not in d and "vision_config_dict" not in d:
            raise ValueError(f"{source}: no 'vision_config'; a CLIP score needs the image tower too")
        # Old exports (openai/clip-vit-*) carry `*_config_dict` entries that override `*_config`.
        text = {**TEXT_DEFAULTS, **(d.get("text_config") or {}), **(d.get("text_config_dict") or {})}
        vision = {**VISION_DEFAULTS, **(d.get("vision_config") or {}), **(d.get("vision_config_dict") or {})}
        act = vision["hidden_act"]
        if act not in ACTIVATIONS:
            raise ValueError(f"{source}: vision hidden_act {act!r} is not supported (only {', '.join(ACTIVATIONS)})")
        return cls(
            text=TextConfig.from_transformers_config(text, source=f"{source} text_config"),
            vision=VisionConfig(
                image_size=int(vision["image_size"]), patch_size=int(vision["patch_size"]),
                width=int(vision["hidden_size"]), heads=int(vision["num_attention_heads"]),
                layers=int(vision["num_hidden_layers"]), mlp=int(vision["intermediate_size"]),
                channels=int(vision["num_channels"]), act=act, layer_norm_eps=float(vision["layer_norm_eps"]),
            ),
            projection_dim=int(d.get("projection_dim", PROJECTION_DIM_DEFAULT)),
        )


@dataclass
class Preprocess:
    """uint8 frames -> the pixel tensor the image tower reads (OpenAI CLIP's recipe, done in torch)."""

    size: int = 224  # the short side is resized to this
    crop: int = 224  # then a centre square of this side is cut out
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    @classmethod
    def from_json(cls, path: Path) -> "Preprocess":
        """From a transformers preprocessor_config.json (either the old ints or the newer dicts)."""
        d = read_json(path)

        def side(value, keys: tuple[str, ...], name: str) -> int:
            if isinstance(value, dict):
                for k in keys:
                    if k in value:
                        return int(value[k])
                raise ValueError(f"{path}: {name} {value!r} has none of {keys}")
            return int(value)

        size = side(d.get("size", 224), ("shortest_edge", "height"), "size")
        crop = side(d.get("crop_size", size), ("height", "shortest_edge"), "crop_size")
        if isinstance(d.get("crop_size"), dict) and d["crop_size"].get("width", crop) != crop:
            raise ValueError(f"{path}: only square crops are supported, got crop_size {d['crop_size']}")
        mean, std = tuple(d.get("image_mean", CLIP_MEAN)), tuple(d.get("image_std", CLIP_STD))
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"{path}: image_mean/image_std must have 3 values, got {mean} / {std}")
        return cls(size=size, crop=crop, mean=mean, std=std)

    def __call__(self, frames: Tensor) -> Tensor:
        """uint8 [F, H, W, 3] RGB -> float32 [F, 3, crop, crop], normalised."""
        if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[-1] != 3:
            raise ValueError(f"Preprocess: frames must be uint8 [F, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
        _, h, w, _ = frames.shape
        # The short side becomes `size`, the long side keeps the aspect (truncated, as torchvision does).
        scale = self.size / min(h, w)
        new_h, new_w = (self.size, int(w * scale)) if h <= w else (int(h * scale), self.size)
        if min(new_h, new_w) < self.crop:
            raise ValueError(f"Preprocess: crop {self.crop} is larger than the resized frame {new_h}x{new_w}")
        x = frames.permute(0, 3, 1, 2).float() / 255.0  # [F, H, W, 3] -> [F, 3, H, W]
        if (new_h, new_w) != (h, w):
            x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
            # CLIP was evaluated on 8-bit images resized by PIL: clip the bicubic overshoot and round
            # to the 8-bit grid, so the tower sees what it was trained on.
            x = (x.clamp(0, 1) * 255).round() / 255
        top, left = (new_h - self.crop) // 2, (new_w - self.crop) // 2
        x = x[:, :, top : top + self.crop, left : left + self.crop]
        mean = torch.tensor(self.mean, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype).view(1, 3, 1, 1)
        return (x - mean) / std


# ---------------------------------------------------------------------------------------------
# image tower
# ---------------------------------------------------------------------------------------------

class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.empty(cfg.width))
        self.patch_embedding = nn.Conv2d(cfg.channels, cfg.width, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding(cfg.num_patches + 1, cfg.width)

    def forward(self, pixels: Tensor) -> Tensor:
        patches = self.patch_embedding(pixels)  # [B, 3, S, S] -> [B, W, S/p, S/p]
        patches = patches.flatten(2).transpose(1, 2)  # -> [B, N, W], row-major patch order
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)  # [B, 1, W]
        x = torch.cat([cls, patches], dim=1)  # [B, 1 + N, W]
        positions = torch.arange(x.shape[1], device=x.device)  # not a buffer: see module docstring
        return x + self.position_embedding(positions)


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = VisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)  # sic: the checkpoint's key
        self.encoder = Encoder(cfg, causal=False)  # clip_text's stack; every patch sees every patch
        self.post_layernorm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)

    def forward(self, pixels: Tensor) -> Tensor:
        """[B, 3, S, S] -> pooled [B, W]: the class token after the blocks."""
        x = self.encoder(self.pre_layrnorm(self.embeddings(pixels)))
        return self.post_layernorm(x[:, 0])


# ---------------------------------------------------------------------------------------------
# the whole model
# ---------------------------------------------------------------------------------------------

class ClipModel(nn.Module):
    def __init__(self, cfg: ClipConfig):
        super().__init__()
        self.cfg = cfg
        self.text_model = TextTransformer(cfg.text)
        self.vision_model = VisionTransformer(cfg.vision)
        self.visual_projection = nn.Linear(cfg.vision.width, cfg.projection_dim, bias=False)
        self.text_projection = nn.Linear(cfg.text.width, cfg.projection_dim, bias=False)
        # Unused by the score (cosine needs no temperature), kept so the file loads strictly.
        self.logit_scale = nn.Parameter(torch.empty(()))

    def image_features(self, pixels: Tensor) -> Tensor:
        """Preprocessed pixels [B, 3, S, S] -> image embeddings [B, projection_dim] (not normalised)."""
        s = self.cfg.vision.image_size
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (self.cfg.vision.channels, s, s):
            raise ValueError(f"ClipModel: pixels must be [B, {self.cfg.vision.channels}, {s}, {s}], got {tuple(pixels.shape)}")
        return self.visual_projection(self.vision_model(pixels))

    def text_features(self, ids: Tensor) -> Tensor:
        """Token ids [B, L<=77] -> text embeddings [B, projection_dim] (not normalised)."""
        cfg = self.cfg.text
        if ids.dim() != 2 or not 1 <= ids.shape[1] <= cfg.max_positions:
            raise ValueError(f"ClipModel: ids must be [B, <= {cfg.max_positions}], got shape {tuple(ids.shape)}")
        if int(ids.min()) < 0 or int(ids.max()) >= cfg.vocab_size:
            raise ValueError(f"ClipModel: token ids must lie in [0, {cfg.vocab_size}), got [{int(ids.min())}, {int(ids.max())}]")
        x = self.text_model(ids)  # [B, L, W]; causal, so padding after the end token changes nothing
        end = ids.argmax(dim=-1)  # the end token is the highest id of CLIP's vocabulary (first one if repeated)
        pooled = x[torch.arange(x.shape[0], device=x.device), end]  # [B, W]
        return self.text_projection(pooled)


@dataclass
class LoadedClip:
    """Everything needed to score frames against a prompt."""

    model: ClipModel
    tokenizer: Tokenizer
    preprocess: Preprocess
    source: str

    @torch.no_grad()
    def embed_images(self, frames: Tensor, batch_size: int = 16) -> Tensor:
        """uint8 [F, H, W, 3] -> unit-length image embeddings [F, projection_dim] (float32)."""
        p = next(self.model.parameters())
        out = []
        for i in range(0, frames.shape[0], batch_size):  # batches keep the float copies of 512^2 frames small
            pixels = self.preprocess(frames[i : i + batch_size]).to(device=p.device, dtype=p.dtype)
            out.append(F.normalize(self.model.image_features(pixels).float(), dim=-1).cpu())
        return torch.cat(out)

    @torch.no_grad()
    def embed_text(self, prompt: str) -> Tensor:
        """prompt -> unit-length text embedding [projection_dim] (float32)."""
        p = next(self.model.parameters())
        ids = self.tokenizer(prompt).to(p.device)
        return F.normalize(self.model.text_features(ids).float(), dim=-1)[0].cpu()


def load_clip_folder(folder: Path | str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> LoadedClip:
    """A transformers CLIPModel folder: config.json, model.safetensors, optionally preprocessor_config.json
    and the tokenizer files (vocab.json + merges.txt; else the BPE file of open_clip_torch is used)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder (expected a transformers CLIPModel folder)")
    weights = folder / "model.safetensors"
    if not weights.is_file():
        pickled = [p for p in (folder / "pytorch_model.bin",) if p.is_file()]
        if pickled:
            refuse_pickle(pickled[0])  # raises, with the one-line conversion
        raise FileNotFoundError(f"{weights}: missing (a CLIPModel folder with safetensors weights holds config.json + model.safetensors)")
    cfg = ClipConfig.from_transformers_config(read_json(folder / "config.json"), source=str(folder / "config.json"))
    preprocess_file = folder / "preprocessor_config.json"
    preprocess = Preprocess.from_json(preprocess_file) if preprocess_file.is_file() else Preprocess(
        size=cfg.vision.image_size, crop=cfg.vision.image_size)
    if preprocess.crop != cfg.vision.image_size:
        raise ValueError(f"{preprocess_file}: crop {preprocess.crop} differs from the model's image_size {cfg.vision.image_size}")

    has_tokenizer = (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    tokenizer = Tokenizer.from_folder(folder) if has_tokenizer else Tokenizer.from_open_clip()
    if tokenizer.end_id != tokenizer.vocab_size - 1:
        # text_features pools at argmax(ids); that finds the end token only if it is the highest id
        raise ValueError(f"{tokenizer.source}: end token id {tokenizer.end_id} is not the highest id "
                         f"({tokenizer.vocab_size - 1}); not a CLIP vocabulary")
    if tokenizer.vocab_size > cfg.text.vocab_size:
        raise ValueError(f"{tokenizer.source}: {tokenizer.vocab_size} tokens, the text tower has only {cfg.text.vocab_size}")

    with torch.device("meta"):
        model = ClipModel(cfg)
    state = read_safetensors(weights, dtype=dtype, device=device)
    assign_strict(model, state, source=str(weights), ignore=IGNORED_KEYS)
    return LoadedClip(model=model.eval(), tokenizer=tokenizer, preprocess=preprocess, source=str(folder))


def cosine_scores(image_embeddings: Tensor, text_embedding: Tensor) -> list[float]:
    """Per-frame cosine between unit vectors [F, D] and [D]."""
    scores = (image_embeddings @ text_embedding).tolist()
    bad = [i for i, s in enumerate(scores) if not math.isfinite(s)]
    if bad:
        raise CheckpointError(f"CLIP gave non-finite scores for frame(s) {bad[:8]} (broken weights or dtype overflow)")
    return scores


# ---------------------------------------------------------------------------------------------
# finding and loading the weights
# ---------------------------------------------------------------------------------------------

def _looks_like_hub_id(s: str) -> bool:
    return re.fullmatch(r"[\w.-]+/[\w.-]+", s) is not None


def _download(repo_id: str) -> Path:
    from huggingface_hub import constants, snapshot_download

    # huggingface_hub reads HF_HUB_OFFLINE once, at import; read it now so a test or a script that sets
    # it later still gets the cache-only path (no ~25 s of network retries).
    offline = env_flag("HF_HUB_OFFLINE")
    try:
        try:  # the cache first: no network needed when the files are already there
            return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES, local_files_only=True))
        except Exception:
            if offline:
                raise
            return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except Exception as e:  # offline, unknown id, no network: the same advice for all
        why = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
        raise ClipUnavailable(
            f"CLIP weights '{repo_id}' are not available ({'HF_HUB_OFFLINE is set' if offline else 'hub not reachable'}; {why}; "
            f"cache {constants.HF_HUB_CACHE}). Provide a local folder path of a transformers CLIPModel with "
            "safetensors weights (config.json + model.safetensors, optionally preprocessor_config.json, "
            f"vocab.json, merges.txt), e.g. made with `hf download {repo_id} {' '.join(HUB_FILES)} "
            "--local-dir clip` where the hub is reachable, or give this machine network access to the hub id."
        ) from None


def load_clip(model: str | os.PathLike = DEFAULT_MODEL, *, device: str | torch.device = "cpu",
              dtype: torch.dtype = torch.float32) -> LoadedClip:
    """A local CLIPModel folder, or a hub id (downloaded or from the cache). Raises ClipUnavailable when
    a hub id cannot be had, FileNotFoundError for a local path that does not exist."""
    path = Path(os.path.expanduser(str(model)))
    if path.is_dir():
        return load_clip_folder(path, device=device, dtype=dtype)
    if path.exists():
        raise FileNotFoundError(f"{path}: is a file; expected a folder of a transformers CLIPModel (config.json + model.safetensors)")
    if not _looks_like_hub_id(str(model)):
        raise FileNotFoundError(f"{model}: no such folder (expected a transformers CLIPModel folder or a hub id like {DEFAULT_MODEL})")
    return load_clip_folder(_download(str(model)), device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# the score
# ---------------------------------------------------------------------------------------------

def _as_frames(frames) -> torch.Tensor:
    """A video path, or uint8 [F, H, W, 3] (numpy or torch) -> torch uint8 [F, H, W, 3]."""
    if isinstance(frames, (str, os.PathLike)):
        from tokenflow.media import read_video

        return read_video(frames).frames
    if isinstance(frames, np.ndarray):
        frames = torch.from_numpy(np.ascontiguousarray(frames))
    if not isinstance(frames, torch.Tensor):
        raise TypeError(f"clip_score: frames must be a video path or a uint8 array [F, H, W, 3], got {type(frames).__name__}")
    if frames.dtype != torch.uint8:
        raise ValueError(f"clip_score: frames must be uint8 (0..255), got dtype {frames.dtype}")
    if frames.dim() != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise ValueError(f"clip_score: frames must have shape [F, H, W, 3] with F >= 1 (RGB), got {tuple(frames.shape)}")
    return frames


def clip_score(frames, prompt: str, *, model: str | os.PathLike | LoadedClip = DEFAULT_MODEL,
               device: str | torch.device = "cpu", batch_size: int = 16) -> ClipScoreResult:
    """Mean over frames of cos(image embedding, text embedding of `prompt`).

    `frames`: uint8 [F, H, W, 3] RGB (numpy or torch) or a video path / image folder.
    `model`: a local CLIPModel folder, a hub id, or an already loaded `LoadedClip` (to score many videos).
    """
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"clip_score: prompt must be a non-empty string, got {prompt!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"clip_score: batch_size must be a positive int, got {batch_size!r}")
    video = _as_frames(frames)
    clip = model if isinstance(model, LoadedClip) else load_clip(model, device=device)
    per_frame = cosine_scores(clip.embed_images(video, batch_size=batch_size), clip.embed_text(prompt))
    return ClipScoreResult(per_frame=per_frame, mean=float(np.mean(per_frame)))


def clip_score_or_none(frames, prompt: str, **kwargs) -> ClipScoreResult | None:
    """clip_score, or None with a printed "CLIP score skipped: ..." when the weights are unavailable.
    Other errors (bad frames, a missing local folder, a broken checkpoint) still raise."""
    try:
        return clip_score(frames, prompt, **kwargs)
    except ClipUnavailable as e:
        print(f"CLIP score skipped: {e}")
        return None


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.clip_score",
        description="CLIP score of a video against a prompt: the mean over frames of the cosine between the "
                    "CLIP image embedding of each frame and the CLIP text embedding of the prompt (the TokenFlow "
                    "paper's Table 1 scale). Prints one line per frame, then the mean on the last line. "
                    "Exit code 2, with an error line, when it cannot score: CLIP weights that are not available "
                    "(the line says what to pass with --clip-model) or bad input.",
        allow_abbrev=False,
    )
    parser.add_argument("--video", required=True, help="edited video (file, or folder of png/jpg frames)")
    parser.add_argument("--prompt", required=True, help="the target prompt of the edit")
    parser.add_argument("--clip-model", default=DEFAULT_MODEL,
                        help=f"local transformers CLIPModel folder (safetensors) or hub id (default {DEFAULT_MODEL})")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    parser.add_argument("--batch-size", type=int, default=16, help="frames per forward pass (default 16)")
    args = parser.parse_args(argv)

    try:
        result = clip_score(args.video, args.prompt, model=args.clip_model, device=args.device, batch_size=args.batch_size)
    except ClipUnavailable as e:  # scoring is this command's only job: without weights it failed
        print(f"error: no CLIP score: {e} Pass that folder with --clip-model PATH.", file=sys.stderr)
        return 2
    except (ValueError, TypeError, RuntimeError, FileNotFoundError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for i, s in enumerate(result.per_frame):
        print(f"frame {i:4d} clip score {s:.4f}")
    print(f"mean clip score: {result.mean:.4f} ({len(result.per_frame)} frames, {args.clip_model})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
