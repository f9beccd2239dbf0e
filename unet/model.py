"""The Stable Diffusion UNet (SD-1.5, SD-2.0, SD-2.1), in one file.

Attribute names follow the diffusers checkpoint keys (`down_blocks.0.attentions.1.transformer_blocks.0
.attn1.to_q.weight`, ...), so a diffusers state dict fills the model by name, strictly; ldm files are
renamed to these keys first (unet/keys.py).

Shape of the network (SD-2.1): conv_in -> 4 down levels [320, 640, 1280, 1280] (2 resnets each,
self+cross attention after each resnet on the first 3 levels, stride-2 conv between levels) -> mid
(resnet, attention, resnet) -> 4 up levels (3 resnets each, fed the skip connections in reverse,
attention on the last 3, nearest x2 upsample between levels) -> GroupNorm, SiLU, conv_out.

SD-1.5 is the same network with three settings changed, all read from the config: 8 heads at every
level (so heads 40/80/160/160 wide instead of 64), 1x1-convolution proj_in/proj_out around each
transformer instead of Linear, and 768-wide text context instead of 1024.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import attention
from .control import ControlResiduals, UNetControl

SD2_HEAD_DIM = 64  # SD-2.x: 64-channel heads at every level (its ldm config: num_head_channels: 64)
SD1_HEADS = 8  # SD-1.x: 8 heads at every level whatever the width (its ldm config: num_heads: 8)


@dataclass
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    # which levels carry attention (CrossAttnDownBlock2D / CrossAttnUpBlock2D in diffusers terms)
    attention_levels: tuple[bool, ...] = (True, True, True, False)
    layers_per_block: int = 2
    # Head COUNT per level; a level's head width is its channels / heads (see `head_dims`).
    # SD-2.x: 5, 10, 20, 20 heads of 64 channels; SD-1.5: 8 heads of 40, 80, 160, 160.
    heads: tuple[int, ...] = (5, 10, 20, 20)
    cross_attention_dim: int = 1024  # width of the text features (SD-2.x OpenCLIP-H 1024, SD-1.5 CLIP-L 768)
    # Around each transformer: Linear proj_in/proj_out [C, C] (SD-2.x) or 1x1 Conv2d [C, C, 1, 1]
    # (SD-1.x, diffusers' use_linear_projection: false). Same maths per pixel; the weights' shapes differ.
    use_linear_projection: bool = True
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    time_embed_dim_mult: int = 4  # 320 -> 1280
    upcast_attention: bool = False  # attention in fp32 (the 768 v-model needs it in fp16)
    sample_size: int = 64  # latent side the model was trained at (512 px / 8)

    def __post_init__(self):
        self.block_out_channels = tuple(self.block_out_channels)
        self.attention_levels = tuple(self.attention_levels)
        self.heads = tuple(self.heads)
        n = len(self.block_out_channels)
        if len(self.attention_levels) != n or len(self.heads) != n:
            raise ValueError(f"UNetConfig: block_out_channels, attention_levels and heads need {n} entries each")
        for c, h in zip(self.block_out_channels, self.heads):
            if h < 1 or c % h:
                raise ValueError(f"UNetConfig: {c} channels do not split into {h} heads")

    @property
    def head_dims(self) -> tuple[int, ...]:
        """Channels per head at each level: SD-2.x (64, 64, 64, 64), SD-1.5 (40, 80, 160, 160)."""
        return tuple(c // h for c, h in zip(self.block_out_channels, self.heads))

    @classmethod
    def sd21_base(cls) -> "UNetConfig":
        """stable-diffusion-2-1-base: 512 px, epsilon prediction."""
        return cls()

    @classmethod
    def sd21(cls) -> "UNetConfig":
        """stable-diffusion-2-1: 768 px, v-prediction, attention scores in fp32."""
        return cls(upcast_attention=True, sample_size=96)

    @classmethod
    def sd15(cls) -> "UNetConfig":
        """stable-diffusion-v1-5: 512 px, epsilon; 8 heads everywhere, conv proj_in/out, 768-wide text."""
        return cls(heads=(SD1_HEADS,) * 4, cross_attention_dim=768, use_linear_projection=False)

    @classmethod
    def tiny(cls) -> "UNetConfig":
        """Same block types, linear projections, 64-channel heads and GEGLU as SD-2.1, and the same
        layer names (up_blocks.1.resnets.1, up_blocks.3.attentions.2, ...), at a fraction of the width."""
        return cls(block_out_channels=(64, 64, 128, 128), heads=(1, 1, 2, 2), cross_attention_dim=64, sample_size=8)

    @classmethod
    def tiny_sd15(cls) -> "UNetConfig":
        """SD-1.5's settings at the tiny widths: 8 heads at every level (8- and 16-wide), conv
        proj_in/proj_out, and a text context narrower than the UNet's first level (as 768 < 1280)."""
        return cls(block_out_channels=(64, 64, 128, 128), heads=(SD1_HEADS,) * 4, cross_attention_dim=48,
                   use_linear_projection=False, sample_size=8)

    @classmethod
    def from_diffusers_config(cls, d: dict) -> "UNetConfig":
        """From a diffusers unet/config.json (UNet2DConditionModel)."""
        down, up = list(d.get("down_block_types", [])), list(d.get("up_block_types", []))
        known_down = {"CrossAttnDownBlock2D", "DownBlock2D"}
        known_up = {"CrossAttnUpBlock2D", "UpBlock2D"}
        if not down or set(down) - known_down or set(up) - known_up:
            raise ValueError(f"unet config: unsupported block types {down} / {up} (SD-2.x uses {sorted(known_down)} / {sorted(known_up)})")
        levels = tuple(t == "CrossAttnDownBlock2D" for t in down)
        if tuple(t == "CrossAttnUpBlock2D" for t in reversed(up)) != levels:
            raise ValueError(f"unet config: up blocks {up} do not mirror down blocks {down}")
        for key, want in (("transformer_layers_per_block", 1), ("mid_block_type", "UNetMidBlock2DCrossAttn"),
                          ("class_embed_type", None), ("addition_embed_type", None), ("time_embedding_type", "positional")):
            got = d.get(key, want)
            if got != want and not (isinstance(got, list) and set(got) == {want}):
                raise ValueError(f"unet config: {key}={got!r} is not supported (SD-2.x: {want!r})")
        channels = tuple(d["block_out_channels"])
        # diffusers stores the HEAD COUNT under the historical name "attention_head_dim" (it reads
        # num_attention_heads = attention_head_dim when the first is absent): SD-1.5's 8 is 8 heads of
        # 40-160 channels, SD-2's [5, 10, 20, 20] is heads of 64. A newer config may say num_attention_heads.
        heads = d.get("num_attention_heads") or d.get("attention_head_dim", 8)
        heads = tuple(heads) if isinstance(heads, (list, tuple)) else (heads,) * len(channels)
        return cls(
            in_channels=d.get("in_channels", 4), out_channels=d.get("out_channels", 4),
            block_out_channels=channels, attention_levels=levels,
            layers_per_block=d.get("layers_per_block", 2), heads=heads,
            cross_attention_dim=d.get("cross_attention_dim", 1280),  # diffusers' own default
            use_linear_projection=bool(d.get("use_linear_projection", False)),  # absent in SD-1.5's config: conv
            norm_num_groups=d.get("norm_num_groups", 32), norm_eps=d.get("norm_eps", 1e-5),
            upcast_attention=bool(d.get("upcast_attention", False)), sample_size=d.get("sample_size", 64),
        )


