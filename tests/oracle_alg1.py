"""An independent oracle of one TokenFlow denoising step (paper Alg. 1), for the tests.

Plain and slow on purpose, written from the paper's text and the released code's documented rule
(../shared/reference/sd15-and-released-code.md), not from the project's TokenFlow modules: it uses
the project's UNet (its blocks, through the `UNetControl` seam) and the schedule's alpha table, but
none of tokenflow/controls.py, propagation.py or edit.py, and no vectorised shortcut of theirs:

- attention is a loop over heads with an explicit softmax; extended attention (Eq. 3-4) attends to
  the EXPLICIT concatenation of the group's keys and values;
- PnP (Tumanyan et al.): the edited branches' q and k at the injection layers, and their residual
  features at the injection resnets, are copies of the source branch's;
- the NN field (Eq. 5) is a loop over tokens, each taking the argmax of its cosine similarity to
  every token of the keyframe;
- Eq. 6-7 per frame from the printed formulas (paper rule), or from the released rule's groups;
- classifier-free guidance uncond + s (cond - uncond), then the DDIM (eta = 0) step, or, given a
  noise map z (edit-friendly DDPM inversion), the DDPM step (DDIM at eta = 1, Song et al. Eq. 12, 16)
  x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z,
  sigma^2 = (1 - a_prev) / (1 - a_t) (1 - a_t / a_prev), each frame with its own row of z;
- ControlNet (optional): for each edited branch and each frame of a UNet call, the ControlNet run on
  that one frame's latents, its branch's prompt and its own control image; the source branch's
  residuals are zeros (it is the original video, as without ControlNet).

Batch layout of every UNet call: [source | unconditional | conditional], F frames each.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from unet.control import UNetControl


def explicit_attention(q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
    """q [Nq, C], k/v [Nk, C] -> [Nq, C]: softmax(q k^T / sqrt(d)) v, one head at a time."""
    d = q.shape[-1] // heads
    out = torch.empty_like(q)
    for h in range(heads):
        s = slice(h * d, (h + 1) * d)
        scores = q[:, s] @ k[:, s].T / math.sqrt(d)
        out[:, s] = torch.softmax(scores, dim=-1) @ v[:, s]
    return out


def nn_field_by_loops(frame: Tensor, keyframe: Tensor) -> list[int]:
    """Eq. 5 for one frame, one token at a time: frame [N, C], keyframe [M, C] -> for each token p
    of the frame, argmax over q of cos(frame[p], keyframe[q])."""
    field = []
    for p in range(frame.shape[0]):
        cosine = (keyframe @ frame[p]) / (keyframe.norm(dim=1) * frame[p].norm())  # [M]
        field.append(int(cosine.argmax()))
    return field


def paper_pair(i: int, keyframes: list[int], weighting: str) -> list[tuple[int, float]]:
    """Eq. 6-7 as printed: [(keyframe, weight), ...] the frame blends."""
    past = [k for k in keyframes if k <= i]
    future = [k for k in keyframes if k >= i]
    if not past:
        return [(future[0], 1.0)]
    if not future:
        return [(past[-1], 1.0)]
    i_minus, i_plus = past[-1], future[0]
    if i_minus == i_plus:
        return [(i, 1.0)]
    d_minus, d_plus = i - i_minus, i_plus - i
    ratio = d_minus / (d_plus + d_minus)
    w = 1 / (1 + math.exp(-ratio)) if weighting == "sigmoid" else ratio
    return [(i_plus, w), (i_minus, 1 - w)]


def released_pair(i: int, keyframes: list[int], interval: int) -> list[tuple[int, float]]:
    """The released code's rule: group b = i // L; b > 0 blends k_b (w) and k_{b-1} (1 - w),
    w = sigmoid(d_prev / (d_cur + d_prev)), distances to the group centres L b + L // 2."""
    b = i // interval
    if b == 0:
        return [(keyframes[0], 1.0)]
    d_cur = abs(i - (interval * b + interval // 2))
    d_prev = abs(i - (interval * (b - 1) + interval // 2))
    w = 1 / (1 + math.exp(-d_prev / (d_cur + d_prev)))
    return [(keyframes[b], w), (keyframes[b - 1], 1 - w)]


@dataclass
class OracleSettings:
    mode: str  # tokenflow | fixed_keyframes | per_frame | extended_all
    guidance_scale: float = 7.5
    weighting: str = "sigmoid"
    rule: str = "paper"
    interval: int = 3
    qk_layers: tuple[str, ...] = ()  # already resolved for this step
    feature_layers: tuple[str, ...] = ()


@dataclass
class Recorded:
    inputs: dict = field(default_factory=dict)  # (path, frame) -> [N, C] source self-attention input
    outputs: dict = field(default_factory=dict)  # (path, branch, frame) -> [N, C] self-attention output


class OracleControl(UNetControl):
    """One UNet call of the oracle over `frames` (the video frame indices of the batch)."""

    def __init__(self, frames: list[int], s: OracleSettings, *, joint: bool = False, record: Recorded | None = None,
                 propagate_from: Recorded | None = None, keyframes: list[int] | None = None):
        self.frames, self.s, self.joint, self.record = frames, s, joint, record
        self.propagate_from, self.keyframes = propagate_from, keyframes
        self.fields: dict = {}  # (path, frame, keyframe) -> NN field

    def _pairs(self, i: int) -> list[tuple[int, float]]:
        if self.s.rule == "paper":
            return paper_pair(i, self.keyframes, self.s.weighting)
        return released_pair(i, self.keyframes, self.s.interval)

    def _propagated(self, path: str, branch: int, i: int, x_i: Tensor) -> Tensor:
        """Eq. 6 for frame i: sum over its keyframes of weight x T_k[gamma_k]."""
        rec = self.propagate_from
        out = torch.zeros_like(x_i)
        for k, w in self._pairs(i):
            if (path, i, k) not in self.fields:  # the same field serves every branch
                self.fields[(path, i, k)] = nn_field_by_loops(x_i, rec.inputs[(path, k)])
            out += w * rec.outputs[(path, branch, k)][self.fields[(path, i, k)]]
        return out

    def self_attention(self, attn, x: Tensor) -> Tensor:
        f = len(self.frames)
        path = attn.path
        src = x[:f]
        if self.record is not None:
            for j, i in enumerate(self.frames):
                self.record.inputs[(path, i)] = src[j].clone()
        q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
        if any(path.startswith(layer + ".") for layer in self.s.qk_layers):
            q = torch.cat([q[:f]] * 3)
            k = torch.cat([k[:f]] * 3)
        outs = torch.empty_like(x)
        for branch in range(3):
            for j, i in enumerate(self.frames):
                row = branch * f + j
                if self.propagate_from is not None and (branch > 0 or self.s.rule == "released"):
                    outs[row] = self._propagated(path, branch, i, src[j])  # already an output: no to_out
                    continue
                if branch > 0 and self.joint:  # extended attention: keys/values of every frame of the pass
                    keys = torch.cat([k[branch * f + m] for m in range(f)])
                    values = torch.cat([v[branch * f + m] for m in range(f)])
                else:
                    keys, values = k[row], v[row]
                outs[row] = attn.to_out[0](explicit_attention(q[row], keys, values, attn.heads))
        if self.record is not None:
            for branch in range(3):
                for j, i in enumerate(self.frames):
                    self.record.outputs[(path, branch, i)] = outs[branch * f + j].clone()
        return outs

    def resnet_residual(self, path: str, h: Tensor) -> Tensor:
        if path in self.s.feature_layers:
            f = len(self.frames)
            return torch.cat([h[:f]] * 3)
        return h


@dataclass
class OracleControlNet:
    model: object  # unet.controlnet.ControlNet
    conditions: Tensor  # [n, 3, H, W], one control image per frame
    scale: float = 1.0


def oracle_residuals(cn: OracleControlNet, frames: list[int], latents: Tensor, prompts, t: int):
    """Residuals of one UNet call over `frames`, branch-major [source | uncond | cond], one ControlNet
    call per edited branch and frame; zeros for the source branch."""
    from unet.control import ControlResiduals

    per_branch = []
    for branch in (1, 2):  # unconditional (negative prompt), conditional (target prompt)
        for i in frames:
            per_branch.append(cn.model(latents[i:i + 1], t, prompts[branch], cn.conditions[i:i + 1], cn.scale))
    f = len(frames)
    down = [torch.cat([torch.zeros_like(per_branch[0].down[k]).expand(f, -1, -1, -1)] + [r.down[k] for r in per_branch])
            for k in range(len(per_branch[0].down))]
    mid = torch.cat([torch.zeros_like(per_branch[0].mid).expand(f, -1, -1, -1)] + [r.mid for r in per_branch])
    return ControlResiduals(down=down, mid=mid)


def oracle_step(unet, schedule, s: OracleSettings, prompts: tuple[Tensor, Tensor, Tensor], latents: Tensor,
                source: Tensor, t: int, t_prev: int, keyframes: list[int] | None, noise: Tensor | None = None,
                controlnet: OracleControlNet | None = None) -> Tensor:
    """Alg. 1, one step, for every frame of latents [n, 4, h, w] -> latents at t_prev; DDIM, or the
    DDPM step with the noise map `noise` [n, 4, h, w] when given."""
    n = latents.shape[0]
    all_frames = list(range(n))

    def forward(frames: list[int], control: OracleControl) -> Tensor:
        f = len(frames)
        x = torch.cat([source[frames], latents[frames], latents[frames]])
        context = torch.cat([p.expand(f, -1, -1) for p in prompts])  # source, negative, target prompt
        residuals = None if controlnet is None else oracle_residuals(controlnet, frames, latents, prompts, t)
        return unet(x, t, context, control, residuals=residuals)

    if s.mode in ("tokenflow", "fixed_keyframes"):
        recorded = Recorded()
        forward(keyframes, OracleControl(keyframes, s, joint=True, record=recorded))
        out = forward(all_frames, OracleControl(all_frames, s, propagate_from=recorded, keyframes=keyframes))
    elif s.mode == "per_frame":
        out = forward(all_frames, OracleControl(all_frames, s))
    else:  # extended_all
        out = forward(all_frames, OracleControl(all_frames, s, joint=True))
    uncond, cond = out[n:2 * n], out[2 * n:]
    eps = uncond + s.guidance_scale * (cond - uncond)
    a_t = float(schedule.alphas_cumprod[t])
    a_prev = float(schedule.alphas_cumprod[t_prev]) if t_prev >= 0 else float(schedule.final_alpha_cumprod)
    if schedule.prediction_type == "epsilon":
        x0 = (latents - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    else:  # v-prediction: the model's output is v = sqrt(a) eps - sqrt(1 - a) x0
        x0 = math.sqrt(a_t) * latents - math.sqrt(1 - a_t) * eps
        eps = math.sqrt(a_t) * eps + math.sqrt(1 - a_t) * latents
    if noise is None:
        return math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    return math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - variance) * eps + math.sqrt(variance) * noise
