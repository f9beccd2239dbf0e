"""The text encoders of Stable Diffusion: one CLIP text transformer, two sets of settings.

- SD-2.x: OpenCLIP ViT-H/14's text tower (1024 wide, 16 heads, exact GELU), cut after its 23rd of 24
  blocks. SD-2 conditions the UNet on the PENULTIMATE block's output followed by the final LayerNorm;
  the diffusers export drops the 24th block, so "last block, then final_layer_norm" is exactly that.
- SD-1.5: OpenAI CLIP ViT-L/14's text tower (768 wide, 12 heads, 12 blocks, quick_gelu). SD-1.5 reads
  the LAST block's output followed by the final LayerNorm: again "every block, then final_layer_norm".
The maths is the same pre-LN causal transformer; only the widths, the depth and the activation differ,
all in TextConfig.

Attribute names follow the published transformers keys (`text_model.encoder.layers.N.self_attn.q_proj`,
...), so filling the model is a strict walk over the file. Nothing is registered as a buffer: the
model is built on the meta device and only parameters are filled; position ids and the causal mask
are made on the fly.

`Block` and `Encoder` (the stack of blocks) are the one pre-LN transformer of the project: both text towers
and CLIP's image tower for the CLIP score (tools/clip_score.py) are built from them, with the same names and
maths; the image tower's stack runs without the causal mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ACTIVATIONS = ("gelu", "quick_gelu")


def _heads(width: int, heads: int | None, source) -> int:
    """The head count of a tower read from a file: given, or width / 64 (both OpenCLIP's and OpenAI's
    CLIP text towers use 64-wide heads; no tensor shape says so)."""
    if heads is not None:
        return heads
    if width % 64:
        raise ValueError(f"{source}: width {width} is not a multiple of 64-wide heads; pass heads=")
    return width // 64


@dataclass
class TextConfig:
    vocab_size: int = 49408
    max_positions: int = 77
    width: int = 1024
    heads: int = 16
    layers: int = 23  # of OpenCLIP's 24: SD-2 reads the penultimate block
    mlp: int = 4096
    act: str = "gelu"  # exact (erf) GELU; OpenAI's CLIP models use quick_gelu
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        for name in ("vocab_size", "max_positions", "width", "heads", "layers", "mlp"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"TextConfig.{name} must be a positive int, got {value!r}")
        if self.width % self.heads:
            raise ValueError(f"TextConfig: width {self.width} does not split into {self.heads} heads")
        if self.act not in ACTIVATIONS:
            raise ValueError(f"TextConfig.act must be one of {ACTIVATIONS}, got {self.act!r}")

    @classmethod
    def sd21(cls) -> "TextConfig":
        return cls()

    @classmethod
    def sd15(cls) -> "TextConfig":
        """OpenAI CLIP ViT-L/14's text tower, all 12 blocks: 123,060,480 parameters."""
        return cls(width=768, heads=12, layers=12, mlp=3072, act="quick_gelu")

    @classmethod
    def tiny(cls) -> "TextConfig":
        """For tests: the real vocabulary (so the real tokenizer fits) and a toy transformer."""
        return cls(width=32, heads=2, layers=2, mlp=37)

    @classmethod
    def from_transformers_config(cls, d: dict, *, source: str = "text_encoder/config.json") -> "TextConfig":
        """From a transformers CLIPTextConfig dict (diffusers `text_encoder/config.json`)."""
        required = ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size")
        missing = [k for k in required if k not in d]
        if missing:
            hint = " (this looks like a full CLIPConfig: pass its 'text_config')" if "text_config" in d else ""
            raise ValueError(f"{source}: missing {', '.join(missing)}; not a CLIPTextConfig{hint}")
        # Defaults are transformers' own for keys an old or hand-written config may leave out.
        act = d.get("hidden_act", "quick_gelu")
        if act not in ACTIVATIONS:
            raise ValueError(f"{source}: hidden_act {act!r} is not supported (only {', '.join(ACTIVATIONS)})")
        return cls(
            vocab_size=int(d.get("vocab_size", 49408)),
            max_positions=int(d.get("max_position_embeddings", 77)),
            width=int(d["hidden_size"]),
            heads=int(d["num_attention_heads"]),
            layers=int(d["num_hidden_layers"]),
            mlp=int(d["intermediate_size"]),
            act=act,
            layer_norm_eps=float(d.get("layer_norm_eps", 1e-5)),
        )

    @classmethod
    def from_open_clip_state_dict(
        cls, state: dict, *, heads: int | None = None, source: str = "cond_stage_model.model.*",
    ) -> "TextConfig":
        """From the shapes of an OpenCLIP text tower (ldm file, `cond_stage_model.model.` stripped).

        layers = blocks in the file - 1 (SD-2 reads the penultimate block). The head count is in no
        shape: OpenCLIP's text towers use 64-wide heads, so heads defaults to width // 64; pass
        `heads` for anything else (e.g. toy test models). The activation is exact GELU (OpenCLIP's
        own towers; only OpenAI's CLIP weights use quick_gelu).
        """
        for key in ("token_embedding.weight", "positional_embedding", "transformer.resblocks.0.mlp.c_fc.weight"):
            if key not in state:
                raise ValueError(f"{source}: no {key!r}; not an OpenCLIP text tower")
        vocab_size, width = state["token_embedding.weight"].shape
        blocks = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("transformer.resblocks."))
        if blocks < 2:
            raise ValueError(f"{source}: {blocks} block(s); SD-2 reads the penultimate one, so at least 2 are needed")
        heads = _heads(width, heads, source)
        return cls(
            vocab_size=int(vocab_size),
            max_positions=int(state["positional_embedding"].shape[0]),
            width=int(width),
            heads=heads,
            layers=blocks - 1,
            mlp=int(state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
            act="gelu",
        )


    @classmethod
    def from_transformers_state_dict(
        cls, state: dict, *, heads: int | None = None, source: str = "cond_stage_model.transformer.*",
    ) -> "TextConfig":
        """From the shapes of an OpenAI CLIP text tower in transformers names (`text_model.*`), as an
        SD-1.x ldm file holds it under `cond_stage_model.transformer.`.

        All blocks are used (SD-1.5 reads the last one). As for OpenCLIP, the head count is in no
        shape: OpenAI's CLIP text towers use 64-wide heads (ViT-L/14: 768 / 64 = 12); pass `heads`
        otherwise. The activation is quick_gelu, which OpenAI's CLIP weights were trained with.
        """
        p = "text_model."
        for key in (p + "embeddings.token_embedding.weight", p + "embeddings.position_embedding.weight",
                    p + "encoder.layers.0.mlp.fc1.weight"):
            if key not in state:
                raise ValueError(f"{source}: no {key!r}; not a CLIP text tower in transformers names")
        vocab_size, width = state[p + "embeddings.token_embedding.weight"].shape
        layers = 1 + max(int(k.split(".")[3]) for k in state if k.startswith(p + "encoder.layers."))
        heads = _heads(width, heads, source)
        return cls(
            vocab_size=int(vocab_size),
            max_positions=int(state[p + "embeddings.position_embedding.weight"].shape[0]),
            width=int(width), heads=heads, layers=layers,
            mlp=int(state[p + "encoder.layers.0.mlp.fc1.weight"].shape[0]),
            act="quick_gelu",
        )


def quick_gelu(x: Tensor) -> Tensor:
    # OpenAI CLIP's sigmoid approximation of GELU; models trained with it need it, not the exact one.
    return x * torch.sigmoid(1.702 * x)


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: Tensor, causal: bool) -> Tensor:
        b, n, c = x.shape
        d = c // self.heads
        # [B, N, C] -> [B, heads, N, d]
        q, k, v = (p(x).view(b, n, self.heads, d).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        # is_causal: token i sees tokens <= i; the mask is made inside SDPA, never stored
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        # [B, heads, N, d] -> [B, N, C]
        return self.out_proj(y.transpose(1, 2).reshape(b, n, c))


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, act: str):
        super().__init__()
        self.act = act
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc1(x)
        h = F.gelu(h) if self.act == "gelu" else quick_gelu(h)
        return self.fc2(h)


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln1(x)), then + mlp(ln2(x))."""

    def __init__(self, width: int, heads: int, mlp: int, act: str, eps: float):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(width, eps=eps)
        self.self_attn = SelfAttention(width, heads)
        self.layer_norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = MLP(width, mlp, act)

    def forward(self, x: Tensor, causal: bool = False) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x), causal)
        return x + self.mlp(self.layer_norm2(x))


class Embeddings(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.max_positions, cfg.width)

    def forward(self, ids: Tensor) -> Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)  # not a buffer: see module docstring
        return self.token_embedding(ids) + self.position_embedding(positions)


class Encoder(nn.Module):
    """`cfg.layers` blocks of `cfg.width` x `cfg.heads` (any config with TextConfig's tower fields).
    causal: token i sees tokens <= i (text); False lets every token see every token (image patches)."""

    def __init__(self, cfg: TextConfig, causal: bool = True):
        super().__init__()
        self.causal = causal
        self.layers = nn.ModuleList(
            Block(cfg.width, cfg.heads, cfg.mlp, cfg.act, cfg.layer_norm_eps) for _ in range(cfg.layers)
        )

    def forward(self, x: Tensor) -> Tensor:
        for block in self.layers:
            x = block(x, causal=self.causal)
        return x


class TextTransformer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)

    def forward(self, ids: Tensor) -> Tensor:
        return self.final_layer_norm(self.encoder(self.embeddings(ids)))


class TextEncoder(nn.Module):
    """token ids [B, 77] -> per-token text features [B, 77, width], the UNet's cross-attention context."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.text_model = TextTransformer(cfg)

    def check_ids(self, ids: Tensor) -> None:
        cfg = self.cfg
        if not isinstance(ids, Tensor):
            raise TypeError(f"TextEncoder: ids must be a torch tensor, got {type(ids).__name__}")
        if ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"TextEncoder: ids must be int64/int32 token ids, got dtype {ids.dtype}")
        if ids.dim() != 2 or not 1 <= ids.shape[1] <= cfg.max_positions:
            raise ValueError(f"TextEncoder: ids must be [batch, <= {cfg.max_positions}], got shape {tuple(ids.shape)}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= cfg.vocab_size):
            raise ValueError(
                f"TextEncoder: token ids must lie in [0, {cfg.vocab_size}), got [{int(ids.min())}, {int(ids.max())}]"
            )

    def forward(self, ids: Tensor) -> Tensor:
        self.check_ids(ids)
        return self.text_model(ids)