# ----------------------------------------------------------------------------- building blocks


def group_norm(channels: int, cfg: UNetConfig, eps: float | None = None) -> nn.GroupNorm:
    return nn.GroupNorm(cfg.norm_num_groups, channels, eps=cfg.norm_eps if eps is None else eps)


class TimestepEmbedding(nn.Module):
    """Sinusoidal features of t (cos first, frequency shift 0) -> MLP, as SD-2.1 was trained."""

    def __init__(self, channels: int, dim: int):
        super().__init__()
        self.channels = channels
        self.linear_1 = nn.Linear(channels, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, t: Tensor, dtype: torch.dtype) -> Tensor:
        half = self.channels // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        angles = t.float()[:, None] * freqs[None, :]  # [B, half]
        features = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1).to(dtype)  # [B, channels]
        return self.linear_2(F.silu(self.linear_1(features)))


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv, + time embedding, GroupNorm-SiLU-conv, + (1x1-projected) input."""

    def __init__(self, cin: int, cout: int, temb: int, cfg: UNetConfig):
        super().__init__()
        self.path = ""  # set by UNet: e.g. "up_blocks.1.resnets.1" (what PnP names)
        self.norm1 = group_norm(cin, cfg)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb, cout)
        self.norm2 = group_norm(cout, cfg)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: Tensor, temb: Tensor, control: UNetControl | None) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        if control is not None:
            h = control.resnet_residual(self.path, h)  # PnP feature injection point
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class SelfAttention(nn.Module):
    """attn1: the frame's tokens attend to themselves. The place TokenFlow works (see control.py)."""

    def __init__(self, channels: int, heads: int, upcast: bool):
        super().__init__()
        self.path = ""  # set by UNet: e.g. "up_blocks.1.attentions.1.transformer_blocks.0.attn1"
        self.heads, self.upcast = heads, upcast
        self.to_q = nn.Linear(channels, channels, bias=False)
        self.to_k = nn.Linear(channels, channels, bias=False)
        self.to_v = nn.Linear(channels, channels, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # key "to_out.0" (diffusers kept a dropout at 1)

    def forward(self, x: Tensor, control: UNetControl | None = None) -> Tensor:
        if control is None:
            return self.plain(x)
        return control.self_attention(self, x)

    def plain(self, x: Tensor) -> Tensor:
        q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
        return self.to_out[0](attention(q, k, v, self.heads, upcast=self.upcast))


class CrossAttention(nn.Module):
    """attn2: image tokens attend to the 77 text tokens."""

    def __init__(self, channels: int, context_dim: int, heads: int, upcast: bool):
        super().__init__()
        self.heads, self.upcast = heads, upcast
        self.to_q = nn.Linear(channels, channels, bias=False)
        self.to_k = nn.Linear(context_dim, channels, bias=False)
        self.to_v = nn.Linear(context_dim, channels, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        return self.to_out[0](attention(q, k, v, self.heads, upcast=self.upcast))


class GEGLU(nn.Module):
    """Linear to 2x the inner width; one half gates the other through exact GELU."""

    def __init__(self, channels: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(channels, inner * 2)

    def forward(self, x: Tensor) -> Tensor:
        hidden, gate = self.proj(x).chunk(2, dim=-1)
        return hidden * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, channels: int, mult: int = 4):
        super().__init__()
        # keys ff.net.0.proj and ff.net.2 (index 1 was a dropout in the original)
        self.net = nn.ModuleList([GEGLU(channels, channels * mult), nn.Identity(), nn.Linear(channels * mult, channels)])
        # Tokens per chunk, counted over the whole batch (None: all at once). The GEGLU's
        # projection is 16x the width of its input ([B, 4096, 5120] per frame at 512 px): the
        # largest tensor of a big keyframe batch. Tokens are independent here, so chunking the
        # flattened batch changes memory, not results, and bounds it whatever the batch.
        self.chunk: int | None = None

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        if self.chunk is None or b * n <= self.chunk:
            return self.net[2](self.net[0](x))
        flat = x.reshape(b * n, c)  # [B, N, C] -> [B*N, C]: every token of every frame in one row
        return torch.cat([self.net[2](self.net[0](part)) for part in flat.split(self.chunk)]).reshape(b, n, c)


class TransformerBlock(nn.Module):
    """Pre-LN: self-attention, cross-attention to the text, GEGLU feed-forward, each residual."""

    def __init__(self, channels: int, context_dim: int, heads: int, upcast: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(channels)
        self.attn1 = SelfAttention(channels, heads, upcast)
        self.norm2 = nn.LayerNorm(channels)
        self.attn2 = CrossAttention(channels, context_dim, heads, upcast)
        self.norm3 = nn.LayerNorm(channels)
        self.ff = FeedForward(channels)

    def forward(self, x: Tensor, context: Tensor, control: UNetControl | None) -> Tensor:
        x = x + self.attn1(self.norm1(x), control)
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """GroupNorm, proj_in, feature map -> tokens, transformer block, tokens -> map, proj_out, + input.

    proj_in/proj_out are Linear on tokens (SD-2.x) or 1x1 convolutions on the map (SD-1.x): the
    same per-pixel matrix, applied on whichever side of the reshape the checkpoint's shapes ask for."""

    def __init__(self, channels: int, heads: int, cfg: UNetConfig):
        super().__init__()
        self.linear = cfg.use_linear_projection
        self.norm = group_norm(channels, cfg, eps=1e-6)  # 1e-6 here, unlike the resnets' 1e-5
        self.proj_in = nn.Linear(channels, channels) if self.linear else nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            [TransformerBlock(channels, cfg.cross_attention_dim, heads, cfg.upcast_attention)]
        )
        self.proj_out = nn.Linear(channels, channels) if self.linear else nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor, context: Tensor, control: UNetControl | None) -> Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        if not self.linear:
            y = self.proj_in(y)  # 1x1 conv on [B, C, H, W]
        tokens = y.permute(0, 2, 3, 1).reshape(b, h * w, c)  # [B, C, H, W] -> [B, H*W, C]
        if self.linear:
            tokens = self.proj_in(tokens)
        for block in self.transformer_blocks:
            tokens = block(tokens, context, control)
        if self.linear:
            return x + self.proj_out(tokens).reshape(b, h, w, c).permute(0, 3, 1, 2)  # back to [B, C, H, W]
        return x + self.proj_out(tokens.reshape(b, h, w, c).permute(0, 3, 1, 2))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        # to the skip connection's size, so odd latent sizes still line up
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class DownLevel(nn.Module):
    """down_blocks.i: resnets (+ attentions), then a stride-2 conv except at the last level."""

    def __init__(self, cin, cout, temb, heads, with_attention, with_downsample, cfg):
        super().__init__()
        n = cfg.layers_per_block
        self.resnets = nn.ModuleList([ResnetBlock(cin if j == 0 else cout, cout, temb, cfg) for j in range(n)])
        self.attentions = nn.ModuleList([SpatialTransformer(cout, heads, cfg) for _ in range(n)]) if with_attention else None
        self.downsamplers = nn.ModuleList([Downsample(cout)]) if with_downsample else None

    def forward(self, x, temb, context, control) -> tuple[Tensor, list[Tensor]]:
        skips = []
        for j, resnet in enumerate(self.resnets):
            x = resnet(x, temb, control)
            if self.attentions is not None:
                x = self.attentions[j](x, context, control)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class MidLevel(nn.Module):
    def __init__(self, channels, temb, heads, cfg):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, temb, cfg) for _ in range(2)])
        self.attentions = nn.ModuleList([SpatialTransformer(channels, heads, cfg)])

    def forward(self, x, temb, context, control) -> Tensor:
        x = self.resnets[0](x, temb, control)
        x = self.attentions[0](x, context, control)
        return self.resnets[1](x, temb, control)


