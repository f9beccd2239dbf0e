"""What TokenFlow does inside the UNet, as one explicit object handed to `unet(..., control=...)`.

Batch layout of every edit forward: three branches stacked branch-major, each over the same F frames,

    [ source (original latents x_t, inversion prompt) | unconditional (J_t, negative prompt) | conditional (J_t, target prompt) ]

The source branch is the original video at the same step: it supplies the NN-field features
(self-attention inputs, Eq. 5) and, for PnP, the q/k and residual features injected into the two
edited branches. Its own self-attention is always the ordinary per-frame one.

One `EditControl` serves every pass of the algorithm:
- keyframe pass (Alg. 1 line 3-4): edited branches attend jointly across the keyframes
  (`joint_frames=F`, Eq. 3-4), and the pass records T_base (edited outputs) and the source inputs;
- propagation pass (Alg. 1 line 5): edited branches do not attend at all; their self-attention
  output is Eq. 6 applied to the recorded keyframe tokens. Under the released code's rule
  (`tokenflow.propagation=released`) the source branch is propagated the same way from its own
  recorded keyframe outputs, instead of attending;
- per-frame pass (`joint_frames=1`) and all-frames extended attention (`joint_frames=F`, no record).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from unet.attention import attention
from unet.control import UNetControl
from unet.model import SelfAttention

from .propagation import Neighbours, blend, nn_fields

BRANCHES = 3  # source, unconditional, conditional


@dataclass
class PnPInjection:
    """PnP-Diffusion (Tumanyan et al.) for the current step: which layers take the source's values.

    qk_layers: self-attention modules (diffusers paths of the SpatialTransformer, e.g.
        "up_blocks.1.attentions.1") whose queries and keys are replaced by the source's;
    feature_layers: resnets (e.g. "up_blocks.1.resnets.1") whose residual features are replaced.
    Both empty: no injection (SDEdit, or PnP past its injection thresholds).
    """

    qk_layers: tuple[str, ...] = ()
    feature_layers: tuple[str, ...] = ()

    def injects_qk(self, attn_path: str) -> bool:
        return any(attn_path.startswith(layer + ".") for layer in self.qk_layers)


def inject_source(t: Tensor, frames: int) -> Tensor:
    """[3F, ...] -> the same with the unconditional and conditional thirds replaced by the source third."""
    source = t[:frames]
    return torch.cat([source, source, source])


@dataclass
class KeyframeTokens:
    """What the keyframe pass records at every self-attention layer (by module path)."""

    keyframes: list[int]
    record_source_outputs: bool = False  # the released rule propagates the source branch too
    source_inputs: dict[str, Tensor] = field(default_factory=dict)  # path -> [K, N, C]   phi(x^k)
    edited_outputs: dict[str, Tensor] = field(default_factory=dict)  # path -> [2, K, N, C] T_base
    source_outputs: dict[str, Tensor] = field(default_factory=dict)  # path -> [K, N, C] (released rule only)


@dataclass
class Propagation:
    """Propagation pass for a batch of frames: the recorded keyframe tokens and each frame's neighbours."""

    tokens: KeyframeTokens
    neighbours: Neighbours  # for the frames of this batch, in batch order
    propagate_source: bool = False  # released rule: the source branch's output is propagated too

    def __post_init__(self):
        if self.propagate_source and not self.tokens.record_source_outputs:
            raise ValueError("Propagation: propagate_source needs a keyframe pass that recorded the source outputs")


class EditControl(UNetControl):
    def __init__(
        self, frames: int, *, pnp: PnPInjection = PnPInjection(), joint_frames: int = 1,
        record: KeyframeTokens | None = None, propagation: Propagation | None = None, query_chunk: int | None = None,
    ):
        if propagation is not None and (record is not None or joint_frames != 1):
            raise ValueError("EditControl: a propagation pass neither records nor attends jointly")
        self.frames = frames  # F, frames per branch
        self.pnp = pnp
        self.joint_frames = joint_frames
        self.record = record
        self.propagation = propagation
        self.query_chunk = query_chunk

    def self_attention(self, attn: SelfAttention, x: Tensor) -> Tensor:
        f = self.frames
        b, n, c = x.shape
        if b != BRANCHES * f:
            raise ValueError(f"EditControl: batch {b} is not 3 branches x {f} frames")
        source_x = x[:f]  # [F, N, C] the original video's self-attention inputs: phi(x_t^i)
        if self.record is not None:
            # a copy, not the view x[:F]: a view would keep all three branches' inputs alive
            self.record.source_inputs[attn.path] = source_x.clone()

        if self.propagation is not None:
            # TokenFlow (Eq. 6): edited tokens come from the keyframes through the NN field of the
            # original video; the edited frames' own attention is never computed.
            tokens, neighbours = self.propagation.tokens, self.propagation.neighbours
            fields = nn_fields(tokens.source_inputs[attn.path], source_x, neighbours)  # Eq. 5, [F, N] each
            edited = blend(tokens.edited_outputs[attn.path], fields, neighbours)  # Eq. 6, [2, F, N, C]
            if self.propagation.propagate_source:
                # released rule: the original video's branch is gathered through the same field
                source_out = blend(tokens.source_outputs[attn.path][None], fields, neighbours)[0]  # [F, N, C]
            else:
                source_out = attn.plain(source_x)  # the paper: the original's features are its own
            return torch.cat([source_out, edited.reshape(2 * f, n, c)])

        q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
        if self.pnp.injects_qk(attn.path):
            q, k = inject_source(q, f), inject_source(k, f)
        source_out = attention(q[:f], k[:f], v[:f], attn.heads, upcast=attn.upcast)
        # Extended attention (Eq. 3-4) over groups of `joint_frames` frames, for each edited branch
        edited_out = attention(
            q[f:], k[f:], v[f:], attn.heads, joint_frames=self.joint_frames, upcast=attn.upcast, query_chunk=self.query_chunk
        )
        out = attn.to_out[0](torch.cat([source_out, edited_out]))
        if self.record is not None:
            self.record.edited_outputs[attn.path] = out[f:].reshape(2, f, n, c).clone()  # T_base (own storage, as above)
            if self.record.record_source_outputs:
                self.record.source_outputs[attn.path] = out[:f].clone()
        return out

    def resnet_residual(self, path: str, h: Tensor) -> Tensor:
        if path in self.pnp.feature_layers:
            return inject_source(h, self.frames)
        return h
