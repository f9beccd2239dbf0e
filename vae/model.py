"""The Stable Diffusion VAE (AutoencoderKL), in one file.

Images in [-1, 1] <-> latents at 1/8 of the size. `encode` returns the posterior's mean and
log-variance and `decode` takes latents, both UNSCALED: the diffusion model works on latents
multiplied by `config.scaling_factor` (0.18215), applied by `scale_latents` / `unscale_latents`
and nowhere else.

Attribute names follow diffusers' AutoencoderKL keys; ldm files are renamed first (vae/keys.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LATENT_SCALE = 0.18215  # SD-1/2's latent scale: makes the latents roughly unit variance


@dataclass
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2  # encoder; the decoder has one more per level
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    scaling_factor: float = LATENT_SCALE
    sample_size: int = 512  # image size the checkpoint was trained at; informational, any multiple of 8 works

    def __post_init__(self):
        self.block_out_channels = tuple(self.block_out_channels)
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(f"VAEConfig: channels {self.block_out_channels} must divide into {self.norm_num_groups} groups")

    @classmethod
    def sd21(cls) -> "VAEConfig":
        return cls()

    @classmethod
    def tiny(cls) -> "VAEConfig":
        """Same structure (3 downsamplings, so 8x), narrow: for tests and the tiny model."""
        return cls(block_out_channels=(32, 32, 64, 64), layers_per_block=1)

    @classmethod
    def from_diffusers_config(cls, d: dict) -> "VAEConfig":
        """From a diffusers vae/config.json (AutoencoderKL)."""
        down, up = set(d.get("down_block_types", [])), set(d.get("up_block_types", []))
        if down - {"DownEncoderBlock2D"} or up - {"UpDecoderBlock2D"}:
            raise ValueError(f"vae config: unsupported block types {sorted(down)} / {sorted(up)} (SD uses DownEncoderBlock2D / UpDecoderBlock2D)")
        for flag in ("mid_block_add_attention", "use_quant_conv", "use_post_quant_conv"):
            if d.get(flag, True) is not True:
                raise ValueError(f"vae config: {flag}={d[flag]!r} is not supported (SD's VAE has it true)")
        if d.get("act_fn", "silu") != "silu":
            raise ValueError(f"vae config: act_fn={d['act_fn']!r} is not supported (SD's VAE uses silu)")
        for extra in ("shift_factor", "latents_mean", "latents_std"):
            # later VAEs (SD3, Flux, SDXL pipelines) normalise latents differently: one scale factor is all we apply
            if d.get(extra) is not None:
                raise ValueError(f"vae config: {extra}={d[extra]!r} is not supported (SD-2.1 uses scaling_factor alone)")
        return cls(
            in_channels=d.get("in_channels", 3), out_channels=d.get("out_channels", 3),
            latent_channels=d.get("latent_channels", 4), block_out_channels=tuple(d.get("block_out_channels", (64,))),
            layers_per_block=d.get("layers_per_block", 1), norm_num_groups=d.get("norm_num_groups", 32),
            scaling_factor=d.get("scaling_factor", LATENT_SCALE), sample_size=d.get("sample_size", 512),
        )

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor], *, source: str = "VAE state dict") -> "VAEConfig":
        """The architecture a (diffusers-named) VAE state dict describes; ldm files carry no config.
        Group count 32 as in every SD VAE. `source` names the file in errors: a state dict lacking
        what the inference reads gives a ValueError naming it, never a bare KeyError or max() error."""

        def shape(key: str) -> tuple[int, ...]:
            if key not in state:  # ldm keys were renamed before this (vae/keys.py): the message says so
                raise ValueError(
                    f"{source}: no {key!r} (diffusers name; an ldm file's keys are renamed first); not a complete SD VAE"
                )
            return tuple(state[key].shape)

        levels = 1 + max((int(k.split(".")[2]) for k in state if k.startswith("encoder.down_blocks.")), default=-1)
        if levels == 0:
            raise ValueError(
                f"{source}: no encoder levels (ldm encoder.down.N.*, diffusers encoder.down_blocks.N.*); not an SD VAE"
            )
        channels = tuple(shape(f"encoder.down_blocks.{i}.resnets.0.conv1.weight")[0] for i in range(levels))
        per = 1 + max(int(k.split(".")[4]) for k in state if k.startswith("encoder.down_blocks.0.resnets."))
        return cls(
            in_channels=shape("encoder.conv_in.weight")[1], out_channels=shape("decoder.conv_out.weight")[0],
            latent_channels=shape("post_quant_conv.weight")[0], block_out_channels=channels, layers_per_block=per,
        )


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, cfg: VAEConfig):
        super().__init__()
        self.norm1 = nn.GroupNorm(cfg.norm_num_groups, cin, eps=cfg.norm_eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(cfg.norm_num_groups, cout, eps=cfg.norm_eps)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class MidAttention(nn.Module):
    """Single-head self-attention over all positions of the deepest feature map."""

    def __init__(self, channels: int, cfg: VAEConfig):
        super().__init__()
        self.group_norm = nn.GroupNorm(cfg.norm_num_groups, channels, eps=cfg.norm_eps)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        tokens = self.group_norm(x).reshape(b, c, h * w).transpose(1, 2)  # [B, C, H, W] -> [B, HW, C]
        q, k, v = (proj(tokens)[:, None] for proj in (self.to_q, self.to_k, self.to_v))  # [B, 1, HW, C]: one head
        out = self.to_out[0](F.scaled_dot_product_attention(q, k, v)[:, 0])
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class MidBlock(nn.Module):
    def __init__(self, channels: int, cfg: VAEConfig):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, cfg) for _ in range(2)])
        self.attentions = nn.ModuleList([MidAttention(channels, cfg)])

    def forward(self, x: Tensor) -> Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        # pad right and bottom only, then a stride-2 conv without padding: how the checkpoint was trained
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """down_blocks.i / up_blocks.i: resnets, then an optional stride-2 downsampler or x2 upsampler."""

    def __init__(self, cin: int, cout: int, n: int, cfg: VAEConfig, resample: str | None):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(cin if j == 0 else cout, cout, cfg) for j in range(n)])
        self.resample = resample
        if resample == "down":
            self.downsamplers = nn.ModuleList([Downsample(cout)])
        elif resample == "up":
            self.upsamplers = nn.ModuleList([Upsample(cout)])

    def forward(self, x: Tensor) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.resample == "down":
            x = self.downsamplers[0](x)
        elif self.resample == "up":
            x = self.upsamplers[0](x)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch = cfg.block_out_channels
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            [Level(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, cfg, "down" if i < len(ch) - 1 else None) for i in range(len(ch))]
        )
        self.mid_block = MidBlock(ch[-1], cfg)
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, ch[-1], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)  # mean and log-variance

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)
        for level in self.down_blocks:
            x = level(x)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch = tuple(reversed(cfg.block_out_channels))
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], cfg)
        self.up_blocks = nn.ModuleList(
            [Level(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, cfg, "up" if i < len(ch) - 1 else None) for i in range(len(ch))]
        )
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, ch[-1], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        x = self.mid_block(self.conv_in(z))
        for level in self.up_blocks:
            x = level(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class VAE(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config.block_out_channels) - 1)

    def encode(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """images [B, 3, H, W] in [-1, 1] -> (mean, logvar), each [B, 4, H/8, W/8], unscaled."""
        f = self.downsample_factor
        if images.ndim != 4 or images.shape[1] != self.config.in_channels or images.shape[2] % f or images.shape[3] % f:
            raise ValueError(
                f"vae.encode: images must be [B, {self.config.in_channels}, H, W] with H and W multiples of {f}, got {tuple(images.shape)}"
            )
        mean, logvar = self.quant_conv(self.encoder(images)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)  # the reference clamps before exp() for stability

    def decode(self, latents: Tensor, *, batch_size: int | None = None) -> Tensor:
        """latents [B, 4, h, w], unscaled -> images [B, 3, 8h, 8w], roughly in [-1, 1].

        batch_size: decode that many latents at a time (the decoder's full-resolution activations,
        not the weights, dominate memory); None decodes all at once."""
        if latents.ndim != 4 or latents.shape[1] != self.config.latent_channels:
            raise ValueError(f"vae.decode: latents must be [B, {self.config.latent_channels}, h, w], got {tuple(latents.shape)}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"vae.decode: batch_size must be a positive integer or None, got {batch_size!r}")
        step = batch_size or max(latents.shape[0], 1)
        return torch.cat([self.decoder(self.post_quant_conv(chunk)) for chunk in latents.split(step)])

    def scale_latents(self, latents: Tensor) -> Tensor:
        """VAE latents -> the diffusion model's latents (x 0.18215)."""
        return latents * self.config.scaling_factor

    def unscale_latents(self, latents: Tensor) -> Tensor:
        """The diffusion model's latents -> VAE latents (/ 0.18215)."""
        return latents / self.config.scaling_factor
