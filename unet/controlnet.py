"""ControlNet (Zhang, Rao & Agrawala, ICCV 2023) for the UNet of model.py, in one file.

A trainable copy of the UNet's encoder half (conv_in, time embedding, down levels, mid level: the
same block classes and configuration as the UNet it conditions, with weights of its own), plus:

- `controlnet_cond_embedding`: the condition image (an edge, depth or pose map at the image's
  resolution, 8x the latents') down to the latent grid: conv 3->16, then six 3x3 convs
  16->16, 16->32 (stride 2), 32->32, 32->96 (stride 2), 96->96, 96->256 (stride 2), SiLU after each,
  and a zero-initialised conv 256->C0 (C0 = the first level's channels, 320 for SD), whose output is
  added to the sample after conv_in;
- the zero convolutions: one 1x1 conv per skip connection of the encoder (`controlnet_down_blocks.i`,
  12 for SD) and one after the mid block (`controlnet_mid_block`), zero-initialised so that an
  untrained ControlNet adds nothing: the paper's Eq. 2, y_c = F(x) + Z(F_copy(x + Z(c))), where
  F is the frozen UNet, F_copy the trainable encoder copy and Z a zero convolution.

The outputs, multiplied by the conditioning scale, are a `ControlResiduals` the UNet adds to its skip
connections and to its mid block's output: `unet(x, t, context, residuals=controlnet(x, t, context, cond))`.

Attribute names follow the diffusers checkpoint keys (`controlnet_cond_embedding.blocks.3.weight`,
`controlnet_down_blocks.11.bias`, `down_blocks.1.attentions.0....`), so a diffusers state dict fills
it by name, strictly; original single files are renamed first (unet/controlnet_keys.py).

The ControlNet runs plain: no editing control reaches its attention layers (the edit's control object
steers the UNet only), so each frame's residuals depend on that frame's latents and condition alone.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .control import ControlResiduals
from .model import MidLevel, TimestepEmbedding, UNetConfig, check_inputs, down_levels, encoder_skip_channels

# The conditioning embedding's widths in every published SD ControlNet (diffusers'
# conditioning_embedding_out_channels); its last conv maps the last width to the UNet's first level.
EMBEDDING_CHANNELS = (16, 32, 96, 256)
CONDITION_DOWNSCALE = 8  # three stride-2 convs: the condition image is 8x the latent grid, as the VAE's


def zero_conv(cin: int, cout: int, kernel: int = 1) -> nn.Conv2d:
    """A conv whose weight and bias start at zero: its layer adds nothing until trained."""
    conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class ConditioningEmbedding(nn.Module):
    """[B, cond_channels, 8h, 8w] condition image -> [B, C0, h, w], added to conv_in's output."""

    def __init__(self, cond_channels: int, out_channels: int, widths: tuple[int, ...] = EMBEDDING_CHANNELS):
        super().__init__()
        self.conv_in = nn.Conv2d(cond_channels, widths[0], 3, padding=1)
        blocks = []
        for cin, cout in zip(widths[:-1], widths[1:]):  # per width: a 3x3 conv at it, then stride 2 to the next
            blocks += [nn.Conv2d(cin, cin, 3, padding=1), nn.Conv2d(cin, cout, 3, padding=1, stride=2)]
        self.blocks = nn.ModuleList(blocks)  # keys blocks.0 ... blocks.5
        self.conv_out = zero_conv(widths[-1], out_channels, 3)

    def forward(self, cond: Tensor) -> Tensor:
        h = F.silu(self.conv_in(cond))
        for conv in self.blocks:
            h = F.silu(conv(h))
        return self.conv_out(h)


class ControlNet(nn.Module):
    def __init__(self, cfg: UNetConfig, conditioning_channels: int = 3,
                 embedding_channels: tuple[int, ...] = EMBEDDING_CHANNELS):
        """`cfg`: the configuration of the UNet it conditions (the encoder is built exactly as the
        UNet's); `conditioning_channels`: the condition image's channels (3 for every SD ControlNet)."""
        super().__init__()
        self.config = cfg
        self.conditioning_channels = conditioning_channels
        ch = cfg.block_out_channels
        temb = ch[0] * cfg.time_embed_dim_mult
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], temb)
        self.controlnet_cond_embedding = ConditioningEmbedding(conditioning_channels, ch[0], tuple(embedding_channels))
        self.down_blocks = down_levels(cfg, temb)
        self.mid_block = MidLevel(ch[-1], temb, cfg.heads[-1], cfg)
        self.controlnet_down_blocks = nn.ModuleList(zero_conv(c, c) for c in encoder_skip_channels(cfg))
        self.controlnet_mid_block = zero_conv(ch[-1], ch[-1])

    def forward(self, x: Tensor, t: Tensor | int | float, context: Tensor, cond: Tensor,
                scale: float = 1.0) -> ControlResiduals:
        """x: noisy latents [B, 4, h, w]; t: a scalar or [B]; context: [B, tokens, cross_attention_dim];
        cond: the condition images [B, conditioning_channels, 8h, 8w] in [0, 1]; scale: the
        conditioning scale the residuals are multiplied by. Returns residuals for the UNet's skips
        (shapes of its skip connections) and its mid block ([B, C_last, h/8, w/8] for SD)."""
        t = check_inputs(self.config, x, t, context, who="controlnet")
        b, _, h, w = x.shape
        want = (b, self.conditioning_channels, h * CONDITION_DOWNSCALE, w * CONDITION_DOWNSCALE)
        if tuple(cond.shape) != want:
            raise ValueError(f"controlnet: cond must be {list(want)} (8x the latents {h}x{w}), got {list(cond.shape)}")
        temb = self.time_embedding(t, x.dtype)
        sample = self.conv_in(x) + self.controlnet_cond_embedding(cond.to(x.dtype))  # [B, C0, h, w]
        skips = [sample]
        for block in self.down_blocks:
            sample, pushed = block(sample, temb, context, None)
            skips += pushed
        sample = self.mid_block(sample, temb, context, None)  # [B, C_last, h/8, w/8]
        down = [zero(s) * scale for zero, s in zip(self.controlnet_down_blocks, skips)]
        return ControlResiduals(down, self.controlnet_mid_block(sample) * scale)


def config_from_diffusers(d: dict) -> tuple[UNetConfig, int, tuple[int, ...]]:
    """(encoder config, conditioning channels, embedding widths) from a diffusers ControlNetModel's
    config.json. Its encoder keys are a UNet2DConditionModel's (without the up blocks, which a
    ControlNet has none of); the settings that change its outputs' meaning are checked."""
    name = d.get("_class_name", "ControlNetModel")
    if name != "ControlNetModel":
        raise ValueError(f"controlnet config: _class_name {name!r} is not a ControlNetModel")
    for key, want in (("controlnet_conditioning_channel_order", "rgb"), ("global_pool_conditions", False)):
        if d.get(key, want) != want:
            raise ValueError(f"controlnet config: {key}={d[key]!r} is not supported (SD ControlNets: {want!r})")
    down = list(d.get("down_block_types", []))
    up = ["CrossAttnUpBlock2D" if t == "CrossAttnDownBlock2D" else "UpBlock2D" for t in reversed(down)]
    cfg = UNetConfig.from_diffusers_config({**d, "up_block_types": up})  # the encoder's settings, read as the UNet's
    widths = tuple(d.get("conditioning_embedding_out_channels", EMBEDDING_CHANNELS))
    return cfg, int(d.get("conditioning_channels", 3)), widths