class UpLevel(nn.Module):
    """up_blocks.i: (layers_per_block + 1) resnets, each fed one skip connection concatenated on
    channels (+ attentions), then a x2 upsample except at the last level."""

    def __init__(self, cin_prev, cout, skip_channels: list[int], temb, heads, with_attention, with_upsample, cfg):
        super().__init__()
        ins = [cin_prev] + [cout] * (len(skip_channels) - 1)
        self.resnets = nn.ModuleList([ResnetBlock(i + s, cout, temb, cfg) for i, s in zip(ins, skip_channels)])
        self.attentions = (
            nn.ModuleList([SpatialTransformer(cout, heads, cfg) for _ in skip_channels]) if with_attention else None
        )
        self.upsamplers = nn.ModuleList([Upsample(cout)]) if with_upsample else None

    def forward(self, x, skips: list[Tensor], temb, context, control, upsample_to) -> Tensor:
        for j, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips.pop()], dim=1), temb, control)
            if self.attentions is not None:
                x = self.attentions[j](x, context, control)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_to)
        return x


# ----------------------------------------------------------------------------- the encoder, shared


def down_levels(cfg: UNetConfig, temb: int) -> nn.ModuleList:
    """`down_blocks`: the encoder's levels, as the UNet and a ControlNet (its trainable copy) both build them."""
    ch, n_levels = cfg.block_out_channels, len(cfg.block_out_channels)
    return nn.ModuleList(
        DownLevel(ch[max(i - 1, 0)], ch[i], temb, cfg.heads[i], cfg.attention_levels[i], i < n_levels - 1, cfg)
        for i in range(n_levels)
    )


