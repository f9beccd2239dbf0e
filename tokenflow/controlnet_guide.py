"""ControlNet in TokenFlow's loop: the residuals of given frames at a given step, for the edited branches.

Every edit forward stacks three branches over the same F frames (controls.py):
[ source (the original video's x_t, inversion prompt) | unconditional | conditional ]. The ControlNet
runs on the two edited branches only, with their latents, their prompts (negative, target) and each
frame's own control image, as diffusers runs it on both halves of classifier-free guidance; the source
branch gets zero residuals. Why: the source branch is the inverted original video, whose features feed
the NN fields (Eq. 5) and PnP's injection; with control residuals it would no longer be the video that
the inversion (run without ControlNet) describes. Zeros add nothing (x + 0 == x), so that branch is
bit for bit what it is without ControlNet.

The keyframe pass and each propagation batch ask for their own frames: a frame is always steered by its
own control image, whichever pass computes it. The window (controlnet.guidance_start/end, fractions of
the steps run) follows diffusers' rule: step i of N is guided unless i/N < start or (i+1)/N > end.
Cost: one ControlNet forward (the UNet's encoder half and mid block, plus the conditioning embedding)
over 2F images per UNet forward of F frames, on every guided step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from unet.control import ControlResiduals
from unet.controlnet import ControlNet


@dataclass
class ControlNetGuide:
    """The run's ControlNet input: the model, one control image per frame, the scale and the window."""

    model: ControlNet
    # [n, 3, H, W] in [0, 1], one per frame of the clip (H, W: 8x the latents'); may stay in host memory:
    # each forward copies its own frames' to the model's device
    conditions: Tensor
    scale: float = 1.0  # conditioning scale: every residual is multiplied by it
    start: float = 0.0  # guided steps: fractions of the steps run, diffusers' control_guidance_start/end
    end: float = 1.0
    chunk: int | None = None  # frames per ControlNet forward (memory only: a frame's residuals are its own); None: all

    def __post_init__(self):
        if self.conditions.ndim != 4 or self.conditions.shape[1] != 3:
            raise ValueError(f"ControlNetGuide: conditions must be [n, 3, H, W], got {tuple(self.conditions.shape)}")

    def active(self, step: int, n_steps: int) -> bool:
        """Whether step `step` (0-based) of `n_steps` is guided (diffusers' controlnet_keep is 1)."""
        return not (step / n_steps < self.start or (step + 1) / n_steps > self.end)

    def residuals(self, frames: list[int], latents: Tensor, t: int, negative: Tensor, target: Tensor) -> ControlResiduals:
        """Residuals for one edit forward over `frames` [F], its edited latents [F, 4, h, w] and the two
        edited branches' prompt embeddings [1, 77, D] -> ControlResiduals of batch 3F, the source third zero.
        The ControlNet runs `chunk` frames (2 x chunk images) at a time; each chunk's residuals are written
        into their rows of the full batch, so only one chunk's activations are alive at once."""
        f = len(frames)
        dtype = self.model.conv_in.weight.dtype
        step = f if self.chunk is None else self.chunk
        out: list[Tensor] = []  # the 12 skip residuals and the mid one, each [3F, C, h, w]
        for lo in range(0, f, step):
            hi = min(lo + step, f)
            c = hi - lo
            x = torch.cat([latents[lo:hi], latents[lo:hi]]).to(dtype)  # [2c, 4, h, w]: unconditional | conditional
            context = torch.cat([negative.expand(c, -1, -1), target.expand(c, -1, -1)]).to(dtype)
            cond = self.conditions[frames[lo:hi]].to(x.device, dtype)  # [c, 3, H, W]
            r = self.model(x, t, context, torch.cat([cond, cond]), self.scale)
            parts = [*r.down, r.mid]
            if not out:  # zeros everywhere first: the source branch's rows stay zero
                out = [p.new_zeros((3 * f, *p.shape[1:])) for p in parts]
            for full, part in zip(out, parts):
                full[f + lo: f + hi] = part[:c]  # unconditional rows of these frames
                full[2 * f + lo: 2 * f + hi] = part[c:]  # conditional rows
        return ControlResiduals(down=out[:-1], mid=out[-1])
