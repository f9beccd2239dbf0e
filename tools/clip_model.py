"""CLIP (image tower + text tower + the two projections), for the CLIP-score metric.

Loads a transformers `CLIPModel` folder (config.json + model.safetensors, e.g.
openai/clip-vit-large-patch14). Attribute names follow that checkpoint's keys
(`vision_model.*`, `text_model.*`, `visual_projection.weight`, `text_projection.weight`,
`logit_scale`), so loading is a strict walk over the file.

Both towers are the pre-LN transformer of clip_text/model.py: the text tower IS its
`TextTransformer` (causal, final LayerNorm); the image tower stacks the same `Block`
without the causal mask. What CLIP adds:
  - image: 2-D patches (conv, stride = kernel = patch, no bias), a learned class token in front,
    learned positions, `pre_layrnorm` (transformers' spelling) before the blocks and
    `post_layernorm` on the class token after them, then `visual_projection`;
  - text: the feature at the end-of-text token (the highest id in CLIP's vocabulary, so argmax of
    the ids finds it), then `text_projection`.
Nothing is a buffer (the model is built on meta and filled): position ids are made on the fly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clip_text.model import ACTIVATIONS, Block, TextConfig, TextTransformer
from clip_text.tokenizer import Tokenizer
from tokenflow.models.checkpoint import CheckpointError, assign_strict, read_json, read_safetensors, refuse_pickle

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


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(
            Block(cfg.width, cfg.heads, cfg.mlp, cfg.act, cfg.layer_norm_eps) for _ in range(cfg.layers)
        )

    def forward(self, x: Tensor) -> Tensor:
        for block in self.layers:
            x = block(x, causal=False)  # every patch sees every patch
        return x


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = VisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)  # sic: the checkpoint's key
        self.encoder = VisionEncoder(cfg)
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
