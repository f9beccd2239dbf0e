"""The original video's self-attention tokens at one layer and one sampling step, captured with an
explicit control (no hooks): what the NN-field figure (paper Fig. 3) matches and the feature PCA
(Fig. 2) colours."""

from __future__ import annotations

import torch
from torch import Tensor

from unet.control import UNetControl

from ..source import SourceVideo

HIGHEST_RES_DECODER_LAYER = "up_blocks.3.attentions.2.transformer_blocks.0.attn1"


class TokenRecorder(UNetControl):
    """Plain Stable Diffusion, keeping the self-attention input/output tokens [B, N, C] of `layer`."""

    def __init__(self, layer: str):
        self.layer = layer
        self.inputs: Tensor | None = None
        self.outputs: Tensor | None = None

    def self_attention(self, attn, x: Tensor) -> Tensor:
        out = attn.plain(x)
        if attn.path == self.layer:
            self.inputs, self.outputs = x.detach().float().cpu(), out.detach().float().cpu()
        return out


def check_layer(unet, layer: str) -> None:
    paths = [m.path for m in unet.modules() if type(m).__name__ == "SelfAttention"]
    if layer not in paths:
        raise ValueError(f"layer {layer!r} is not a self-attention of this UNet; choose one of: {', '.join(paths)}")


def token_grid(n_tokens: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """The (rows, cols) of a layer's token map: the latent grid downsampled by a power of two."""
    h, w = latent_hw
    factor = 1
    while (h // factor) * (w // factor) > n_tokens and factor <= max(h, w):
        factor *= 2
    gh, gw = -(-h // factor), -(-w // factor)  # ceil: the UNet's downsampling pads odd sizes
    if gh * gw != n_tokens:
        raise ValueError(f"{n_tokens} tokens are not a power-of-two downsampling of the {h}x{w} latent grid")
    return gh, gw


def default_step(n_steps: int) -> int:
    """A fifth of the way into sampling (step 10 of 50): structure is set, detail still forming."""
    return n_steps // 5


def check_step(step: int, n_steps: int) -> None:
    if not 0 <= step < n_steps:
        raise ValueError(f"step {step} is outside the {n_steps} denoising steps of this run (0..{n_steps - 1})")


def original_tokens(src: SourceVideo, positions: list[int], step: int, layer: str) -> tuple[Tensor, Tensor]:
    """Self-attention (inputs, outputs) [F, N, C] of the ORIGINAL video at sampling step `step`:
    the inverted latents x_t fed with the inversion prompt, as the edit's source branch sees them."""
    check_step(step, len(src.timesteps))
    check_layer(src.models.unet, layer)
    t = src.timesteps[step]
    x = src.source_latents[t][positions].to(src.device, src.dtype)  # float32 DDIM state -> the UNet's dtype
    recorder = TokenRecorder(layer)
    with torch.no_grad():
        src.models.unet(x, t, src.prompts.source.expand(len(positions), -1, -1).to(x.dtype), recorder)
    return recorder.inputs, recorder.outputs