def encoder_skip_channels(cfg: UNetConfig) -> list[int]:
    """Channel count of every skip connection, in the order the encoder pushes them: conv_in's
    output, then per level `layers_per_block` resnet(+attention) outputs and, except at the last
    level, the downsample's (SD: 320 x3, 640 x3, 1280 x3, 1280 x3: 12 skips)."""
    ch = cfg.block_out_channels
    skips = [ch[0]]
    for i, c in enumerate(ch):
        skips += [c] * cfg.layers_per_block + ([c] if i < len(ch) - 1 else [])
    return skips


def check_inputs(cfg: UNetConfig, x: Tensor, t: Tensor | int | float, context: Tensor, who: str = "unet") -> Tensor:
    """x [B, in_channels, h, w] and context [B, tokens, cross_attention_dim] checked; t as [B]."""
    if x.ndim != 4 or x.shape[1] != cfg.in_channels:
        raise ValueError(f"{who}: x must be [B, {cfg.in_channels}, h, w], got {tuple(x.shape)}")
    if context.ndim != 3 or context.shape[0] != x.shape[0] or context.shape[2] != cfg.cross_attention_dim:
        raise ValueError(
            f"{who}: context must be [{x.shape[0]}, tokens, {cfg.cross_attention_dim}], got {tuple(context.shape)}"
        )
    t = torch.as_tensor(t, device=x.device)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"{who}: t must be a scalar or [{x.shape[0]}], got shape {tuple(t.shape)}")
    return t


