"""The seam between the UNet and an editing algorithm: an explicit object passed down the call.

`unet(x, t, context, control=c)` hands `c` to every self-attention and every resnet of the network.
Where diffusers would register hooks or swap processors, a TokenFlow/PnP control object receives the
call itself and decides, in plain code, what happens (see tokenflow/controls.py):

- `self_attention(attn, x)`: called instead of `attn.plain(x)` with the module (its projections,
  head count, `path` such as "up_blocks.1.attentions.1.transformer_blocks.0.attn1") and its
  normalised input tokens x [B, N, C]. A control can record x (NN-field features), replace q/k
  (PnP), attend across frames (extended attention via `attention(..., joint_frames=F)`) or return
  propagated tokens without attending at all (TokenFlow, Eq. 6).
- `resnet_residual(path, h)`: the residual branch of a resnet block (after conv2, before the skip
  is added), e.g. "up_blocks.1.resnets.1"; PnP injects the source's features here.

The base class is plain Stable Diffusion: passing `UNetControl()` gives the same numbers as None.

A ControlNet's output travels the other way, as data: `unet(x, t, context, residuals=r)` with
`r = controlnet(x, t, context, cond, scale)`, a `ControlResiduals` (see unet/controlnet.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    from .model import SelfAttention


class UNetControl:
    def self_attention(self, attn: "SelfAttention", x: Tensor) -> Tensor:
        return attn.plain(x)

    def resnet_residual(self, path: str, h: Tensor) -> Tensor:
        return h


@dataclass
class ControlResiduals:
    """What a ControlNet adds to the UNet, already multiplied by the conditioning scale.

    down: one tensor per skip connection of the UNet's encoder, in the order the UNet pushes them
    (conv_in's output first, then each down level's resnets/attentions and its downsample): 12 for
    SD, shapes [B, C_i, h_i, w_i] equal to the skips'. mid: [B, C_last, h/8, w/8], added to the mid
    block's output. The UNet adds down[i] to skip i before the decoder reads it.
    """

    down: list[Tensor]
    mid: Tensor