# ----------------------------------------------------------------------------- the network


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        ch = cfg.block_out_channels
        n_levels = len(ch)
        temb = ch[0] * cfg.time_embed_dim_mult
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], temb)

        self.down_blocks = down_levels(cfg, temb)
        skip_channels = encoder_skip_channels(cfg)
        self.mid_block = MidLevel(ch[-1], temb, cfg.heads[-1], cfg)

        self.up_blocks = nn.ModuleList()
        prev = ch[-1]
        for i in range(n_levels):
            level = n_levels - 1 - i  # up_blocks.0 mirrors the deepest down level
            mine = [skip_channels.pop() for _ in range(cfg.layers_per_block + 1)]
            self.up_blocks.append(
                UpLevel(prev, ch[level], mine, temb, cfg.heads[level], cfg.attention_levels[level], level != 0, cfg)
            )
            prev = ch[level]

        self.conv_norm_out = group_norm(ch[0], cfg)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

        # Every self-attention and resnet knows its diffusers path, which is what controls match on.
        for name, module in self.named_modules():
            if isinstance(module, (SelfAttention, ResnetBlock)):
                module.path = name

    def set_feed_forward_chunk(self, tokens: int | None) -> None:
        """Run every feed-forward over at most `tokens` tokens at a time (memory, not results)."""
        if tokens is not None and tokens < 1:
            raise ValueError(f"feed-forward chunk must be >= 1 token or None, got {tokens}")
        for module in self.modules():
            if isinstance(module, FeedForward):
                module.chunk = tokens

    def forward(
        self, x: Tensor, t: Tensor | int | float, context: Tensor, control: UNetControl | None = None,
        residuals: ControlResiduals | None = None,
    ) -> Tensor:
        """x: noisy latents [B, 4, h, w]; t: a scalar or one timestep per sample; context: text
        embeddings [B, 77, cross_attention_dim]; residuals: a ControlNet's output for this x (added
        to the skip connections and the mid block's output; None: plain SD). Returns the model
        output (eps or v) shaped like x."""
        t = check_inputs(self.config, x, t, context)
        temb = self.time_embedding(t, x.dtype)
        h = self.conv_in(x)
        skips = [h]
        for block in self.down_blocks:
            h, pushed = block(h, temb, context, control)
            skips += pushed
        h = self.mid_block(h, temb, context, control)
        if residuals is not None:  # where the ControlNet paper adds its zero convolutions' outputs
            skips, h = self._add_residuals(skips, h, residuals)
        for block in self.up_blocks:
            n = len(block.resnets)
            mine, skips = skips[-n:], skips[:-n]
            # the next up level's skips set the size to upsample to (clean for multiples of 64 px)
            h = block(h, mine, temb, context, control, skips[-1].shape[-2:] if skips else None)
        return self.conv_out(F.silu(self.conv_norm_out(h)))

    @staticmethod
    def _add_residuals(skips: list[Tensor], mid: Tensor, residuals: ControlResiduals) -> tuple[list[Tensor], Tensor]:
        """skip_i + down_i for every skip connection, mid + mid residual; shapes must agree exactly."""
        if len(residuals.down) != len(skips):
            raise ValueError(f"unet: {len(residuals.down)} control residuals for {len(skips)} skip connections")
        for i, (s, r) in enumerate(zip(skips, residuals.down)):
            if r.shape != s.shape:
                raise ValueError(f"unet: control residual {i} is {tuple(r.shape)}, its skip connection {tuple(s.shape)}")
        if residuals.mid.shape != mid.shape:
            raise ValueError(f"unet: mid control residual is {tuple(residuals.mid.shape)}, the mid block's output {tuple(mid.shape)}")
        return [s + r for s, r in zip(skips, residuals.down)], mid + residuals.mid
